"""Every policy equals the per-head loop of tests/support/reference.py (fp32, max abs diff <= 1e-5)."""
import pytest
import torch

from gqa_core import GroupedQueryAttention, grouped_attention
from gqa_core.core.apportion import query_to_kv

from support.reference import attention_loop, hamilton, key_norms, min_max, project

CASES = [(H, G) for H in (6, 12, 16) for G in range(1, H + 1) if H % G == 0]
TOKENS = 11


def make(variant, H, G, **options):
    torch.manual_seed(H * 100 + G)
    module = GroupedQueryAttention(H * 8, num_heads=H, num_kv_heads=G, qkv_bias=True, variant=variant,
                                   **options).eval()
    x = torch.randn(4, TOKENS, H * 8)
    # Spread the key heads' scales so key-driven policies produce very uneven and zero-query groups.
    with torch.no_grad():
        k_rows = module.qkv.weight[H * 8:(H + G) * 8].view(G, 8, -1)
        k_rows.mul_(torch.linspace(0.5, 2.0, G)[:, None, None])
    return module, x


@pytest.mark.parametrize('H,G', CASES)
@pytest.mark.parametrize('variant', ['gqa', 'pgqa'])
def test_static_policies_match_loop(variant, H, G):
    module, x = make(variant, H, G)
    expected = attention_loop(module, x, [[H // G] * G] * len(x))
    with torch.no_grad():
        assert (module(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize('H', [6, 12, 16])
def test_mha_matches_loop(H):
    module, x = make('mha', H, H)
    with torch.no_grad():
        assert (module(x) - attention_loop(module, x, [[1] * H] * len(x))).abs().max() <= 1e-5


@pytest.mark.parametrize('H,G', CASES)
def test_kdgqa_per_sample_matches_loop(H, G):
    module, x = make('kdgqa', H, G)
    allocations = [hamilton(min_max(norms), H) for norms in key_norms(module, x)]
    if 1 < G < H:
        assert any(0 in a for a in allocations), 'the case should include zero-query groups'
    with torch.no_grad():
        assert (module(x) - attention_loop(module, x, allocations)).abs().max() <= 1e-5


@pytest.mark.parametrize('H,G', CASES)
def test_dgqa_frozen_allocation_matches_loop(H, G):
    module, x = make('dgqa', H, G, stat='ema', window=1)
    module.train()
    with torch.no_grad():
        module(x)  # one training step: allocation <- shares of the batch-mean key norms
    norms = torch.tensor(key_norms(module, x)).mean(0).tolist()
    expected_alloc = hamilton([n / sum(norms) for n in norms], H)
    assert module.policy.allocation.tolist() == expected_alloc
    module.eval()
    with torch.no_grad():
        assert (module(x) - attention_loop(module, x, [expected_alloc] * len(x))).abs().max() <= 1e-5


@pytest.mark.parametrize('H,G', [(6, 3), (12, 4), (16, 8)])
def test_pgqa_noise_in_eval_matches_loop(H, G):
    module, x = make('pgqa', H, G, noise_in_eval=True, noise_scale=0.3, seed=7)
    policy = module.policy
    gen = torch.Generator().manual_seed(policy.seed * 100_003 + policy.stream)
    z = torch.randn((1, H, TOKENS, TOKENS), generator=gen)[0]

    def noise(b, h, attn):
        row_noise = z[h] * attn.std(-1, keepdim=True) + attn.mean(-1, keepdim=True)
        row_noise = row_noise * (1 - torch.eye(TOKENS))
        return attn - 0.3 * row_noise

    with torch.no_grad():
        got = module(x)
        assert (got - attention_loop(module, x, [[H // G] * G] * len(x), noise)).abs().max() <= 1e-5
        assert torch.equal(got, module(x)), 'eval noise is re-seeded every forward'
        module.policy.noise_in_eval = False
        assert (got - module(x)).abs().max() > 1e-4, 'the noise must change the output'


@pytest.mark.parametrize('H', [6, 12, 16])
def test_grouped_attention_with_random_allocations_including_empty_groups(H):
    """The routing kernel alone, per-sample and shared, against the loop, with zero-query groups forced."""
    torch.manual_seed(H)
    for G in [g for g in range(2, H + 1) if H % g == 0]:
        module = GroupedQueryAttention(H * 8, num_heads=H, num_kv_heads=G, variant='gqa').eval()
        x = torch.randn(3, TOKENS, H * 8)
        allocations = []
        for _ in range(3):
            cuts = sorted(torch.randint(0, H + 1, (G - 1,)).tolist())
            alloc = [b - a for a, b in zip([0] + cuts, cuts + [H])]
            allocations.append(alloc)
        allocations[0] = [H] + [0] * (G - 1)
        alloc_t = torch.tensor(allocations)
        q, k, v = project(module, x)
        with torch.no_grad():
            for routing in (query_to_kv(alloc_t, H), query_to_kv(alloc_t[0], H)):
                per = routing.dim() == 2
                out = grouped_attention(q, k, v, routing, scale=module.scale)
                out = module.proj(out.transpose(1, 2).reshape(3, TOKENS, H * 8))
                expected = attention_loop(module, x, allocations if per else [allocations[0]] * 3)
                assert (out - expected).abs().max() <= 1e-5
