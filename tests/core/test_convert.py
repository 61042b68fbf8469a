"""convert()/revert() on real timm models."""
import copy

import pytest
import timm
import torch

from gqa_core import GroupedQueryAttention, convert, gqa_attention_layer, grouping_config, kv_cache_bytes, revert

from support import tiny_vit


def test_mha_conversion_reproduces_timm_vit_small(vit_small):
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    converted = convert(copy.deepcopy(vit_small), 'mha')
    with torch.no_grad():
        assert (converted(x) - vit_small(x)).abs().max() <= 1e-5
    assert grouping_config(converted)['num_kv_heads'] == 6


def test_gqa_kv_weights_are_exact_block_means_and_rest_untouched(vit_small):
    converted = convert(copy.deepcopy(vit_small), 'gqa', 3)
    H, d, G = 6, 64, 3
    for old, new in zip(vit_small.blocks, converted.blocks):
        w, b = old.attn.qkv.weight, old.attn.qkv.bias
        q, k, v = w.split(H * d)
        nq, nk, nv = new.attn.qkv.weight.split([H * d, G * d, G * d])
        assert torch.equal(nq, q)
        for pooled, full in ((nk, k), (nv, v)):
            for g in range(G):
                expected = (full[(2 * g) * d:(2 * g + 1) * d] + full[(2 * g + 1) * d:(2 * g + 2) * d]) / 2
                assert torch.allclose(pooled[g * d:(g + 1) * d], expected, atol=0, rtol=1e-6)
        bk = b[H * d:2 * H * d].view(G, 2, d).mean(1).flatten()
        assert torch.equal(new.attn.qkv.bias[H * d:(H + G) * d], bk)
        assert torch.equal(new.attn.proj.weight, old.attn.proj.weight)
    old_state, new_state = vit_small.state_dict(), converted.state_dict()
    for name, tensor in old_state.items():
        if '.attn.qkv.' not in name:
            assert torch.equal(new_state[name], tensor), name
    assert torch.equal(converted.norm.weight, vit_small.norm.weight)


def test_deit_tiny_register_and_pooled_vits_convert_and_record():
    from gqa_core import record
    models = [
        timm.create_model('deit_tiny_patch16_224'),
        tiny_vit(reg_tokens=4, no_embed_class=True),
        tiny_vit(class_token=False, global_pool='avg'),
    ]
    for model in models:
        model.eval()
        H = model.blocks[0].attn.num_heads
        x = torch.randn(1, 3, *model.patch_embed.img_size)
        reference = copy.deepcopy(model)
        convert(model, 'kdgqa', H // 3 if H % 3 == 0 else H // 2)
        with torch.no_grad(), record(model) as rec:
            out = model(x)
        assert out.shape == reference(x).shape
        rows = max(model.num_prefix_tokens, 1)
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        assert rec.result.layers[0].attention.shape[-2:] == (rows, tokens)


def test_not_a_vit_and_bad_group_counts_raise_value_error():
    with pytest.raises(ValueError, match='VisionTransformer.*ResNet'):
        convert(timm.create_model('resnet18'), 'gqa', 2)
    with pytest.raises(ValueError, match='num_kv_heads=4 must be a positive divisor of the 6 heads'):
        convert(tiny_vit(), 'gqa', 4)
    with pytest.raises(ValueError, match="unknown variant 'gqb'"):
        convert(tiny_vit(), 'gqb', 3)
    model = convert(tiny_vit(), 'gqa', 3)
    with pytest.raises(ValueError, match='has G=3, its K/V pooled by a conversion'):
        convert(model, 'gqa', 2)


def test_policy_switch_at_same_g_keeps_weights_and_revert_is_equivalent():
    model = convert(tiny_vit(), 'gqa', 2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        gqa_out = model(x)
        switched = convert(copy.deepcopy(model), 'pgqa', 2)
        assert torch.equal(switched(x), gqa_out)
        plain = revert(copy.deepcopy(model))
        assert all(type(b.attn).__name__ == 'Attention' for b in plain.blocks)
        assert (plain(x) - gqa_out).abs().max() <= 1e-5
    with pytest.raises(ValueError, match='no fixed grouping'):
        revert(convert(tiny_vit(), 'kdgqa', 3))


def test_a_policy_change_at_the_same_g_keeps_the_kv_weights_from_every_policy(registry):
    """From KDGQA (no fixed grouping) and DGQA (a learned, uneven allocation) as from GQA: the new policy gets the
    same K/V heads, bit for bit. Before, KDGQA refused and DGQA's K/V were re-pooled across its groups."""
    from gqa_core.core.attention import _qkv_tensors
    for source in ('embedded/kdgqa', 'embedded/dgqa-diff', 'embedded/gqa'):
        model = registry.get(source).model
        for variant in ('gqa', 'kdgqa', 'pgqa'):
            switched = convert(copy.deepcopy(model), variant)
            for before, after in zip(model.blocks, switched.blocks):
                assert after.attn.policy.name == variant and after.attn.num_kv_heads == before.attn.num_kv_heads
                for i in (1, 2):  # k and v
                    assert torch.equal(_qkv_tensors(after.attn)[0][i], _qkv_tensors(before.attn)[0][i]), source
    uneven = registry.get('embedded/dgqa-diff').model
    assert any(b.attn.policy.allocation.unique().numel() > 1 for b in uneven.blocks), 'the test needs DGQA groups'
    with pytest.raises(ValueError, match='its KDGQA grouping is not consecutive and fixed; calibrate from the multi'):
        convert(copy.deepcopy(registry.get('embedded/kdgqa').model), 'gqa', init='calibrated',
                calibration=torch.randn(2, 3, 32, 32))


def test_mha_round_trip_back_to_timm_is_exact():
    model = tiny_vit()
    original = copy.deepcopy(model.state_dict())
    revert(convert(model, 'mha'))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_attn_layer_at_construction_and_config_recovery():
    model = timm.create_model('vit_tiny_patch16_224', attn_layer=gqa_attention_layer('dgqa', 1, stat='diff',
                                                                                      window=10))
    assert all(isinstance(b.attn, GroupedQueryAttention) for b in model.blocks)
    config = grouping_config(model)
    assert config == dict(variant='dgqa', num_kv_heads=1, compat='paper', seed=0, stat='diff', window=10, beta=0.9)
    assert model.blocks[0].attn.qkv.out_features == 192 + 2 * 64


def test_kv_cache_bytes_scale_with_g(vit_small):
    mha = kv_cache_bytes(vit_small)
    assert mha == 12 * 2 * 384 * 197 * 2
    assert kv_cache_bytes(convert(copy.deepcopy(vit_small), 'gqa', 3)) * 2 == mha
