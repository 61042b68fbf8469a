"""The recorder: complete, consistent, and invisible to the forward's result."""
import copy
import json

import numpy as np
import pytest
import timm
import torch
from timm.utils import AttentionExtract

from gqa_core import convert, gqa_layers, record
from gqa_core.core.apportion import query_to_kv

from support import tiny_vit


@pytest.mark.parametrize('variant,G', [('mha', None), ('gqa', 2), ('kdgqa', 3), ('dgqa', 3), ('pgqa', 3)])
@pytest.mark.parametrize('rows', ['prefix', 'full', 'none'])
def test_recording_does_not_change_output_and_is_consistent(variant, G, rows):
    model = convert(tiny_vit(depth=3, reg_tokens=2), variant, G)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(x)
        with record(model, attention=rows) as rec:
            recorded = model(x)
    assert torch.equal(plain, recorded)
    result = rec.result
    assert len(result.layers) == 3 and torch.equal(result.logits, plain)
    H, Gk, T = 6, G or 6, 16 + 3
    for layer in result.layers:
        assert layer.key_norms.shape == layer.allocation.shape == layer.shares.shape == (4, Gk)
        assert (layer.allocation.sum(-1) == H).all()
        assert torch.equal(layer.query_to_kv, query_to_kv(layer.allocation, H))
        assert torch.allclose(layer.shares.sum(-1), torch.ones(4))
        if rows == 'none':
            assert layer.attention is None
        else:
            assert layer.attention.shape == (4, H, T if rows == 'full' else 3, T)
            assert torch.allclose(layer.attention.sum(-1), torch.ones(()), atol=1e-5)


def test_full_maps_equal_timm_attention_extract_for_mha():
    timm.layers.set_fused_attn(False)
    try:
        torch.manual_seed(0)
        reference = timm.create_model('vit_tiny_patch16_224').eval()
    finally:
        timm.layers.set_fused_attn(True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = AttentionExtract(reference)(x)
        model = convert(copy.deepcopy(reference), 'mha')
        with record(model, attention='full') as rec:
            model(x)
    assert len(maps) == len(rec.result.layers) == 12
    for layer, (name, expected) in zip(rec.result.layers, maps.items()):
        assert (layer.attention - expected).abs().max() <= 1e-5, name


def test_key_norms_recorded_are_the_keys_frobenius_norms():
    model = convert(tiny_vit(depth=1), 'kdgqa', 3)
    x = torch.randn(2, 3, 32, 32)
    attn = model.blocks[0].attn
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        k = attn.qkv(model.blocks[0].norm1(tokens))[..., 48:72].reshape(2, 17, 3, 8)
        with record(model, attention='none') as rec:
            model(x)
    expected = k.pow(2).sum((1, 3)).sqrt()
    assert torch.allclose(rec.result.layers[0].key_norms, expected, rtol=1e-5)
    kept = rec.result.layers[0].allocation
    assert (kept[torch.arange(2), expected.argmin(-1)] == 0).all(), 'min-max gives the smallest key head 0 queries'


def test_recording_to_numpy_and_json_round_trip():
    model = convert(tiny_vit(depth=2), 'kdgqa', 2)
    with torch.no_grad(), record(model) as rec:
        model(torch.randn(2, 3, 32, 32))
    arrays = rec.result.to_numpy()
    assert arrays['allocation'].shape == (2, 2, 2) and arrays['attention'].shape == (2, 2, 6, 1, 17)
    assert arrays['grid_size'] == (4, 4) and arrays['num_prefix_tokens'] == 1
    decoded = json.loads(rec.result.to_json())
    assert np.array_equal(np.array(decoded['query_to_kv']), arrays['query_to_kv'])
    assert decoded['config']['variant'] == 'kdgqa'
    probs, idx = rec.result.topk(3)
    assert probs.shape == idx.shape == (2, 3) and (probs[:, 0] >= probs[:, 1]).all()


def test_recorder_detaches_and_rejects_bad_arguments():
    model = convert(tiny_vit(depth=1), 'gqa', 3)
    with record(model):
        pass
    assert all(layer.probe is None for layer in gqa_layers(model))
    with pytest.raises(ValueError, match='attention must be one of'):
        record(model, attention='rows')
    with pytest.raises(ValueError, match='call convert'):
        record(tiny_vit())


@pytest.mark.parametrize('class_token, reg_tokens, global_pool', [
    (c, r, p) for c in (True, False) for r in (0, 4) for p in ('map', 'avg', 'token') if not (p == 'token' and not c)])
def test_every_pooling_head_and_prefix_records_and_rolls_out(class_token, reg_tokens, global_pool):
    """Attention pooling with registers used to multiply a map over the patches by one over all tokens."""
    from timm.models.vision_transformer import VisionTransformer
    from gqa_core import convert, record
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=10,
                              class_token=class_token, reg_tokens=reg_tokens, global_pool=global_pool,
                              no_embed_class=reg_tokens > 0).eval()
    convert(model, 'kdgqa', 2)
    with torch.no_grad(), record(model, attention='prefix') as rec:
        model(torch.randn(2, 3, 32, 32))
    r = rec.result
    prefix = int(class_token) + reg_tokens
    assert r.num_prefix_tokens == prefix
    for rollout in r.rollout.values():
        assert rollout.shape == (2, prefix + 16) and torch.allclose(rollout.sum(-1), torch.ones(2), atol=1e-4)
    if global_pool == 'map':
        assert r.pool_attention.shape[-1] == prefix + 16
        assert torch.allclose(r.pool_attention.sum(-1), torch.ones_like(r.pool_attention.sum(-1)), atol=1e-5)
        assert float(r.pool_attention[..., :prefix].abs().sum()) == 0, 'timm pools the patches only'
        assert r.pool_patches().shape == (16,)
    else:
        assert r.pool_attention is None


@pytest.mark.parametrize('name,prefix', [('vit_small_patch14_reg4_dinov2', 5), ('vit_small_patch14_dinov2', 1)])
def test_prefix_rows_are_the_full_recordings_bitwise_and_normalisers_wait_for_a_view(name, prefix):
    """DINOv2 geometry (1,370 / 1,374 tokens, one block): the prefix rows come from a tile of 16 query rows, the
    full maps from tiles of hundreds, and they are the same numbers (bitwise on this machine's CPU kernels, where
    a class token's row alone, taking the matrix-vector kernel, is not: other BLAS builds may round a tile's rows
    differently, so the bound is one float32 rounding); the row normalisers cost nothing until a view recomputes
    a row from the kept queries and keys."""
    torch.manual_seed(0)
    model = convert(timm.create_model(name, depth=1), 'kdgqa', 3).eval()
    x = torch.randn(1, 3, 518, 518)
    with torch.no_grad(), record(model, attention='prefix', keep_qk=True) as rows:
        model(x)
    with torch.no_grad(), record(model, attention='full') as full:
        model(x)
    kept, maps = rows.result.layers[0], full.result.layers[0].attention
    T = maps.shape[-1]
    assert kept.attention.shape == (1, 6, prefix, T)
    torch.testing.assert_close(kept.attention, maps[:, :, :prefix], rtol=1.2e-7, atol=1e-9)
    assert kept.log_norm is None
    row = kept.query_row(700)
    assert kept.log_norm is not None and kept.log_norm.shape == (1, 6, T)
    assert torch.allclose(row.sum(-1), torch.ones(6), atol=1e-5)
    assert torch.allclose(row, maps[0, :, 700], atol=2e-3), 'float16 queries and keys'
