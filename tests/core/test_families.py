"""The ViT families beyond timm's VisionTransformer, with random weights: EVA-style attention with RoPE (DINOv3,
EVA-02, Perception Encoder), BEiT's relative position bias, SigLIP's attention-pooling ViT, and the Qwen3 and
DeepSeek VLM vision towers (classifiers wrapping their encoder, and the encoders themselves)."""
import copy

import pytest
import timm
import torch

from gqa_core import GroupedQueryAttention, convert, record, revert
from gqa_core.core.attention import out_projection
from gqa_core.core.vit import block_context, block_inputs, blocks_of, model_output, num_tokens
from support import model_images as images, perturbed_model as perturbed

SMALL = dict(embed_dim=64, depth=2, num_heads=4)
# Gemma4 has no fixed image size: the test size is its preprocessing's
GEMMA4 = dict(head_dim=16, intermediate_size=128, pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))
NAFLEX_64 = dict(pretrained_cfg_overlay=dict(input_size=(3, 64, 64)))  # NaFlexVit takes any size: its data config's
# (timm name, constructor arguments beyond SMALL): every attention layout GQA Lens converts
FAMILIES = {
    'dinov3': ('vit_small_patch16_dinov3', dict(img_size=64)),  # EvaAttention, 4 registers, rotate-half RoPE
    'dinov3-qkvb': ('vit_small_patch16_dinov3_qkvb', dict(img_size=64)),  # + q/v biases, the k bias a fixed zero
    'eva02': ('eva02_tiny_patch14_224', dict(img_size=56)),  # RoPE (cat), SwiGLU, q/v biases
    'eva02-unfused': ('eva02_tiny_patch14_224', dict(img_size=56, qkv_fused=False)),  # separate q/k/v projections
    'eva02-qknorm': ('eva02_tiny_patch14_224', dict(img_size=56, qk_norm=True)),  # q/k LayerNorms per head
    'pe': ('vit_pe_core_tiny_patch16_384', dict(img_size=64, attn_pool_num_heads=4)),  # AttentionRope, map pool
    'beit': ('beit_base_patch16_224', dict(img_size=64)),  # a relative position bias table per layer
    'beit-shared': ('beit_base_patch16_224', dict(img_size=64, use_rel_pos_bias=False,
                                                  use_shared_rel_pos_bias=True)),  # one table for all layers
    'siglip': ('vit_base_patch16_siglip_224', dict(img_size=64)),  # timm ViT with an attention-pooling head
    # Gemma4Attention: q/k/v RMS norms, 2D RoPE, scale 1, clippable linears; an encoder in a classifier wrapper
    'gemma4': ('gemma4_vit_167m', dict(GEMMA4, num_classes=10)),
    'gemma4-enc': ('gemma4_vit_570m_enc', dict(GEMMA4, pooling_kernel_size=2)),  # soft-token pool, standardize
    'hybrid': ('vit_tiny_r_s16_p8_224', dict(img_size=128)),  # timm ViT over a ResNetV2 stem's features (HybridEmbed)
    # timm's relpos ViT: a relative position bias module per layer (RelPosAttention.rel_pos), or one for the model
    'relpos-cls': ('vit_relpos_medium_patch16_cls_224', dict(img_size=64)),  # log-coord MLP bias, class token
    'relpos-rpn': ('vit_relpos_medium_patch16_rpn_224', dict(img_size=64)),  # residual post-norm blocks
    'relpos-shared': ('vit_srelpos_small_patch16_224', dict(img_size=64)),  # one MLP bias shared by all layers
    'relpos-bias': ('vit_relpos_base_patch16_clsgap_224', dict(img_size=64, rel_pos_type='bias')),  # a bias table
    # NaFlexVit on image tensors: its data config sets the image size, its position table is resized to the grid
    'naflex': ('naflexvit_base_patch16_radio_v3', dict(pos_embed_grid_size=(8, 8), **NAFLEX_64)),  # class token,
    # 7 registers, class-token pooling, the table resized bilinearly to a square and cropped (C-RADIO)
    'naflex-rope': ('naflexvit_base_patch16_parfac_gap', dict(pos_embed_grid_size=(4, 4), rope_type='axial',
                                                              **NAFLEX_64)),  # factorized table, AttentionRope, avg
    'naflex-siglip': ('naflexvit_base_patch16_siglip', dict(pos_embed_grid_size=(4, 4), **NAFLEX_64)),  # map pool
    # VLM vision towers: a classifier wrapping its encoder (model.encoder.blocks), or the encoder itself (*_enc:
    # the projector's tokens out); RoPE and a learned position grid resampled to the input's grid
    'qwen3': ('qwen3_vit_88m', dict(img_size=64, pos_embed_grid_size=6, num_classes=10)),  # mean, norm, head
    'qwen3-merge': ('qwen3_vit_88m_merge', dict(img_size=64, out_features=32)),  # the 2x2 merger, headless
    'qwen3-enc': ('qwen3_vit_88m_enc', dict(img_size=64, out_features=32)),  # (B, 4, 32) merged tokens out
    'deepseek': ('deepseek_vit_412m', dict(img_size=56, patch_size=14, num_classes=10)),  # RMSNorm, SwiGLU
    'deepseek-align': ('deepseek_vit_412m_align', dict(img_size=56, patch_size=14, out_features=32,
                                                       num_classes=10)),  # 3x3 aligner over a zero-padded grid
    'deepseek-enc': ('deepseek_vit_412m_enc', dict(img_size=56, patch_size=14, out_features=32)),
    # talking heads over the patches, class attention after them (LayerScale at 1: the test sees the attention)
    'cait': ('cait_xxs24_224', dict(img_size=64, init_values=1.0)),
}


def family_model(key: str) -> torch.nn.Module:
    """The family's model, small, with every parameter perturbed (biases and position tables are zero at
    init; the test must see them)."""
    return perturbed_model(*FAMILIES[key])


def perturbed_model(name: str, extra: dict) -> torch.nn.Module:
    """timm's ``name`` at SMALL size with ``extra`` arguments, every parameter perturbed (seeded)."""
    return perturbed(name, **SMALL, **extra)


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_mha_conversion_equals_timms_model(key):
    model = family_model(key)
    x = images(model)
    converted = convert(copy.deepcopy(model), 'gqa', blocks_of(model)[0].attn.num_heads)
    assert all(isinstance(b.attn, GroupedQueryAttention) for b in blocks_of(converted))
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-4


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_pooled_model_reverts_to_timms_own_layer_with_the_same_output(key):
    model = family_model(key)
    x = images(model)
    kind = type(blocks_of(model)[0].attn)
    converted = convert(copy.deepcopy(model), 'gqa', blocks_of(model)[0].attn.num_heads // 2)
    with torch.no_grad():
        pooled = converted(x)
        reverted = revert(converted)
        assert all(type(b.attn) is kind for b in blocks_of(reverted))
        assert (reverted(x) - pooled).abs().max() <= 1e-5
        assert (pooled - model(x)).abs().max() > 1e-3, 'pooling K/V changed the model (the test sees the weights)'


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_every_variant_runs_and_records(key):
    model = family_model(key)
    x = images(model)
    H = blocks_of(model)[0].attn.num_heads
    tokens = num_tokens(model)  # the blocks' tokens (CaiT's class token joins after them)
    for variant, options in (('gqa', {}), ('kdgqa', {}), ('dgqa', {'stat': 'ema', 'window': 1}), ('pgqa', {})):
        converted = convert(copy.deepcopy(model), variant, H // 2, **options)
        converted.train()
        converted(x).sum().backward()  # a training step's forward and backward
        converted.eval()
        with torch.no_grad(), record(converted, attention='full') as rec:
            out = converted(x)
        assert torch.isfinite(out).all()
        maps = rec.result.layers[0].attention
        assert maps.shape[-1] == tokens
        mix = blocks_of(converted)[0].attn.proj_w  # talking heads: rows summing to 1, then mixed across heads
        sums = torch.ones(()) if mix is None else (mix.weight.sum(1) + tokens * mix.bias)[None, :, None]
        assert torch.allclose(torch.as_tensor(maps).sum(-1), sums, atol=1e-4), variant


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_block_inputs_and_context_rebuild_the_forward(key):
    """What the advisor and ablation run block by block is the model's own forward."""
    model = convert(family_model(key), 'kdgqa', 2)
    x = images(model)
    with torch.no_grad():
        rebuilt = model_output(model, block_inputs(model, x), 0, batch=8, context=block_context(model, x))
        assert (rebuilt - model(x)).abs().max() <= 1e-5


@pytest.mark.parametrize('key,size', [('qwen3', (64, 128)), ('qwen3-merge', (96, 96)), ('qwen3-enc', (96, 96)),
                                      ('deepseek-align', (70, 70)), ('deepseek-enc', (84, 84))])
def test_a_vlm_tower_is_taken_apart_at_another_input_size(key, size):
    """The towers take any size (a 6 x 6 grid; 5 x 5, which the DeepSeek aligner zero-pads; 4 x 8 for a mean-pooled
    classifier): the block-by-block forward is the model's own, and the recording sees that grid."""
    model = convert(family_model(key), 'kdgqa', 2)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), record(model, attention='full') as rec:
        out = model(x)
        rebuilt = model_output(model, block_inputs(model, x), 0, batch=8, context=block_context(model, x))
    assert (rebuilt - out).abs().max() <= 1e-5
    grid = tuple(s // (14 if key.startswith('deepseek') else 16) for s in size)
    assert rec.result.grid_size == grid and rec.result.layers[0].attention.shape[-1] == grid[0] * grid[1]


@pytest.mark.parametrize('key', ['qwen3-merge', 'deepseek-enc'])
def test_a_projector_refuses_tokens_of_a_grid_it_cannot_tell(key):
    """The merger / aligner reshape the tokens to their grid; run block by block, the tokens alone say it only
    when the grid has the model's own aspect, so another one is refused, not guessed."""
    model = family_model(key)
    x = torch.randn(1, 3, 64, 128) if key.startswith('qwen3') else torch.randn(1, 3, 56, 112)
    with torch.no_grad(), pytest.raises(ValueError, match="tokens make no grid of the model's 4 x 4 aspect"):
        model_output(model, block_inputs(model, x), 0, batch=8, context=block_context(model, x))


@pytest.mark.parametrize('name', ['qwen3_vit_88m_enc', 'deepseek_vit_412m_enc'])
@pytest.mark.parametrize('pool', ['', 'avg'])
def test_a_tower_encoder_without_its_projector_is_rebuilt_and_taken_apart(name, pool):
    """An encoder's other outputs (its NHWC tokens, their mean): the geometry rebuilds it, block by block it is
    the model's own forward."""
    from gqa_core.io.config import backbone_of
    size = dict(img_size=56, patch_size=14) if name.startswith('deepseek') else dict(img_size=64)
    model = convert(perturbed_model(name, dict(size, global_pool=pool)), 'kdgqa', 2)
    x = images(model)
    assert backbone_of(model)[1]['global_pool'] == pool
    with torch.no_grad():
        rebuilt = model_output(model, block_inputs(model, x), 0, batch=8, context=block_context(model, x))
        assert rebuilt.shape == model(x).shape and (rebuilt - model(x)).abs().max() <= 1e-5


def test_a_tower_with_an_activation_a_config_cannot_name_is_refused():
    from gqa_core.io.config import backbone_of
    model = convert(timm.create_model('qwen3_vit_88m', img_size=64, act_layer=torch.nn.GELU, **SMALL), 'gqa', 2)
    with pytest.raises(ValueError, match=r"MLP activation GELU\(approximate='none'\) is not the tower's GELU"):
        backbone_of(model)


@pytest.mark.parametrize('name,args', [('vit_small_patch16_rope_mixed_224', dict(img_size=64)),
                                       ('naflexvit_base_patch16_gap', dict(rope_type='mixed'))])
def test_learned_per_head_rope_is_refused_and_the_model_left_as_it_was(name, args):
    torch.manual_seed(0)
    model = timm.create_model(name, **args, **SMALL).eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match='per-head frequencies'):
        convert(model, 'gqa', 2)
    assert all(type(b.attn).__name__ == 'AttentionRope' for b in blocks_of(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_qv_bias_layout_keeps_the_key_bias_a_fixed_zero():
    """EVA / BEiT hold no key bias (a zero buffer); the grouped layer keeps it so, and pools q/v biases."""
    model = family_model('dinov3-qkvb')
    attn = blocks_of(model)[0].attn
    new = GroupedQueryAttention.from_attention(attn, 'gqa', 2)
    assert 'k_bias' not in dict(new.named_parameters()) and torch.count_nonzero(new.k_bias) == 0
    assert torch.equal(new.q_bias, attn.q_bias)
    assert torch.allclose(new.v_bias, attn.v_bias.view(2, 2, -1).mean(1).flatten())


def test_gemma4_clamps_are_kept_where_they_bind_and_switched_off_clamps_are_refused():
    """Gemma4's clippable linears clamp each projection's input and output to one scalar pair shared by every head:
    the grouped layer clamps the same (exact at G = H, bounds binding), a pooled KV head is clamped as the heads it
    stands for (revert is exact), and a model whose clamps were switched off is refused whole."""
    model = family_model('gemma4')
    with torch.no_grad():
        for name, bound in model.named_buffers():
            if name.endswith(('_min', '_max')):
                bound.fill_(-1.0 if name.endswith('_min') else 1.0)  # binding: the projections see values past 1
    x = images(model)
    with torch.no_grad():
        expected = model(x)
        unclamped = copy.deepcopy(model)
        unclamped.encoder.set_clamp_enabled(False)
        assert (unclamped(x) - expected).abs().max() > 1e-2, 'the clamps bind'
        converted = convert(copy.deepcopy(model), 'gqa', 4)
        assert (converted(x) - expected).abs().max() <= 1e-5
        pooled = convert(copy.deepcopy(model), 'gqa', 2)
        out = pooled(x)
        assert (revert(pooled)(x) - out).abs().max() <= 1e-5
    before = copy.deepcopy(unclamped.state_dict())
    with pytest.raises(ValueError, match=r'block 0 \(Gemma4Block\): attn.q_proj holds clamp bounds'):
        convert(unclamped, 'gqa', 2)
    assert all(type(b.attn).__name__ == 'Gemma4Attention' for b in blocks_of(unclamped))
    assert all(torch.equal(before[k], v) for k, v in unclamped.state_dict().items())


VARIANTS = (('gqa', {}), ('kdgqa', {}), ('dgqa', {'stat': 'diff', 'window': 1}), ('dgqa', {'stat': 'ema', 'window': 1}),
            ('pgqa', {}))


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_save_and_load_every_variant_bit_identical(tmp_path, key):
    """timm.create_model -> convert -> save_pretrained -> from_pretrained with no GQA Lens constructor: the
    config (timm name and the geometry read from the modules, checked on the meta device) rebuilds the model."""
    import json
    from gqa_core import from_pretrained, grouping_config, save_pretrained
    model = family_model(key)
    x = images(model)
    H = blocks_of(model)[0].attn.num_heads
    for i, (variant, options) in enumerate(VARIANTS):
        converted = convert(copy.deepcopy(model), variant, H // 2, **options)
        converted.train()
        converted(x)  # DGQA decides an allocation in training; it must travel with the weights
        converted.eval()
        folder = tmp_path / str(i)
        save_pretrained(converted, folder)
        assert json.loads((folder / 'config.json').read_text())['backbone'] == FAMILIES[key][0]
        loaded = from_pretrained(str(folder)).eval()
        assert grouping_config(loaded) == grouping_config(converted)
        with torch.no_grad():
            assert torch.equal(loaded(x), converted(x)), variant
        mine, theirs = converted.state_dict(), loaded.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def _orders(H: int, depth: int) -> list:
    return [[(h * 3 + i) % H for h in range(H)] if H % 3 else list(reversed(range(H))) for i in range(depth)]


@pytest.mark.parametrize('key', sorted(set(FAMILIES) - {'beit-shared', 'relpos-shared'}))  # a bias shared by all layers
def test_permuting_heads_keeps_timms_layer_the_same_function(key):
    from gqa_core.core.attention import permute_heads
    model = family_model(key)
    x = images(model)
    H = blocks_of(model)[0].attn.num_heads
    permuted = copy.deepcopy(model)
    for block, order in zip(blocks_of(permuted), _orders(H, len(blocks_of(model)))):
        permute_heads(block.attn, order)
    with torch.no_grad():
        expected = model(x)  # a sum in another order: float rounding grows with the output (Gemma4's pool: x sqrt(D))
        assert (permuted(x) - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max()))
        assert not torch.equal(out_projection(blocks_of(permuted)[0].attn).weight,
                               out_projection(blocks_of(model)[0].attn).weight)


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_any_head_order_at_g_equal_h_is_the_model_and_reverts_to_it(key):
    """Heads reordered per layer before pooling (what the advisor's groupings do) keep the function at G = H --
    BEiT's model-wide shared bias follows each layer's order -- and revert gives timm's layers in the original
    order."""
    model = family_model(key)
    x = images(model)
    H = blocks_of(model)[0].attn.num_heads
    converted = convert(copy.deepcopy(model), 'gqa', H, head_order=_orders(H, len(blocks_of(model))))
    with torch.no_grad():
        assert (converted(x) - model(x)).abs().max() <= 1e-4
        reverted = revert(converted)
        assert (reverted(x) - model(x)).abs().max() <= 1e-4
    assert torch.allclose(out_projection(blocks_of(reverted)[0].attn).weight,
                          out_projection(blocks_of(model)[0].attn).weight, atol=1e-6)


@pytest.mark.parametrize('key', sorted(set(FAMILIES) - {'cait'}))  # talking heads: refused (test below)
def test_advisor_scores_the_layer_the_model_runs(key):
    """The advisor's error of the consecutive grouping is the layer's real output error (RoPE and position
    bias included), its advice is never worse, and the advised model converts."""
    from gqa_core.core.head_order import advise_head_order
    model = family_model(key)
    x = images(model, 4)
    H = blocks_of(model)[0].attn.num_heads
    advice = advise_head_order(model, H // 2, x)
    assert all(a <= c for a, c in zip(advice.error_advised, advice.error_consecutive))
    block = blocks_of(model)[0]
    with torch.no_grad():
        inputs = block.norm1(block_inputs(model, x))
        context = block_context(model, x)
        pooled = GroupedQueryAttention.from_attention(block.attn, 'gqa', H // 2)
        real = (pooled(inputs, **context) - block.attn(inputs, **context)).double().square().sum()
    assert float(real) == pytest.approx(advice.error_consecutive[0], rel=1e-3)
    converted = convert(copy.deepcopy(model), 'kdgqa', H // 2, head_order='output-error', calibration=x)
    assert [b.attn.source_heads for b in blocks_of(converted)] == advice.permutations


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_removing_a_kv_head_changes_the_output_in_one_batched_forward(key):
    from gqa_core.core.ablation import ablate
    model = convert(family_model(key), 'gqa', 2)
    x = images(model, 1).expand(3, -1, -1, -1)
    L = len(blocks_of(model))
    kv = torch.zeros(3, L, 2, dtype=torch.bool)
    kv[1, 0, 0] = kv[2, L - 1, 1] = True
    with torch.no_grad(), ablate(model, kv_heads=kv):
        out = model(x)
    assert not torch.allclose(out[1], out[0]) and not torch.allclose(out[2], out[0])
    with torch.no_grad():
        assert torch.allclose(out[0], model(x[:1])[0], atol=1e-5)


POOLED = ('siglip', 'pe', 'naflex-siglip')  # the families with an attention-pooling head


@pytest.mark.parametrize('key', POOLED)
def test_attention_pooling_query_is_recorded_as_the_pool_computes_it(key):
    """The pooling query's recorded attention, applied to the pool's values, gives the pool's own output; the
    rollout is seen from that query (what the pooled output reads), not from the mean over queries."""
    from gqa_core.core.vit import POOL_QUERY
    model = convert(family_model(key), 'kdgqa', 2)
    x = images(model)
    pool = model.attn_pool
    seen = {}
    hook = pool.register_forward_pre_hook(lambda m, args: seen.update(tokens=args[0]))
    with torch.no_grad(), record(model, attention='full', rollout=('mean',)) as rec:
        model(x)
    hook.remove()
    r = rec.result
    tokens = seen['tokens']
    B, T, C = tokens.shape
    attn = r.pool_attention  # (B, P, T)
    assert attn.shape == (B, pool.num_heads, T) and torch.allclose(attn.sum(-1), torch.ones(()), atol=1e-5)
    with torch.no_grad():
        v = pool.kv(tokens).reshape(B, T, 2, pool.num_heads, pool.head_dim)[:, :, 1].transpose(1, 2)
        out = pool.proj((attn[:, :, None] @ v).transpose(1, 2).reshape(B, 1, C))
        out = (out + pool.mlp(pool.norm(out)))[:, 0]
        assert torch.allclose(out, pool(tokens), atol=1e-5)
    assert r.rollout_label == POOL_QUERY
    full = torch.stack([layer.attention[0].mean(0) for layer in r.layers])
    product = torch.eye(T)
    for a in full:
        a = 0.5 * a + 0.5 * torch.eye(T)
        product = (a / a.sum(-1, keepdim=True)) @ product
    expected = attn[0].mean(0) @ product
    assert torch.allclose(r.rollout['mean'][0], expected, atol=1e-5)
    assert not torch.allclose(r.rollout['mean'][0], product.mean(0), atol=1e-4), 'not the mean over queries'


def test_the_app_shows_every_view_of_every_family_over_http(app_server):
    """Each family saved as a local model folder, served by the real app: every view of /run answers with a
    picture or a figure, or one line saying why it does not apply -- never an error."""
    import zipfile
    import numpy as np
    from gradio_client import Client, handle_file
    from support.answers import columns, unwrap
    from support import ALLOWED_MODELS, EXAMPLES_DIR
    from gqa_core import save_pretrained
    from gqa_core.lens.views import VIEWS
    client = Client(app_server[0], verbose=False)
    image = handle_file(str(EXAMPLES_DIR / 'grace_hopper.jpg'))
    for key in sorted(FAMILIES):
        model = family_model(key)
        H = blocks_of(model)[0].attn.num_heads
        save_pretrained(convert(copy.deepcopy(model), 'mha'), ALLOWED_MODELS / f'family-{key}-mha')
        save_pretrained(convert(model, 'kdgqa', H // 2), ALLOWED_MODELS / f'family-{key}-kdgqa')
        specs = [f'local:family-{key}-mha', f'local:family-{key}-kdgqa', '(none)', '(none)']
        for view in VIEWS.values():
            out = client.predict(image, *specs, view.label, 0, 'mean', 'mean', 'zero', True, api_name='/run')
            status = out[0]
            assert '⚠️' not in status or 'shrunk' in status, (key, view.label, status)
            for column in columns(out)[:2]:
                drawn = column['picture'] is not None or column['figure'] is not None
                assert drawn or (column['caption'].startswith('*') and len(column['caption']) > 10), \
                    (key, view.label, column['caption'])
                assert 'Traceback' not in column['caption'] and '/tmp' not in column['caption']
        pooled = client.predict(image, *specs, 'attention pool', 0, 'mean', 'mean', 'zero', False, api_name='/run')
        has_pool = key in POOLED
        assert (columns(pooled)[1]['picture'] is not None) == has_pool, key
        archive = unwrap(client.predict(0, 'mean', 'mean', api_name='/export'))
        with zipfile.ZipFile(archive) as zf, np.load(zf.open(f'1_local_family-{key}-kdgqa/arrays.npz')) as arrays:
            assert arrays['full_layer0'].shape[-1] == arrays['full_layer0'].shape[-2] > 1
            assert ('pool_attention' in arrays.files) == has_pool, key


@pytest.mark.parametrize('name,match', [
    ('vit_pwee_patch16_reg1_gap_256', r'block 0 \(ParallelScalingBlock\) has no single `attn` module'),
    ('vit_dwee_patch16_reg1_gap_256', r'block 0 \(Block\): attention DiffAttention is not one of'),
    ('vit_small_patch16_rope_mixed_224', 'learned per-head frequencies'),
    ('samvit_base_patch16', r'VisionTransformerSAM is refused: SAM\'s blocks attend within 14 x 14 windows'),
])
def test_what_is_still_refused_is_named_and_the_model_left_whole(name, match):
    """What bench/coverage.py counts as refused: a ValueError naming the block (or the model) and the reason."""
    torch.manual_seed(0)
    model = timm.create_model(name, depth=2, img_size=64).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        convert(model, 'gqa', 2)
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_config_guard_names_why_a_refused_module_is_refused():
    from gqa_core.io.safe_config import ConfigError, check_backbone
    with pytest.raises(ConfigError, match=r"'samvit_base_patch16.sa1b' is not a timm Vision Transformer GQA Lens "
                                          r"opens \(SAM's blocks attend within 14 x 14 windows"):
        check_backbone('samvit_base_patch16.sa1b')


POOLS = [(family, cls, reg, pool) for family in ('vit', 'eva') for cls in (True, False) for reg in (0, 4)
         for pool in ('map', 'avg', 'token') if cls or pool != 'token']


@pytest.mark.parametrize('family,class_token,registers,pool', POOLS)
def test_every_pooling_head_with_every_prefix_is_recorded_whole(family, class_token, registers, pool):
    """Every combination of pooling head and prefix tokens timm builds (ViT and Eva): the rollout and the pooling
    query's map cover all T tokens, rows sum to 1, the prefix tokens get no pooling weight where the pool skips
    them, and the picked view shows the pool's query."""
    import numpy as np
    from gqa_core.lens.pick import POOL_QUERY, pick_names, picked_maps
    torch.manual_seed(0)
    prefix = dict(class_token=class_token, reg_tokens=registers) if family == 'vit' else dict(
        class_token=class_token, num_reg_tokens=registers)
    name = 'vit_small_patch16_224' if family == 'vit' else 'eva02_tiny_patch14_224'
    model = timm.create_model(name, img_size=32, patch_size=8, embed_dim=48, num_heads=6, depth=2, num_classes=5,
                              global_pool=pool, **prefix).eval()
    model = convert(model, 'kdgqa', 3)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record(model, attention='prefix', rollout=('mean', 'max'), keep_qk=True) as rec:
        logits = model(x)
    r = rec.result
    T = int(class_token) + registers + 16
    assert r.num_prefix_tokens == T - 16 and torch.allclose(r.logits, logits)
    assert all(rollout.shape == (1, T) for rollout in r.rollout.values())
    assert torch.allclose(r.rollout['mean'].sum(-1), torch.ones(()), atol=1e-4)
    if pool != 'map':
        assert r.pool_attention is None and POOL_QUERY not in pick_names(r)
        return
    assert r.pool_attention.shape == (1, 6, T) and torch.allclose(r.pool_attention.sum(-1), torch.ones(()), atol=1e-5)
    if family == 'vit' and not model.pool_include_prefix and T > 16:
        assert r.pool_attention[..., :T - 16].abs().max() == 0, 'timm pools the patches only'
    maps = picked_maps(r, 1, [POOL_QUERY])
    assert maps.rows.shape == (6, 16) and np.all(np.isfinite(maps.rows))


def test_a_hybrid_token_covers_its_stems_stride_times_the_patch():
    """A hybrid ViT is timm's VisionTransformer told apart by its HybridEmbed: its token covers the stem's stride
    times the patch on the feature map (what deletion / insertion masks), and the stem reads the image channels."""
    from gqa_core.core.families.vision_transformer_hybrid import HybridFamily
    from gqa_core.core.vit import family, in_chans, token_grid, token_pixels
    hybrid, vit = family_model('hybrid'), family_model('siglip')
    assert isinstance(family(hybrid), HybridFamily) and not isinstance(family(vit), HybridFamily)
    for model in (hybrid, vit):
        pixels, grid = token_pixels(model), token_grid(model, None)
        assert tuple(p * g for p, g in zip(pixels, grid)) == tuple(model.patch_embed.img_size)
        assert in_chans(model) == 3
    assert token_pixels(hybrid) == (32, 32)  # a stride-4 stem, then 8 x 8 patches of its features


def test_mobileclip_image_encoder_converts_and_saves(tmp_path):
    """MobileCLIP's image encoder (vit_base_mci_224): a convolutional stem whose features are the tokens (no
    projection, its width fixed at 768 by the stem) -- equal at G = H, pooled saves and loads bit-identically."""
    from gqa_core import from_pretrained, save_pretrained
    model = perturbed('vit_base_mci_224', img_size=64, depth=1, num_classes=8)
    x = images(model)
    with torch.no_grad():
        assert (convert(copy.deepcopy(model), 'gqa', 12)(x) - model(x)).abs().max() <= 1e-4
    pooled = convert(model, 'gqa', 6)
    save_pretrained(pooled, tmp_path)
    loaded = from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), pooled(x))


def test_naflexvit_config_guard_admits_its_cfg_fields_and_nothing_else():
    """What the guard lets a config say to NaFlexVit is its constructor's (``NaFlexVitCfg`` fields taken as
    keyword arguments, plus ``img_size`` / ``in_chans`` / ``num_classes``), each bounded; a layer class, a loader
    option or an unknown RoPE type is refused by name, and what a model states of itself passes."""
    import dataclasses
    from timm.models.naflexvit import NaFlexVitCfg
    from gqa_core.core.families.naflexvit import NAFLEX_ARGS
    from gqa_core.io.config import backbone_of
    from gqa_core.io.safe_config import ConfigError, check_backbone_args
    fields = {f.name for f in dataclasses.fields(NaFlexVitCfg)} | {'img_size', 'in_chans', 'num_classes'}
    assert set(NAFLEX_ARGS) <= fields, set(NAFLEX_ARGS) - fields
    name = 'naflexvit_base_patch16_gap'
    for bad, match in (({'block_fn': 'Block'}, "'block_fn' is not an allowed key"),
                       ({'checkpoint_path': '/etc/passwd'}, 'not an allowed key'),
                       ({'rope_type': 'evil'}, 'rope_type must be'),
                       ({'pos_embed_grid_size': [4, 100_000]}, 'pos_embed_grid_size must be'),
                       ({'num_kv_heads': [1] * 65}, 'num_kv_heads must be')):
        with pytest.raises(ConfigError, match=match):
            check_backbone_args(bad, name)
    for key in ('naflex', 'naflex-rope', 'naflex-siglip'):
        arch, args, _ = backbone_of(convert(family_model(key), 'gqa', 2))
        assert arch == FAMILIES[key][0] and check_backbone_args(args, arch) == args


def test_naflexvit_tokens_are_counted_at_the_size_its_config_shows_it(tmp_path):
    """NaFlexVit takes any image size, so its tokens per image are its preprocessing's: a saved config asking
    for larger images than the server's token budget allows is refused before anything is built."""
    import json
    from gqa_core import save_pretrained
    from gqa_core.io.config import GQALensConfig
    from gqa_core.io.safe_config import Budget, ConfigError
    save_pretrained(convert(family_model('naflex-rope'), 'gqa', 2), tmp_path)
    data = json.loads((tmp_path / 'config.json').read_text())
    assert data['preprocessing']['input_size'] == [3, 64, 64]
    GQALensConfig.from_json(data, Budget(max_tokens=20))  # 16 patches and 4 registers
    data['preprocessing']['input_size'] = [3, 1024, 1024]
    with pytest.raises(ConfigError, match='4,100 tokens per image'):
        GQALensConfig.from_json(data, Budget())


def test_talking_heads_record_the_weights_that_multiply_v():
    """A talking-heads layer's recorded maps are its post-``proj_w`` weights: applied to the grouped values they
    give the layer's own output; rows recomputed from the kept queries and keys are the same rows."""
    from gqa_core.core.attention import route_kv
    model = convert(family_model('cait'), 'kdgqa', 2)
    attn = blocks_of(model)[1].attn
    x = images(model)
    seen = {}
    hooks = [attn.register_forward_pre_hook(lambda m, args: seen.update(x=args[0])),
             attn.register_forward_hook(lambda m, args, out: seen.update(out=out))]
    with torch.no_grad(), record(model, attention='full', keep_qk=True) as rec:
        model(x)
    for hook in hooks:
        hook.remove()
    layer = rec.result.layers[1]
    B, T, C = seen['x'].shape
    with torch.no_grad():
        v = attn.project(seen['x'])[2].view(B, T, attn.num_kv_heads, -1).transpose(1, 2)
        heads = layer.attention @ route_kv(v, layer.query_to_kv)  # (B, H, T, d)
        assert torch.allclose(attn.proj(heads.transpose(1, 2).reshape(B, T, C)), seen['out'], atol=1e-5)
    assert (layer.attention < 0).any() or not torch.allclose(layer.attention.sum(-1), torch.ones(()))
    assert torch.allclose(layer.query_row(5, 1), layer.attention[1, :, 5], atol=2e-2)
    assert torch.allclose(layer.key_column(7, 0), layer.attention[0, :, :, 7], atol=2e-2)


def test_cait_converts_its_patch_blocks_and_keeps_class_attention_exact():
    """The talking-heads blocks convert; the class-attention head stays timm's ClassAttn (and the head-ablation
    study reads the output through it); the head-order advisor refuses talking heads by block (its per-group
    costs assume heads that do not mix)."""
    from timm.models.cait import ClassAttn
    model = family_model('cait')
    converted = convert(copy.deepcopy(model), 'gqa', 2)
    assert all(type(b.attn) is ClassAttn for b in converted.blocks_token_only)
    assert [b.attn.num_kv_heads for b in blocks_of(converted)] == [2, 2]
    x = images(model, 4)
    with pytest.raises(ValueError, match=r'block 0: talking-heads attention'):
        convert(copy.deepcopy(model), 'gqa', 2, head_order='output-error', calibration=x)
    from gqa_core.lens.heads import ablation_study
    with torch.no_grad():  # the ablation's unablated score is read through the class-attention head
        study = ablation_study(converted, x[:1], target=3)
        assert study.base_score == pytest.approx(float(converted(x[:1]).softmax(-1)[0, 3]), rel=1e-5)
