"""ViTs that already share K/V heads (timm's own GQA: Sapiens2, Eva and NaFlexVit with per-block
``num_kv_heads``, ``AttentionRope``): loaded as they are, regrouped, expanded to MHA, saved and loaded, with random
weights."""
import copy

import pytest
import timm
import torch

from gqa_core import GroupedQueryAttention, convert, record
from gqa_core.core.convert import grouping_config, kv_heads_label, native_kv_heads
from support import model_images as images, perturbed_model

# (timm name, constructor arguments): every timm layout that shares K/V heads itself
NATIVE = {
    # Sapiens2's geometry, depth-reduced: multi-head blocks first and last, H/2 KV heads between
    'sapiens2': ('vit_base_patch16_sapiens2', dict(img_size=(64, 48), embed_dim=64, depth=4, num_heads=4,
                                                   num_kv_heads=(4, 2, 2, 4), num_classes=5)),
    # EVA-02 with timm's AttentionRope and one G for every block
    'eva02-rope': ('eva02_tiny_patch14_224', dict(img_size=56, embed_dim=64, depth=2, num_heads=4, attn_type='rope',
                                                  qkv_fused=False, num_kv_heads=2, num_classes=5)),
    # Perception Encoder (AttentionRope, attention-pooling head) with a G per block
    'pe-rope': ('vit_pe_core_tiny_patch16_384', dict(img_size=64, embed_dim=64, depth=2, num_heads=4,
                                                     attn_pool_num_heads=4, qkv_fused=False, num_kv_heads=(1, 2))),
    # NaFlexVit (EvaBlock with AttentionRope, axial RoPE, registers) with a G per block, shown 64 px images
    'naflex-rope': ('naflexvit_base_patch16_gap', dict(embed_dim=64, depth=2, num_heads=4, num_classes=5,
                                                       pos_embed_grid_size=(4, 4), rope_type='axial', qkv_fused=False,
                                                       num_kv_heads=(2, 1),
                                                       pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))),
}


def native_model(key: str) -> torch.nn.Module:
    """The layout, small, every parameter perturbed (biases are zero at init; the tests must see them)."""
    name, args = NATIVE[key]
    return perturbed_model(name, **args)


@pytest.mark.parametrize('key', sorted(NATIVE))
def test_a_native_model_loads_as_it_is_and_expands_to_mha_exactly(key):
    model = native_model(key)
    x = images(model)
    native = native_kv_heads(model)
    assert any(g < model.blocks[0].attn.num_heads for g in native), 'the layout shares K/V heads'
    with torch.no_grad():
        expected = model(x)
    as_is = convert(copy.deepcopy(model), 'gqa')  # each block keeps its own G
    assert [layer.attn.num_kv_heads for layer in as_is.blocks] == native
    g = grouping_config(as_is)['num_kv_heads']
    assert g == (native if len(set(native)) > 1 else native[0])
    mha = convert(copy.deepcopy(model), 'mha')
    assert all(b.attn.num_kv_heads == b.attn.num_heads for b in mha.blocks)
    with torch.no_grad():
        assert (as_is(x) - expected).abs().max() <= 1e-5
        assert (mha(x) - expected).abs().max() <= 1e-5, 'each KV head repeated for the heads it serves'
    with torch.no_grad(), record(as_is, attention='full', keep_qk=True) as rec:
        as_is(x[:1])
    for layer, g in zip(rec.result.layers, native):
        assert layer.key_norms.shape == (1, g) and layer.allocation.sum() == layer.query_to_kv.shape[1]
        assert torch.allclose(layer.attention.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize('key', sorted(NATIVE))
@pytest.mark.parametrize('variant,g', [('gqa', 1), ('kdgqa', None), ('dgqa', None), ('pgqa', None)])
def test_a_native_model_regroups_and_round_trips(key, variant, g, tmp_path):
    from gqa_core.io.hub import load_pretrained, save_pretrained
    model = native_model(key)
    x = images(model)
    regrouped = convert(copy.deepcopy(model), variant, g)
    expected_g = [g] * len(model.blocks) if g is not None else native_kv_heads(model)
    assert [b.attn.num_kv_heads for b in regrouped.blocks] == expected_g
    assert all(isinstance(b.attn, GroupedQueryAttention) and b.attn.policy.name == variant for b in regrouped.blocks)
    save_pretrained(regrouped, tmp_path / 'm')
    loaded, config = load_pretrained(str(tmp_path / 'm'))
    loaded.eval()
    assert config.grouping.variant == variant
    with torch.no_grad():
        assert torch.equal(loaded(x), regrouped(x))


def naflex_batch(images_chw, tokens: int) -> dict:
    """timm's NaFlex input: each image cut into its own number of patches (its aspect ratio), padded to
    ``tokens`` with ``patch_valid`` saying which are real."""
    import torch.nn.functional as F
    from timm.data.naflex_transforms import Patchify
    cut = [Patchify(patch_size=16)(image) for image in images_chw]

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0) * (t.dim() - 1) + (0, tokens - t.shape[0]))
    return dict(patches=torch.stack([pad(c['patches']) for c in cut]),
                patch_coord=torch.stack([pad(c['patch_coord']) for c in cut]),
                patch_valid=torch.stack([torch.arange(tokens) < c['patches'].shape[0] for c in cut]))


def test_naflexvit_keeps_any_aspect_ratio_and_padded_sequences():
    """NaFlexVit's point: images of any aspect ratio, and batches of different sequence lengths padded under a
    mask. Its native layout converted as it is or expanded to MHA equals timm on both; under every policy an
    image's answer padded in a batch beside a longer one is its answer alone. The multi-head NaFlexVit (no RoPE,
    which zeroes padded keys) makes KDGQA's key norms see the padding unless the layer leaves it out."""
    native = native_model('naflex-rope')
    mha = perturbed_model('naflexvit_base_patch16_gap', embed_dim=64, depth=2, num_heads=8, num_classes=5,
                          pos_embed_grid_size=(4, 4))
    wide, square = torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(2)), torch.randn(3, 32, 32)
    padded, alone = naflex_batch([wide, square], 15), naflex_batch([square], 4)
    with torch.no_grad():
        expected = native(padded)
        for variant in ('gqa', 'mha'):
            converted = convert(copy.deepcopy(native), variant).eval()
            assert (converted(wide[None]) - native(wide[None])).abs().max() <= 1e-5, variant
            assert (converted(padded) - expected).abs().max() <= 1e-5, variant
        for model, g in ((native, None), (mha, 4)):
            for variant in ('kdgqa', 'dgqa', 'pgqa'):
                converted = convert(copy.deepcopy(model), variant, g).eval()
                assert (converted(padded)[1] - converted(alone)[0]).abs().max() <= 1e-5, (variant, g)
                assert (converted(alone) - converted(square[None])).abs().max() <= 1e-5, (variant, g)


def test_pooling_a_native_layer_to_a_divisor_of_its_g_pools_its_kv_heads():
    """G = 1 from a block with two KV heads: the one shared K/V is the mean of the two (what pooling the block's
    multi-head expansion gives too)."""
    model = native_model('eva02-rope')
    attn = model.blocks[0].attn
    pooled = GroupedQueryAttention.from_attention(attn, 'gqa', 1)
    assert torch.allclose(pooled.k_proj.weight, attn.k_proj.weight.view(2, -1, 64).mean(0))
    assert torch.allclose(pooled.v_proj.bias, attn.v_proj.bias.view(2, -1).mean(0))
    via_mha = GroupedQueryAttention.from_attention(convert(copy.deepcopy(model), 'mha').blocks[0].attn.to_attention(),
                                                   'gqa', 1)
    assert torch.allclose(pooled.k_proj.weight, via_mha.k_proj.weight, atol=1e-7)


def test_g_per_block_is_checked_and_said():
    model = native_model('sapiens2')
    with pytest.raises(ValueError, match=r'one per block \(4\)'):
        convert(copy.deepcopy(model), 'gqa', [2, 2])
    with pytest.raises(ValueError, match='must be a positive divisor'):
        convert(copy.deepcopy(model), 'gqa', [4, 3, 2, 4])
    assert kv_heads_label([4, 2, 2, 4]) == '2–4 by block (4, 2, 2, 4)' and kv_heads_label(3) == '3'
    with pytest.raises(ValueError, match='num_kv_heads is required'):
        convert(timm.create_model('vit_small_patch16_224', depth=1, img_size=32), 'kdgqa')


def test_a_native_model_is_advised_and_reordered_through_its_multi_head_expansion(tmp_path):
    """The head-order advisor and explicit head orders work on timm's GQA layers, fresh or saved and loaded as
    they are: they act on the multi-head layer that repeats each KV head (exact), so pooling heads that already
    share K/V costs nothing, and a head order that splits them gives what the expanded model gives."""
    from gqa_core.core.head_order import advise_head_order
    from gqa_core.io.hub import load_pretrained, save_pretrained
    model = native_model('sapiens2')
    x = images(model)
    advice = advise_head_order(model, 2, x)
    assert advice.error_consecutive[1:3] == [0.0, 0.0] and advice.error_advised[1:3] == [0.0, 0.0]
    assert advice.error_consecutive[0] > 0 and advice.error_advised[0] <= advice.error_consecutive[0]
    split = [[0, 2, 1, 3]] * 4  # heads 0 and 1 share a KV head in blocks 1, 2: this order separates them
    reordered = convert(copy.deepcopy(model), 'gqa', 2, head_order=split)
    via_mha = convert(convert(copy.deepcopy(model), 'mha'), 'gqa', 2, head_order=split)
    assert [b.attn.source_heads for b in reordered.blocks] == split
    with torch.no_grad():
        assert (reordered(x) - via_mha(x)).abs().max() <= 1e-6
    save_pretrained(convert(copy.deepcopy(model), 'gqa'), tmp_path / 'as-is')
    loaded = load_pretrained(str(tmp_path / 'as-is'))[0].eval()
    for g, order in ((1, 'consecutive'), (2, split), (2, 'output-error')):
        fresh = convert(copy.deepcopy(model), 'gqa', g, head_order=order, calibration=x)
        again = convert(copy.deepcopy(loaded), 'gqa', g, head_order=order, calibration=x)
        with torch.no_grad():
            assert (fresh(x) - again(x)).abs().max() <= 1e-6, (g, order)
    with pytest.raises(ValueError, match=r'chooses groups for one G in every block, got a G per block \(2–4 by'):
        convert(copy.deepcopy(model), 'gqa', head_order='output-error', calibration=x)  # each block's own G
    uniform = native_model('eva02-rope')  # G = 2 in both blocks: one G, which the advisor takes
    assert [b.attn.num_kv_heads for b in convert(uniform, 'gqa', head_order='output-error',
                                                 calibration=images(uniform)).blocks] == [2, 2]
    with pytest.raises(ValueError, match='G=2, its K/V pooled by a conversion; convert to G=1 from the multi-head model'):
        convert(convert(timm.create_model('vit_small_patch16_224', depth=1, img_size=32), 'gqa', 2), 'gqa', 1)


def test_a_calibrated_regrouping_of_a_native_model_fits_its_outputs_closer_than_pooling():
    """The calibrated conversion applies to timm's GQA models too: the native layers are the teachers."""
    model = native_model('sapiens2')
    x = images(model, 8)
    with torch.no_grad():
        expected = model(x)
        pooled = convert(copy.deepcopy(model), 'gqa', 1)(x)
        fitted = convert(copy.deepcopy(model), 'gqa', 1, init='calibrated', calibration=x)(x)
    assert (fitted - expected).norm() < 0.8 * (pooled - expected).norm()


def test_the_advisor_tool_groups_a_native_model(tmp_path):
    """The MCP advisor takes a model that shares the K/V heads it was built with, and its answer's spec (an
    ``output-error`` conversion of that model) loads in the registry."""
    import json
    from gqa_core.io.hub import save_pretrained
    from gqa_core.lens.models import ModelRegistry
    from gqa_core.lens.tools import LensTools
    save_pretrained(convert(native_model('sapiens2'), 'gqa'), tmp_path / 'sapiens')
    registry = ModelRegistry(model_dirs=[str(tmp_path)])
    advice = json.loads(LensTools(registry).advise_grouping('local:sapiens', 2))
    assert [layer['error_advised'] for layer in advice['layers']][1:3] == [0.0, 0.0]
    converted = registry.get(advice['spec'])
    assert [b.attn.num_kv_heads for b in converted.model.blocks] == [2, 2, 2, 2]


# Each native layout as the app serves it, side by side: (saved as, policy, G as the summary names it)
SERVED = {'sapiens2': ('gqa', '2–4 by block (4, 2, 2, 4)'), 'eva02-rope': ('kdgqa', '2'),
          'pe-rope': ('gqa', '1–2 by block (1, 2)'), 'naflex-rope': ('dgqa', '1–2 by block (2, 1)')}


def test_the_kv_budget_explorer_starts_from_a_native_model(tmp_path):
    """The explorer (MCP tool and page tab) takes a model as built: its uniform groupings are pooled from the
    exact multi-head expansion, and a ``native`` row places the model itself (less K/V than MHA, the same top-1
    as its expansion); the figure marks it. A model whose policy does not fix its groups is refused in one line."""
    import json
    from gqa_core.io.hub import save_pretrained
    from gqa_core.lens.figures import kv_budget_figure
    from gqa_core.lens.models import ModelRegistry
    from gqa_core.lens.tools import LensTools
    save_pretrained(convert(native_model('sapiens2'), 'gqa'), tmp_path / 'sapiens')
    save_pretrained(convert(native_model('sapiens2'), 'kdgqa'), tmp_path / 'sapiens-kdgqa')
    tools = LensTools(ModelRegistry(model_dirs=[str(tmp_path)]))
    result = json.loads(tools.kv_budget('local:sapiens', 8))
    mha, native = result['rows'][:2]
    assert mha['variant'] == 'mha' and mha['num_kv_heads'] == 4
    assert native['variant'] == 'native' and native['num_kv_heads'] == [4, 2, 2, 4]
    assert native['agreement'] == 1.0 and native['kv_bytes'] == mha['kv_bytes'] * 3 // 4
    assert {r['num_kv_heads'] for r in result['rows'][2:]} == {1, 2}
    assert 'as built' in [trace.name for trace in kv_budget_figure(result).data]
    with pytest.raises(Exception, match='its policy, KDGQA, does not fix its groups at inference; the explorer starts'):
        tools.kv_budget('local:sapiens-kdgqa', 8)


def test_the_app_shows_every_view_of_each_native_model_over_http(app_server):
    """Every native layout (Sapiens2, EVA-02 and PE with AttentionRope, NaFlexVit), saved at its own G (as it is,
    or under a key-driven policy), served by the real app in four columns: every view answers with a picture or
    a figure, or one line saying why it does not apply; each summary names its G, by block where blocks differ;
    the download holds all four."""
    import zipfile
    from gradio_client import Client, handle_file
    from support.answers import columns, unwrap
    from support import ALLOWED_MODELS, EXAMPLES_DIR
    from gqa_core.io.hub import save_pretrained
    from gqa_core.lens.views import VIEWS
    for key, (variant, _) in SERVED.items():
        save_pretrained(convert(native_model(key), variant), ALLOWED_MODELS / f'native-{key}')
    client = Client(app_server[0], verbose=False)
    image = handle_file(str(EXAMPLES_DIR / 'grace_hopper.jpg'))
    specs = [f'local:native-{key}' for key in SERVED]
    for view in VIEWS.values():
        out = client.predict(image, *specs, view.label, 1, 'mean', 'mean', 'zero', True, api_name='/run')
        assert '⚠️' not in out[0] or 'shrunk' in out[0], (view.label, out[0])
        for column, (key, (_, label)) in zip(columns(out), SERVED.items()):
            drawn = column['picture'] is not None or column['figure'] is not None
            assert drawn or (column['caption'].startswith('*') and len(column['caption']) > 10), \
                (view.label, key, column['caption'])
            assert 'Traceback' not in column['caption'] and 'nan' not in column['caption'].lower().split()
            assert f'G = {label}' in column['summary'], (key, column['summary'])
    archive = unwrap(client.predict(0, 'mean', 'mean', api_name='/export'))  # the last run's four models
    with zipfile.ZipFile(archive) as zf:
        assert sum(n.endswith('allocations.csv') for n in zf.namelist()) == len(SERVED)
    # Sapiens2 expanded to MHA (the reference), regrouped by the advisor with a calibrated start, and as it is:
    # the views that compare to a reference or read a calibration report draw for the regrouped models
    specs = ['convert:local:native-sapiens2:mha:4', 'convert:local:native-sapiens2:gqa:1:output-error:calibrated',
             'local:native-sapiens2', '(none)']
    for view in (VIEWS['difference'], VIEWS['conversion']):
        out = client.predict(image, *specs, view.label, 1, 'mean', 'mean', 'zero', True, api_name='/run')
        drawn = [c['picture'] is not None or c['figure'] is not None for c in columns(out)[:3]]
        assert drawn[1] and (drawn[2] or view is VIEWS['conversion']), (view.label, columns(out))


EXPORT_CHECK = r'''
import json, sys
sys.modules['gqa_core'] = None  # plain timm: any import of GQA Lens fails
import timm, torch
folder, inputs = sys.argv[1], sys.argv[2]
spec = json.load(open(folder + '/timm_args.json'))
overlay = dict(spec['pretrained_cfg_overlay'], file=folder + '/model.safetensors')
model = timm.create_model(spec['architecture'], pretrained=True, pretrained_cfg_overlay=overlay,
                          **spec['model_args']).eval()
x = torch.load(inputs)
with torch.no_grad():
    torch.save(model(x), inputs + '.out')
'''


@pytest.mark.parametrize('case', ['sapiens2', 'pe-rope', 'eva02-pooled', 'naflex-rope', 'naflex-pooled'])
def test_a_static_gqa_eva_or_naflexvit_model_exports_to_timms_own_format(case, tmp_path):
    """Saved for plain timm (AttentionRope with num_kv_heads per block), loaded by ``timm.create_model(...,
    pretrained_cfg_overlay=dict(file=...))`` in a process where GQA Lens cannot be imported: the same outputs."""
    import subprocess
    import sys
    from gqa_core.io.timm_native import save_timm_native
    if case == 'eva02-pooled':  # timm's EVA-02 (EvaAttention, one fused qkv) pooled here to G = 2
        source = perturbed_model('eva02_tiny_patch14_224', img_size=56, embed_dim=64, depth=2, num_heads=4,
                                 num_classes=5)
        model = convert(source, 'gqa', 2)
    elif case == 'naflex-pooled':  # NaFlexVit of plain blocks (fused qkv, LayerScale), registers, map pooling
        source = perturbed_model('naflexvit_base_patch16_map', embed_dim=64, depth=2, num_heads=4, num_classes=5,
                                 pos_embed_grid_size=(4, 4), reg_tokens=2,
                                 pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))
        model = convert(source, 'gqa', 2)
    else:
        model = convert(native_model(case), 'gqa')
    x = images(model)
    save_timm_native(model, tmp_path / 'timm')
    torch.save(x, tmp_path / 'x.pt')
    subprocess.run([sys.executable, '-c', EXPORT_CHECK, str(tmp_path / 'timm'), str(tmp_path / 'x.pt')], check=True,
                   cwd=tmp_path, timeout=300)
    with torch.no_grad():
        assert (torch.load(tmp_path / 'x.pt.out') - model(x)).abs().max() <= 1e-5


def test_what_timm_cannot_express_is_refused_by_name(tmp_path):
    from gqa_core.io.timm_native import save_timm_native
    with pytest.raises(ValueError, match='chooses its groups per image'):
        save_timm_native(convert(native_model('sapiens2'), 'kdgqa'), tmp_path / 'a')
    vit = convert(timm.create_model('vit_small_patch16_224', depth=1, img_size=32, num_classes=5), 'gqa', 3)
    with pytest.raises(ValueError, match='only in its Eva and NaFlexVit models'):
        save_timm_native(vit, tmp_path / 'b')
    assert not (tmp_path / 'a').exists() and not (tmp_path / 'b').exists()


def test_the_native_spec_reads_and_prints_back(tmp_path):
    """``convert:SOURCE:VARIANT:native`` keeps each block's G; the registry converts a local native model so."""
    from gqa_core.io.hub import save_pretrained
    from gqa_core.lens.models import ModelRegistry
    from gqa_core.lens.specs import NATIVE_G, SpecError, parse_spec
    with pytest.raises(SpecError, match='output-error chooses groups for one G; native keeps the groups'):
        parse_spec('convert:local:sapiens:gqa:native:output-error', ('gqa', 'kdgqa'))
    spec = parse_spec('convert:local:sapiens:kdgqa:native', ('gqa', 'kdgqa'))
    assert spec.num_kv_heads == NATIVE_G and spec.kv_heads is None and str(spec) == 'convert:local:sapiens:kdgqa:native'
    with pytest.raises(SpecError, match='G must be an integer 1..64 or native'):
        parse_spec('convert:local:sapiens:kdgqa:nativ', ('gqa', 'kdgqa'))
    save_pretrained(convert(native_model('sapiens2'), 'gqa'), tmp_path / 'sapiens')
    registry = ModelRegistry(model_dirs=[str(tmp_path)])
    loaded = registry.get('convert:local:sapiens:kdgqa:native')
    assert [b.attn.num_kv_heads for b in loaded.model.blocks] == [4, 2, 2, 4]
    assert loaded.grouping['variant'] == 'kdgqa' and loaded.grouping['num_kv_heads'] == [4, 2, 2, 4]


NATIVE_HUB_SCRIPT = '''
import json, sys, torch
from gqa_core.lens.models import ModelRegistry
registry = ModelRegistry()
x = torch.load(sys.argv[1], weights_only=True)
out = {}
for spec in ('convert:hf-hub:meta/sapiens-tiny:gqa:native', 'convert:hf-hub:meta/sapiens-tiny:kdgqa:native',
             'convert:hf-hub:meta/sapiens-tiny:gqa:1'):
    loaded = registry.get(spec)
    with torch.no_grad():
        out[spec] = dict(kv=[b.attn.num_kv_heads for b in loaded.model.blocks], summary=loaded.summary(),
                         out=loaded.model(x).tolist())
print('RESULT' + json.dumps(out))
'''


def test_a_timm_format_hub_repo_of_a_native_model_loads_as_it_is(tmp_path):
    """timm's own config.json and weights of Sapiens2's layout, served by the local HTTP Hub: the app's registry
    loads it with each block's KV heads (``:native``), as KDGQA at that G, or regrouped, outputs as timm's."""
    import json
    import os
    import subprocess
    import sys
    from safetensors.torch import save_file
    from support.hub_server import HubServer
    model = native_model('sapiens2')
    name, args = NATIVE['sapiens2']
    repo = tmp_path / 'hub' / 'meta' / 'sapiens-tiny'
    repo.mkdir(parents=True)
    model_args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    (repo / 'config.json').write_text(json.dumps(dict(
        architecture=name, num_classes=5, model_args=model_args,
        pretrained_cfg=dict(input_size=[3, 64, 48], mean=[0.5] * 3, std=[0.5] * 3, num_classes=5))))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, repo / 'model.safetensors')
    x = images(model)
    torch.save(x, tmp_path / 'x.pt')
    env = dict(os.environ, HF_HUB_OFFLINE='0', HF_HOME=str(tmp_path / 'hf-home'), HF_HUB_DISABLE_XET='1')
    with HubServer(tmp_path / 'hub') as server:
        env['HF_ENDPOINT'] = server.url
        proc = subprocess.run([sys.executable, '-c', NATIVE_HUB_SCRIPT, str(tmp_path / 'x.pt')], env=env,
                              capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split('RESULT', 1)[1])
    native = result['convert:hf-hub:meta/sapiens-tiny:gqa:native']
    assert native['kv'] == [4, 2, 2, 4] and 'G = 2–4 by block (4, 2, 2, 4)' in native['summary']
    with torch.no_grad():
        assert (torch.tensor(native['out']) - model(x)).abs().max() <= 1e-5
    assert result['convert:hf-hub:meta/sapiens-tiny:kdgqa:native']['kv'] == [4, 2, 2, 4]
    assert result['convert:hf-hub:meta/sapiens-tiny:gqa:1']['kv'] == [1, 1, 1, 1]


def test_the_export_of_a_native_analysis_keeps_each_layers_kv_heads(tmp_path):
    """The zip a visitor downloads (with a picked query): per layer as many key norms, shares and allocations as
    the layer has KV heads (NaN past them in the arrays, no row in the CSV, never a made-up idle head), the
    ablation's KV heads likewise, every array loadable."""
    import io
    import zipfile
    import numpy as np
    from gqa_core.io.hub import save_pretrained
    from gqa_core.lens.analysis import analyse
    from gqa_core.lens.export import export_zip
    from gqa_core.lens.images import load_image
    from gqa_core.lens.models import ModelRegistry
    from support import EXAMPLES_DIR
    save_pretrained(convert(native_model('sapiens2'), 'kdgqa'), tmp_path / 'sapiens')
    registry = ModelRegistry(model_dirs=[str(tmp_path)])
    image = load_image(str(EXAMPLES_DIR / 'grace_hopper.jpg')).image
    analysis = analyse(registry.get('local:sapiens'), image, deep=True)
    path = export_zip([analysis], 1, 'mean', 'mean', tmp_path / 'a.zip', registry, query='1, 2; 0, 0')
    with zipfile.ZipFile(path) as zf:
        assert any(n.endswith('picked_maps.json') for n in zf.namelist())
        folder = next(n.split('/')[0] for n in zf.namelist() if n.endswith('arrays.npz'))
        arrays = np.load(io.BytesIO(zf.read(f'{folder}/arrays.npz')), allow_pickle=False)
        for name in ('key_norms', 'shares', 'allocation', 'ablation_kv_zero'):
            kept = np.isfinite(arrays[name].astype(float)).sum(-1).tolist()
            assert kept == [4, 2, 2, 4], (name, arrays[name])
        assert np.nansum(arrays['allocation'], -1).tolist() == [4, 4, 4, 4]
        rows = zf.read(f'{folder}/allocations.csv').decode().splitlines()[1:]
        assert [int(row.split(',')[0]) for row in rows] == [0] * 4 + [1] * 2 + [2] * 2 + [3] * 4


def test_the_mcp_analysis_of_a_native_model_gives_each_layer_its_own_kv_heads(tmp_path):
    """The structured analysis an agent reads: per layer as many allocations, shares and key norms as the
    layer has KV heads (no padding, no NaN in the JSON)."""
    import json
    from gqa_core.io.hub import save_pretrained
    from gqa_core.lens.models import ModelRegistry
    from gqa_core.lens.tools import LensTools
    from support import EXAMPLES_DIR
    save_pretrained(convert(native_model('sapiens2'), 'kdgqa'), tmp_path / 'sapiens')
    tools = LensTools(ModelRegistry(model_dirs=[str(tmp_path)]))
    text = tools.analyse(str(EXAMPLES_DIR / 'grace_hopper.jpg'), 'local:sapiens')
    assert 'NaN' not in text
    answer = json.loads(text)
    model = answer['models'][0] if isinstance(answer, dict) and 'models' in answer else answer[0]
    allocation = [layer['allocation'] for layer in model['layers']]
    assert [len(a) for a in allocation] == [4, 2, 2, 4] and all(sum(a) == 4 for a in allocation)
    assert [len(layer['key_norms']) for layer in model['layers']] == [4, 2, 2, 4]
