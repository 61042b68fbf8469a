"""Save / load round trips and Hub downloads through a real local HTTP server."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gqa_core import convert, grouping_config
from gqa_core.io.hub import ModelLoadError, create_model, from_pretrained, save_pretrained

from support.hub_server import HubServer

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=6, mlp_ratio=2.0, num_classes=10)
VARIANTS = [('mha', None, {}), ('gqa', 3, {}), ('kdgqa', 3, {}), ('dgqa', 3, {'stat': 'diff', 'window': 1}),
            ('dgqa', 2, {'stat': 'ema', 'window': 2, 'beta': 0.5}), ('pgqa', 3, {'noise_scale': 0.2})]


def trained_model(variant, G, options):
    torch.manual_seed(0)
    model = create_model('vit_tiny_patch16_224', TINY, variant, G, **options).train()
    with torch.no_grad():
        for step in range(4):
            model(torch.randn(4, 3, 32, 32) * (step + 1))
    return model.eval()


@pytest.mark.parametrize('variant,G,options', VARIANTS)
def test_round_trip_is_bit_identical(tmp_path, variant, G, options):
    model = trained_model(variant, G, options)
    save_pretrained(model, tmp_path, labels=[f'c{i}' for i in range(10)], metrics={'top1': 0.5})
    loaded = from_pretrained(str(tmp_path)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert grouping_config(loaded) == grouping_config(model)
    if variant == 'dgqa':
        for name in ('allocation', 'history', 'history_steps', 'step'):
            assert torch.equal(getattr(loaded.blocks[1].attn.policy, name), getattr(model.blocks[1].attn.policy, name))
        assert len(model.blocks[1].attn.policy.history) > 1
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['labels'][3] == 'c3' and config['grouping']['variant'] == variant
    card = (tmp_path / 'README.md').read_text()
    assert card.startswith('---\n') and 'from_pretrained' in card and '| top1 | 0.5 |' in card
    assert 'K/V heads: mean-pooled from consecutive MHA heads' in card


def test_the_card_names_the_heads_each_kv_head_was_pooled_from(tmp_path):
    """A model converted with a chosen grouping (the advisor's) says in its card which MHA heads share a KV head."""
    model = create_model('vit_tiny_patch16_224', TINY, 'mha', None)
    order = [[0, 3, 1, 2, 4, 5], [5, 4, 3, 2, 1, 0]]
    save_pretrained(convert(model, 'gqa', 3, head_order=order), tmp_path)
    card = (tmp_path / 'README.md').read_text()
    assert 'grouped per layer as layer 0: (0 3)(1 2)(4 5); layer 1: (5 4)(3 2)(1 0)' in card, card


def test_a_model_trained_with_stochastic_depth_saves_as_the_same_model_without_it(tmp_path):
    """DropPath is the identity at inference: a model built with drop_path_rate saves, and loads as the timm
    model without it, giving the same outputs in eval."""
    model = create_model('vit_tiny_patch16_224', dict(TINY, drop_path_rate=0.2), 'kdgqa', 3).eval()
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(str(tmp_path)).eval()
    assert type(loaded.blocks[1].drop_path1).__name__ == 'Identity'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_fp16_weights_load_into_fp32(tmp_path):
    model = trained_model('kdgqa', 3, {})
    save_pretrained(model, tmp_path, dtype=torch.float16)
    loaded = from_pretrained(str(tmp_path))
    assert next(loaded.parameters()).dtype == torch.float32
    w = model.blocks[0].attn.qkv.weight
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, w.half().float())


def test_local_errors_name_the_problem(tmp_path):
    good = tmp_path / 'good'
    save_pretrained(trained_model('gqa', 3, {}), good)
    with pytest.raises(ModelLoadError, match='missing config.json'):
        from_pretrained(str(tmp_path))  # a folder without a model
    broken = tmp_path / 'truncated'
    broken.mkdir()
    (broken / 'config.json').write_text((good / 'config.json').read_text())
    (broken / 'model.safetensors').write_bytes((good / 'model.safetensors').read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match='truncated.*corrupt or truncated'):
        from_pretrained(str(broken))
    partial = tmp_path / 'partial'
    partial.mkdir()
    (partial / 'config.json').write_text((good / 'config.json').read_text())
    from safetensors.torch import load_file
    state = load_file(good / 'model.safetensors')
    state.pop('blocks.1.attn.proj.weight')
    save_file(state, partial / 'model.safetensors')
    with pytest.raises(ModelLoadError, match='do not fit the config: missing blocks.1.attn.proj.weight$'):
        from_pretrained(str(partial))
    unknown = tmp_path / 'unknown'
    unknown.mkdir()
    config = json.loads((good / 'config.json').read_text())
    config['grouping']['variant'] = 'sparkle'
    (unknown / 'config.json').write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unknown.*grouping.variant must be one of"):
        from_pretrained(str(unknown))
    wrong = tmp_path / 'wrong'
    wrong.mkdir()
    config = json.loads((good / 'config.json').read_text())
    config['grouping']['num_kv_heads'] = 2
    (wrong / 'config.json').write_text(json.dumps(config))
    (wrong / 'model.safetensors').write_bytes((good / 'model.safetensors').read_bytes())
    with pytest.raises(ModelLoadError,
                       match=r'wrong.*do not fit the config: blocks.0.attn.qkv.bias has shape \[96\], the config'):
        from_pretrained(str(wrong))


HUB_SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from gqa_core.io.hub import from_pretrained, from_timm, ModelLoadError
    out = {}
    model = from_pretrained("lens/kdgqa-tiny").eval()
    x = torch.load(sys.argv[1], weights_only=True)
    with torch.no_grad():
        out["logits"] = model(x).tolist()
    conv = from_timm("hf-hub:timmorg/tiny-vit", "gqa", 3)
    out["timm_heads"] = conv.blocks[0].attn.num_kv_heads
    with torch.no_grad():  # the repo's own 10-class head, not one timm re-made for its 1000-class default
        out["timm_mha_logits"] = from_timm("hf-hub:timmorg/tiny-vit", "mha").eval()(x).tolist()
    out["timm_norm"] = conv.norm.weight.tolist()
    for repo in ["lens/missing", "lens/only-bin", "lens/truncated"]:
        try:
            from_pretrained(repo)
            out[repo] = "loaded"
        except ModelLoadError as e:
            out[repo] = str(e)
    print("RESULT" + json.dumps(out))
''')


def test_hub_download_through_local_http_server(tmp_path):
    root = tmp_path / 'hub'
    model = trained_model('kdgqa', 3, {})
    save_pretrained(model, root / 'lens' / 'kdgqa-tiny')
    (root / 'lens' / 'only-bin').mkdir(parents=True)
    (root / 'lens' / 'only-bin' / 'config.json').write_text((root / 'lens' / 'kdgqa-tiny' / 'config.json').read_text())
    (root / 'lens' / 'only-bin' / 'pytorch_model.bin').write_bytes(b'pickle would be here')
    (root / 'lens' / 'truncated').mkdir()
    (root / 'lens' / 'truncated' / 'config.json').write_text((root / 'lens' / 'kdgqa-tiny' / 'config.json').read_text())
    (root / 'lens' / 'truncated' / 'model.safetensors').write_bytes(
        (root / 'lens' / 'kdgqa-tiny' / 'model.safetensors').read_bytes()[:-100])
    # A timm-format repo: timm's own config.json + safetensors weights, loaded via 'hf-hub:'.
    import timm
    torch.manual_seed(1)
    plain = timm.create_model('vit_tiny_patch16_224', **TINY)
    timm_repo = root / 'timmorg' / 'tiny-vit'
    timm_repo.mkdir(parents=True)
    timm_cfg = dict(architecture='vit_tiny_patch16_224', num_classes=10, model_args=TINY,
                    pretrained_cfg=dict(input_size=[3, 32, 32], mean=[0.5] * 3, std=[0.5] * 3, num_classes=10))
    (timm_repo / 'config.json').write_text(json.dumps(timm_cfg))
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, timm_repo / 'model.safetensors')

    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / 'x.pt')
    env = dict(os.environ, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf-home'), HF_HUB_DISABLE_XET='1')
    with HubServer(root) as server:
        env['HF_ENDPOINT'] = server.url
        proc = subprocess.run([sys.executable, '-c', HUB_SCRIPT, str(tmp_path / 'x.pt')], env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('RESULT', 1)[1])
    with torch.no_grad():
        assert torch.equal(torch.tensor(result['logits']), model(x))
    assert result['timm_heads'] == 3
    with torch.no_grad():
        assert (torch.tensor(result['timm_mha_logits']) - plain.eval()(x)).abs().max() <= 1e-5
    assert torch.equal(torch.tensor(result['timm_norm']), plain.norm.weight.detach())
    assert 'lens/missing: not found or private' in result['lens/missing']
    assert 'lens/only-bin: the repo has no model.safetensors' in result['lens/only-bin']
    assert 'never unpickles' in result['lens/only-bin']
    assert 'lens/truncated' in result['lens/truncated'] and 'corrupt or truncated' in result['lens/truncated']


SMALL_VITS = [  # (timm name, constructor args): the layouts users bring, small enough to build here
    ('vit_tiny_patch16_224', dict(img_size=32, patch_size=8, depth=2, num_classes=7)),
    ('vit_small_patch14_reg4_dinov2', dict(img_size=56, depth=2, num_classes=0)),  # registers, layer scale
    ('deit_tiny_distilled_patch16_224', dict(img_size=32, patch_size=8, depth=2, num_classes=5)),  # dist token
    ('vit_base_patch16_siglip_224', dict(img_size=32, patch_size=8, depth=2, embed_dim=96, num_heads=6,
                                         num_classes=3)),  # attention-pooling head, no class token
    ('vit_medium_patch16_gap_256', dict(img_size=32, patch_size=8, depth=2, num_classes=4, qk_norm=True)),
]


@pytest.mark.parametrize('name,args', SMALL_VITS, ids=[n for n, _ in SMALL_VITS])
def test_any_converted_timm_vit_saves_and_loads_bit_identical(tmp_path, name, args):
    """timm.create_model -> convert -> save_pretrained -> from_pretrained, with no GQA Lens constructor: the
    config is read from the model itself."""
    import timm
    torch.manual_seed(0)
    model = timm.create_model(name, **args)
    model = convert(model, 'kdgqa', model.blocks[0].attn.num_heads // 2).eval()
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['backbone'] == name
    loaded = from_pretrained(str(tmp_path)).eval()
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_a_model_its_timm_constructor_cannot_express_is_refused_by_name(tmp_path):
    import timm
    model = convert(timm.create_model('vit_tiny_patch16_224', **TINY), 'gqa', 3)
    model.blocks[1].norm2 = torch.nn.BatchNorm1d(48)  # edited by hand: no constructor argument makes this
    with pytest.raises(ValueError, match='blocks.1.norm2'):
        save_pretrained(model, tmp_path)
    del model.pretrained_cfg['architecture']
    with pytest.raises(ValueError, match='no timm pretrained_cfg naming its architecture'):
        save_pretrained(model, tmp_path)


def test_only_clamp_bounds_may_be_infinite_and_never_nan(tmp_path):
    """Gemma4's clippable linears keep +-Inf bounds for "no clamp" (timm's default): those load; an infinite
    weight, or a NaN bound, is refused as before."""
    from gqa_core.io.hub import _read_weights
    inf = torch.tensor([-float('inf'), float('inf')])
    cases = {'bounds': ({'blocks.0.attn.clip_bounds': inf, 'blocks.0.mlp.up_proj.input_max': inf[1:].clone()}, None),
             'weight': ({'blocks.0.attn.proj.weight': inf}, 'not finite'),
             'nan-bound': ({'blocks.0.attn.clip_bounds': torch.tensor([float('nan')])}, 'not finite')}
    for name, (state, refusal) in cases.items():
        path = tmp_path / f'{name}.safetensors'
        save_file(state, str(path))
        if refusal is None:
            assert set(_read_weights(name, path)) == set(state)
        else:
            with pytest.raises(ModelLoadError, match=refusal):
                _read_weights(name, path)
