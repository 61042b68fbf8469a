"""Turning real-valued shares into integer query-head allocations.

An allocation ``a`` (shape ``(..., G)``, ``sum(a) == H``) says how many query heads each KV head serves;
query heads are assigned to KV heads in contiguous runs. Everything here is vectorised over leading batch
dimensions, has no data-dependent loop and never produces NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    'normalise_shares',
    'min_max_shares',
    'largest_remainder',
    'official_round',
    'uniform_allocation',
    'query_to_kv',
]


def normalise_shares(weights: Tensor) -> Tensor:
    """``weights / weights.sum(-1)`` in float32, or uniform shares where that sum is zero or not finite."""
    weights = weights.float().clamp_min(0)
    total = weights.sum(-1, keepdim=True)
    degenerate = ~torch.isfinite(total) | (total <= 0)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(degenerate, uniform, weights / torch.where(degenerate, torch.ones_like(total), total))


def min_max_shares(norms: Tensor) -> Tensor:
    """The paper's KDGQA shares: min-max scale the key norms, then normalise; all norms equal -> uniform."""
    norms = norms.float()
    low = norms.amin(-1, keepdim=True)
    span = norms.amax(-1, keepdim=True) - low
    flat = span <= 0
    scaled = (norms - low) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.full_like(norms, 1.0 / norms.shape[-1]), normalise_shares(scaled))


def largest_remainder(shares: Tensor, seats: int) -> Tensor:
    """Hamilton apportionment of ``seats`` by ``shares`` (``(..., G)``, rows summing to 1) -> int64 ``(..., G)``.

    Floor of ``shares * seats`` first, then the remaining seats go to the largest fractional parts, ties to
    the lower index (a stable descending sort gives exactly that order).
    """
    quota = shares.double() * seats
    base = quota.floor()
    remaining = seats - base.sum(-1, keepdim=True)
    order = torch.sort(quota - base, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (base + (rank < remaining).double()).long()


def official_round(shares: Tensor, seats: int) -> Tensor:
    """The authors' KDGQA apportionment: round half to even, then repair the sum deterministically.

    While the sum is too large, decrement the (first) largest entry; while too small, increment the (first)
    smallest. Rounding moves each entry by at most 1/2, so at most ``ceil(G / 2)`` repairs are needed;
    that many masked steps run, with no host synchronisation and no unbounded loop.
    """
    alloc = torch.round(shares.float() * seats).long()
    for _ in range((shares.shape[-1] + 1) // 2):
        excess = alloc.sum(-1, keepdim=True) - seats
        top = torch.zeros_like(alloc).scatter_(-1, alloc.argmax(-1, keepdim=True), 1)
        bottom = torch.zeros_like(alloc).scatter_(-1, alloc.argmin(-1, keepdim=True), 1)
        alloc = alloc - top * (excess > 0).long() + bottom * (excess < 0).long()
    return alloc


def uniform_allocation(num_heads: int, num_kv_heads: int, device: torch.device | None = None) -> Tensor:
    if num_heads % num_kv_heads:
        raise ValueError(f'num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}')
    return torch.full((num_kv_heads,), num_heads // num_kv_heads, dtype=torch.long, device=device)


def query_to_kv(allocation: Tensor, num_heads: int) -> Tensor:
    """Allocation ``(..., G)`` -> the KV head serving each query head, ``(..., H)`` (contiguous runs).

    Query head ``h`` belongs to the first KV head whose cumulative allocation exceeds ``h``; a KV head with
    zero queries is simply never chosen.
    """
    ends = allocation.cumsum(-1)
    heads = torch.arange(num_heads, device=allocation.device).expand(*allocation.shape[:-1], num_heads)
    return torch.searchsorted(ends.contiguous(), heads.contiguous(), right=True)
