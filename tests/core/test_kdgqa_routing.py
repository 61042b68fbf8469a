"""KDGQA's fast per-image routing (row gather, squared-sum key norms) computes what the original path computed:
``linalg.vector_norm`` key norms and K/V copied to every query head by advanced indexing."""
import copy

import pytest
import torch
import torch.nn.functional as F

from gqa_core import convert, record
from gqa_core.core import attention
from gqa_core.core.attention import route_kv, route_kv_rows
from gqa_core.core.vit import blocks_of
from test_families import FAMILIES, family_model, images


def _original_norms(k: torch.Tensor, attn_mask=None) -> torch.Tensor:
    assert attn_mask is None, 'these families pass images of one size: no padding mask'
    return torch.linalg.vector_norm(k.float(), dim=(-2, -1))


def _original_route_pair(k, v, query_to_kv):
    return route_kv(k, query_to_kv), route_kv(v, query_to_kv)


def _run(model, x):
    with torch.no_grad(), record(model, attention='prefix') as rec:
        out = model(x)
    return out, rec.result


@pytest.mark.parametrize('key', sorted(FAMILIES))
def test_fast_kdgqa_path_equals_the_original_path(key, monkeypatch):
    model = family_model(key)
    x = images(model, n=3)
    converted = convert(copy.deepcopy(model), 'kdgqa', blocks_of(model)[0].attn.num_heads // 2).eval()
    fast_out, fast = _run(converted, x)
    with monkeypatch.context() as m:
        m.setattr(attention, 'key_head_norms', _original_norms)
        m.setattr(attention, '_route_pair', _original_route_pair)
        old_out, old = _run(converted, x)
    allocations = torch.stack([layer.allocation for layer in fast.layers])
    assert (allocations != allocations[:, :1]).any() or (allocations != allocations[..., :1]).any(), \
        'the test needs uneven per-image allocations'
    for new_layer, old_layer in zip(fast.layers, old.layers):
        assert torch.equal(new_layer.allocation, old_layer.allocation)
        assert torch.equal(new_layer.query_to_kv, old_layer.query_to_kv)
        torch.testing.assert_close(new_layer.key_norms, old_layer.key_norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_out, old_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('layout', ['projection', 'contiguous'])
def test_row_gather_routes_exactly_like_indexing(layout):
    B, N, H, G, d = 3, 7, 6, 3, 4
    gen = torch.Generator().manual_seed(0)
    if layout == 'projection':  # k as the fused qkv projection's view (B, G, T, d) with strided heads
        k = torch.randn(B, N, (H + 2 * G) * d, generator=gen)[..., H * d:(H + G) * d].view(B, N, G, d).transpose(1, 2)
    else:
        k = torch.randn(B, G, N, d, generator=gen)
    table = torch.randint(0, G, (B, H), generator=gen).sort(-1).values
    routed = route_kv_rows(k, table)
    assert routed is not None and torch.equal(routed, route_kv(k, table))
    assert route_kv_rows(k.transpose(-2, -1), table) is None  # head dim not unit-stride: no row gather


def test_sdpa_on_row_gathered_kv_is_bitwise_the_indexed_one():
    B, N, H, G, d = 2, 9, 4, 2, 8
    gen = torch.Generator().manual_seed(3)
    proj = torch.randn(B, N, (H + 2 * G) * d, generator=gen)
    q, k, v = (t.view(B, N, -1, d).transpose(1, 2) for t in proj.split((H * d, G * d, G * d), -1))
    table = torch.tensor([[0, 0, 0, 1], [0, 1, 1, 1]])
    fast = F.scaled_dot_product_attention(q, *attention._route_pair(k, v, table))
    slow = F.scaled_dot_product_attention(q, route_kv(k, table), route_kv(v, table))
    assert torch.equal(fast, slow)
