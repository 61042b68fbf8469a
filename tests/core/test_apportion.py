import itertools

import pytest
import torch

from gqa_core.core.apportion import (largest_remainder, min_max_shares, normalise_shares, official_round,
                                query_to_kv, uniform_allocation)


def hamilton_reference(shares, seats):
    quotas = [s * seats for s in shares]
    base = [int(q // 1) for q in quotas]
    order = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - base[i]), i))
    for i in order[: seats - sum(base)]:
        base[i] += 1
    return base


@pytest.mark.parametrize('seats,groups', [(6, 1), (6, 2), (6, 3), (6, 6), (12, 4), (16, 8), (16, 5)])
def test_largest_remainder_matches_reference_and_sums(seats, groups):
    gen = torch.Generator().manual_seed(seats * 31 + groups)
    weights = torch.rand(64, groups, generator=gen, dtype=torch.float64) ** 3
    weights[0] = 0  # degenerate row -> uniform
    shares = normalise_shares(weights)
    alloc = largest_remainder(shares, seats)
    assert alloc.dtype == torch.long
    assert (alloc.sum(-1) == seats).all() and (alloc >= 0).all()
    for row_shares, row in zip(shares.tolist(), alloc.tolist()):
        assert row == hamilton_reference([float(torch.tensor(s).double()) for s in row_shares], seats)


def test_largest_remainder_ties_go_to_lower_index():
    assert largest_remainder(torch.tensor([[0.25, 0.25, 0.25, 0.25]]), 6).tolist() == [[2, 2, 1, 1]]
    assert largest_remainder(torch.tensor([1 / 3, 1 / 3, 1 / 3]), 4).tolist() == [2, 1, 1]


def test_min_max_shares_zero_for_smallest_and_uniform_when_equal():
    shares = min_max_shares(torch.tensor([[10.0, 10.5, 11.0], [3.0, 3.0, 3.0]]))
    assert shares[0].tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert shares[1].tolist() == pytest.approx([1 / 3] * 3)
    assert torch.isfinite(min_max_shares(torch.tensor([float('nan'), 1.0]))).all()


@pytest.mark.parametrize('norms,heads,expected', [
    ([10, 10.5, 11], 6, [0, 2, 4]),
    ([10, 10.2, 10.5, 11], 16, [0, 2, 5, 9]),
    ([10, 11], 12, [0, 12]),
])
def test_official_round_reproduces_method_examples(norms, heads, expected):
    assert official_round(min_max_shares(torch.tensor(norms)), heads).tolist() == expected


def test_official_round_repairs_sum_like_the_authors_loops():
    # round([1.5, 1.5, 1.5, 1.5]) = [2, 2, 2, 2] (half to even), sum 8 > 6: decrement argmax twice -> first indices
    assert official_round(torch.full((4,), 0.25), 6).tolist() == [1, 1, 2, 2]
    # round([0.5]*4) = [0, 0, 0, 0] sum 0 < 2: increment argmin twice
    assert official_round(torch.full((4,), 0.25), 2).tolist() == [1, 1, 0, 0]


def test_query_to_kv_contiguous_runs_skip_zero_groups():
    alloc = torch.tensor([[0, 2, 4], [3, 0, 3], [6, 0, 0]])
    assert query_to_kv(alloc, 6).tolist() == [[1, 1, 2, 2, 2, 2], [0, 0, 0, 2, 2, 2], [0] * 6]
    for a in itertools.product(range(5), repeat=3):
        if sum(a) == 4:
            mapping = query_to_kv(torch.tensor(a), 4).tolist()
            assert mapping == [g for g, n in enumerate(a) for _ in range(n)]


def test_uniform_allocation_rejects_non_divisor():
    assert uniform_allocation(12, 4).tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match='does not divide'):
        uniform_allocation(12, 5)
