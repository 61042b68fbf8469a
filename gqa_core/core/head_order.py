"""Which MHA heads share a KV head: the head-order advisor.

The paper mean-pools *consecutive* heads. Any other head order is a function-preserving permutation of the MHA's
heads (q / k / v rows, output-projection columns) followed by the same consecutive pooling, so every variant
-- KDGQA's contiguous runs included -- composes with it. ``"output-error"`` chooses, per layer, the partition
of heads into equal groups whose mean-pooled K/V change the model's output least on calibration images, in
two stages:

1. *Layer error.* For each candidate group S the error is ``sum ||sum_{h in S} W_h (o'_h - o_h)||^2`` over the
   tokens that reach the model's output (all tokens; only the class token in the last layer of a
   token-pooled model), where ``o_h`` is head h's MHA output, ``o'_h`` its output with S's pooled K/V and
   ``W_h`` its output-projection columns. When the partitions are few (8 heads into 4 pairs: 105) each is
   scored by the layer's full output error; otherwise groups are scored on their own (the sum over groups
   bounds the error without cross-group terms) and the best partition is found exactly by dynamic
   programming over head subsets when that is cheap, or by best-improvement pairwise swaps from the
   consecutive order. Candidates are scored in batches (one fused attention call for many groups or
   partitions).
2. *Model output.* When the partitions were scored exhaustively, the ``candidates`` partitions with the
   least layer error are run through the rest of the model, layer by layer with the layers below already
   converted, and the one whose logits stay closest to the MHA model's (KL divergence; squared error of
   the features for a headless model) is kept. The layer error ranks well but is a proxy: on the embedded
   model this second stage added 1.3 - 2.5 points at G = 4 and 0.7 - 3.6 at G = 2 (docs/analyses.md).

A candidate must not have a larger layer error than the consecutive order, so a layer keeps the paper's
order whenever nothing beats it. Each layer is ranked on the inputs of the MHA model.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import (GroupedQueryAttention, context_rope, multi_head_equivalent, not_as_built, permute_heads,
                        shared_bias)
from .distributed import process_part, sum_over_processes
from .vit import block_context, block_inputs, blocks_of, check_vit, model_output, output_rows, run_blocks

__all__ = ['HeadOrderAdvice', 'advise_head_order', 'permute_heads', 'check_permutations', 'head_groups', 'HEAD_ORDERS']

HEAD_ORDERS = ('consecutive', 'output-error')
MAX_EXHAUSTIVE_PARTITIONS = 2_000  # up to this many partitions, each is scored by the layer's full error
MAX_EXACT_PARTITIONS = 20_000  # up to this (or pairs), exact DP on the per-group bound; beyond, pairwise swaps
TRANSIENT_VALUES = 8_000_000  # floats per scoring call (32 MB): bounds memory for any model and batch

Reduce = Callable[[Tensor], Tensor]  # a sum over this process's images -> the sum over all processes' images


def _alone(values: Tensor) -> Tensor:
    """The :data:`Reduce` of a single process: its sums are the sums."""
    return values


@dataclass
class HeadOrderAdvice:
    """Per layer: the head order to pool consecutively, and the output error of both orders."""
    permutations: List[List[int]]
    error_consecutive: List[float]
    error_advised: List[float]
    search: List[str] = field(default_factory=list)  # 'exhaustive' | 'exact' | 'swap' | 'kept' per layer
    # per layer, KL(MHA || layers so far converted) of the model's output, when candidates were compared on it
    output_divergence: List[Optional[float]] = field(default_factory=list)


def check_permutations(perms: Sequence[Sequence[int]], depth: int, num_heads: int) -> List[List[int]]:
    """Validate explicit per-layer head permutations (data from users or configs)."""
    if not isinstance(perms, (list, tuple)) or len(perms) != depth:
        raise ValueError(f'head_order needs one head permutation per layer ({depth})')
    out = []
    for i, perm in enumerate(perms):
        if not isinstance(perm, (list, tuple)) or sorted(int(h) for h in perm if type(h) is int) != list(range(num_heads)) \
                or len(perm) != num_heads:
            raise ValueError(f'layer {i}: the head order must be a permutation of 0..{num_heads - 1}')
        out.append([int(h) for h in perm])
    return out


def head_groups(perm: Sequence[int], num_kv_heads: int) -> List[List[int]]:
    """Which original MHA heads each KV head was pooled from."""
    s = len(perm) // num_kv_heads
    return [list(perm[g * s:(g + 1) * s]) for g in range(num_kv_heads)]


@dataclass
class _Layer:
    """One layer as the advisor scores it: its multi-head attention (a G = H grouped layer of the model's kind)
    and what the block gives it besides its tokens (RoPE; BEiT's position bias, folded into ``bias``)."""
    attn: GroupedQueryAttention
    rope: Any = None  # EVA's tensor or Gemma4's (cos, sin)
    bias: Optional[Tensor] = None  # additive, (1, H, T, T)

    @classmethod
    def of(cls, attn: GroupedQueryAttention, context: Dict[str, Any]) -> '_Layer':
        return cls(attn, context_rope(context), attn.position_bias(None, shared_bias(context)))

    def heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q as the forward computes it, and k, v as projected ``(B, H, T, d)``: pooling averages projections,
        so a key is normalised and rotated (:meth:`keys`) after it is pooled, as the pooled layer does."""
        attn, (B, N, _) = self.attn, x.shape
        q, k, v = attn.project(x)
        q = attn.q_norm(q.view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2))
        k = k.view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        v = v.view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2)
        return attn.rotate(q, self.rope), k, v

    def keys(self, k: Tensor) -> Tensor:
        """Projected (or pooled) keys ``(B, heads, T, d)`` as attention reads them: k-norm, then RoPE."""
        return self.attn.rotate(self.attn.k_norm(k), self.rope)

    def values(self, v: Tensor) -> Tensor:
        """Projected (or pooled) values as attention reads them (Gemma4 RMS-normalises them)."""
        return self.attn.v_norm(v)

    def mask(self, heads: Optional[Tensor], rows: Optional[slice]) -> Optional[Tensor]:
        """The additive bias for the query ``heads`` (an index; all when None) and query ``rows``."""
        if self.bias is None:
            return None
        bias = self.bias if heads is None else self.bias[:, heads]
        return bias if rows is None else bias[:, :, rows]


def _mha_outputs(layer: _Layer, inputs: Tensor, rows: Optional[slice]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """q (of the query ``rows`` that matter; all when None), the projected k, v of ``inputs`` and the multi-head
    output the pooled layer should match."""
    q, k, v = layer.heads(inputs)
    if rows is not None:
        q = q[:, :, rows]
    o = F.scaled_dot_product_attention(q, layer.keys(k), layer.values(v), attn_mask=layer.mask(None, rows),
                                       scale=layer.attn.scale)
    return q, k, v, o


def _group_costs(layer: _Layer, inputs: Tensor, groups: Sequence[Tuple[int, ...]], batch: int,
                 rows: Optional[slice] = None, reduce: Reduce = _alone) -> Tensor:
    """Output error of pooling each group's K/V, summed over calibration tokens: ``(len(groups),)``."""
    attn = layer.attn
    H, d = attn.num_heads, attn.head_dim
    index = torch.tensor(groups, dtype=torch.long)  # (M, s)
    M, s = index.shape
    weight = attn.proj.weight.view(-1, H, d)[:, index]  # (D, M, s, d)
    costs = torch.zeros(M, dtype=torch.float64)
    for start in range(0, inputs.shape[0], batch):
        q, k, v, o = _mha_outputs(layer, inputs[start:start + batch], rows)
        B, T = q.shape[0], q.shape[2]
        chunk = max(1, TRANSIENT_VALUES // (B * k.shape[2] * max(weight.shape[0], s * d)))  # groups per call
        for m0 in range(0, M, chunk):
            idx = index[m0:m0 + chunk]
            m = idx.shape[0]
            qs = q[:, idx.reshape(-1)]  # (B, m*s, T, d)
            kp, vp = layer.keys(k[:, idx].mean(2)), layer.values(v[:, idx].mean(2))  # (B, m, T, d)
            o2 = F.scaled_dot_product_attention(qs, kp, vp, attn_mask=layer.mask(idx.reshape(-1), rows),
                                                scale=attn.scale, enable_gqa=True)
            delta = (o2 - o[:, idx.reshape(-1)]).reshape(B, m, s, T, d).transpose(2, 3).reshape(B, m, T, s * d)
            w = weight[:, m0:m0 + m].reshape(-1, m, s * d)  # (D, m, s*d): the group's projection columns
            if s * d < w.shape[0]:  # ||W delta||^2 = delta^T (W^T W) delta: cheaper through the Gram matrix
                gram = torch.einsum('oma,omb->mab', w, w)
                costs[m0:m0 + m] += (torch.einsum('bmta,mac->bmtc', delta, gram) * delta).sum((0, 2, 3)).double()
            else:
                costs[m0:m0 + m] += torch.einsum('bmta,oma->bmto', delta, w).square().sum((0, 2, 3)).double()
    return reduce(costs)


def _layer_errors(layer: _Layer, inputs: Tensor, perms: Sequence[Sequence[int]], G: int, batch: int,
                  rows: Optional[slice] = None, reduce: Reduce = _alone) -> List[float]:
    """Full output error of the layer (all groups together, through the projection) for each head order,
    several orders per fused attention call."""
    attn = layer.attn
    H, d = attn.num_heads, attn.head_dim
    index = torch.as_tensor([list(p) for p in perms])  # (P, H)
    P = index.shape[0]
    proj = attn.proj.weight.view(-1, H, d)
    totals = torch.zeros(P, dtype=torch.float64)
    for start in range(0, inputs.shape[0], batch):
        q, k, v, o = _mha_outputs(layer, inputs[start:start + batch], rows)
        B, Tq, T = q.shape[0], q.shape[2], k.shape[2]
        chunk = max(1, TRANSIENT_VALUES // (B * T * max(proj.shape[0], H * d)))
        for p0 in range(0, P, chunk):
            idx = index[p0:p0 + chunk]
            n = idx.shape[0]
            flat = idx.reshape(-1)
            kp = layer.keys(k[:, flat].view(B, n * G, H // G, T, d).mean(2))
            vp = layer.values(v[:, flat].view(B, n * G, H // G, T, d).mean(2))
            o2 = F.scaled_dot_product_attention(q[:, flat], kp, vp, attn_mask=layer.mask(flat, rows),
                                                scale=attn.scale, enable_gqa=True)
            delta = (o2 - o[:, flat]).view(B, n, H, Tq, d)
            y = torch.einsum('bnhtd,onhd->bnto', delta, proj[:, idx])
            totals[p0:p0 + n] += y.square().sum((0, 2, 3)).double()
    return reduce(totals).tolist()


def _partitions(heads: Tuple[int, ...], s: int):
    """Every partition of ``heads`` into groups of size s, each once (a group holds the lowest head left)."""
    if not heads:
        yield ()
        return
    low, rest = heads[0], heads[1:]
    for combo in itertools.combinations(rest, s - 1):
        remaining = tuple(h for h in rest if h not in combo)
        for tail in _partitions(remaining, s):
            yield ((low, *combo), *tail)


def _num_partitions(H: int, G: int) -> int:
    s = H // G
    return math.factorial(H) // (math.factorial(s) ** G * math.factorial(G))


def _exact(H: int, s: int, cost: Dict[Tuple[int, ...], float]) -> List[Tuple[int, ...]]:
    """Minimum-cost partition of heads into groups of size s: DP over the set of heads not yet grouped
    (the group holding the lowest remaining head is chosen at each step, so each partition is seen once)."""
    @lru_cache(maxsize=None)
    def best(mask: int) -> Tuple[float, Tuple[Tuple[int, ...], ...]]:
        if mask == 0:
            return 0.0, ()
        heads = [h for h in range(H) if mask >> h & 1]
        low, rest = heads[0], heads[1:]
        result = (math.inf, ())
        for combo in itertools.combinations(rest, s - 1):
            group = (low, *combo)
            sub_cost, sub = best(mask & ~sum(1 << h for h in group))
            c = cost[group] + sub_cost
            if c < result[0]:
                result = (c, (group, *sub))
        return result

    groups = list(best((1 << H) - 1)[1])
    best.cache_clear()
    return groups


def _swap_search(layer: _Layer, inputs: Tensor, H: int, G: int, batch: int, rows: Optional[slice] = None,
                 max_rounds: int = 64, reduce: Reduce = _alone) -> List[Tuple[int, ...]]:
    """Best-improvement pairwise swaps between groups, from the consecutive order; each round scores all
    candidate groups of all swaps in one batch."""
    s = H // G
    groups = [tuple(range(g * s, (g + 1) * s)) for g in range(G)]
    cache: Dict[Tuple[int, ...], float] = {}

    def score(candidates: List[Tuple[int, ...]]) -> None:
        todo = sorted({c for c in candidates if c not in cache})
        if todo:
            for c, value in zip(todo, _group_costs(layer, inputs, todo, batch, rows, reduce).tolist()):
                cache[c] = value

    score(groups)
    for _ in range(max_rounds):
        moves = []
        for a, b in itertools.combinations(range(G), 2):
            for i in groups[a]:
                for j in groups[b]:
                    ga = tuple(sorted(set(groups[a]) - {i} | {j}))
                    gb = tuple(sorted(set(groups[b]) - {j} | {i}))
                    moves.append((a, b, ga, gb))
        score([g for m in moves for g in m[2:]])
        gain, move = max(((cache[groups[a]] + cache[groups[b]] - cache[ga] - cache[gb]), (a, b, ga, gb))
                         for a, b, ga, gb in moves)
        if gain <= 1e-12 * max(1.0, sum(cache[g] for g in groups)):
            break
        a, b, ga, gb = move
        groups[a], groups[b] = ga, gb
    return groups


def _output_divergence(reference: Tensor, output: Tensor, headless: bool, reduce: Reduce = _alone) -> float:
    """Mean KL(MHA || candidate) of the predicted distributions; squared feature error when headless (the mean
    over every process's images: a reduced sum and count)."""
    if headless:
        per_image = (output - reference).double().flatten(1).square().sum(-1)  # an encoder's tokens: one vector
    else:
        ref, out = reference.double().log_softmax(-1), output.double().log_softmax(-1)
        per_image = (ref.exp() * (ref - out)).sum(-1)
    total, count = reduce(torch.stack([per_image.sum(), per_image.new_tensor(float(per_image.numel()))])).tolist()
    return total / count


def _refine_flops_per_candidate(vit: nn.Module, tokens: Tensor, images: Optional[int] = None) -> float:
    """About the FLOPs one candidate costs in the model-output comparison: layer l's candidate runs L - l
    blocks (2 FLOPs per weight per token, plus the attention's 4 T D) over the calibration tokens (of
    ``images`` images, all processes' together; default: ``tokens``')."""
    N, T, D = tokens.shape
    N = N if images is None else images
    L = len(blocks_of(vit))
    per_token = 2 * sum(p.numel() for p in blocks_of(vit)[0].parameters()) + 4 * T * D
    return float(L * (L + 1) // 2 * N * T * per_token)


def _pooled_block(block: nn.Module, attn: GroupedQueryAttention, perm: Sequence[int], G: int) -> nn.Module:
    """A copy of ``block`` whose attention is ``attn`` with heads ``perm`` pooled consecutively into G."""
    pooled = copy.deepcopy(attn)
    permute_heads(pooled, perm)
    converted = copy.copy(block)  # shallow: shares the block's other layers, which are only read
    converted._modules = {**block._modules, 'attn': GroupedQueryAttention.from_attention(pooled, 'gqa', G)}
    return converted


def _ranked_partitions(layer: _Layer, x: Tensor, G: int, rows: Optional[slice], candidates: int,
                       batch: int, reduce: Reduce = _alone) -> Tuple[List[Tuple[List[int], float]], float, str]:
    """Stage 1 for one layer: up to ``candidates`` head orders with their layer error, best first, none worse
    than the consecutive order; the consecutive order's error; the search used."""
    H = layer.attn.num_heads
    s = H // G
    consecutive = list(range(H))
    if G == H or G == 1:
        err_c = _layer_errors(layer, x, [consecutive], G, batch, rows, reduce)[0]
        return [(consecutive, err_c)], err_c, 'kept'
    if _num_partitions(H, G) <= MAX_EXHAUSTIVE_PARTITIONS:  # score every partition by the full error
        perms = [[h for g in p for h in g] for p in _partitions(tuple(range(H)), s)]
        errors = _layer_errors(layer, x, perms, G, batch, rows, reduce)
        err_c = errors[perms.index(consecutive)]
        order = sorted(range(len(perms)), key=errors.__getitem__)
        return [(perms[i], errors[i]) for i in order if errors[i] <= err_c][:candidates], err_c, 'exhaustive'
    if _num_partitions(H, G) <= MAX_EXACT_PARTITIONS or (s == 2 and H <= 16):
        groups_of = list(itertools.combinations(range(H), s))
        costs = _group_costs(layer, x, groups_of, batch, rows, reduce).tolist()
        groups, how = _exact(H, s, dict(zip(groups_of, costs))), 'exact'
    else:
        groups, how = _swap_search(layer, x, H, G, batch, rows, reduce=reduce), 'swap'
    perm = [h for group in groups for h in group]
    err_c, err_a = _layer_errors(layer, x, [consecutive, perm], G, batch, rows, reduce)
    if err_a > err_c:  # the search minimised a per-group bound; never worse than the paper's order
        return [(consecutive, err_c)], err_c, 'kept'
    return [(perm, err_a)], err_c, how


def _choose_by_output(vit: nn.Module, index: int, attn: GroupedQueryAttention, ranked: List[Tuple[List[int], float]],
                      G: int, tokens: Tensor, reference: Tensor, batch: int,
                      context: Dict[str, Any], reduce: Reduce = _alone) -> Tuple[float, List[int], float, Tensor]:
    """Stage 2 for layer ``index``: among ``ranked`` head orders, the one whose model output (the layers below
    already converted, given as ``tokens`` entering this block) stays closest to the MHA ``reference``.
    Returns its divergence, order, layer error and the tokens it passes to the next block."""
    headless = getattr(vit, 'num_classes', 0) == 0
    best = None
    for perm, err in ranked:
        out = run_blocks([_pooled_block(blocks_of(vit)[index], attn, perm, G)], tokens, batch, context)
        d = _output_divergence(reference, model_output(vit, out, index + 1, batch, context), headless, reduce)
        if best is None or d < best[0]:
            best = (d, perm, err, out)
    return best


@torch.no_grad()
def advise_head_order(model: nn.Module, num_kv_heads: int, images: Tensor, *, candidates: int = 8,
                    max_refine_flops: Optional[float] = None, batch: int = 64,
                    parallel: bool = False) -> HeadOrderAdvice:
    """Choose each layer's head order for pooling an MHA ViT to ``num_kv_heads`` KV heads (see module doc).

    ``images``: calibration inputs ``(N, 3, H, W)``, already preprocessed. The model is not changed.
    ``candidates``: how many of the best-ranked partitions of a layer are compared on the model's output when
    the partitions were scored exhaustively (1: the least layer error wins). ``max_refine_flops``: a bound on
    that comparison's work (fewer candidates, or none, when it would exceed it), for callers that serve
    strangers; ``None``: unbounded.

    ``parallel``: every process of the ``torch.distributed`` group calls this with the same ``images`` (under
    ``accelerate launch``, say); each scores its contiguous part of them (:mod:`~gqa_core.core.distributed`)
    and the error sums, and the divergences' sums and counts, are added up over the processes before any
    choice, so every process makes the same choices, and the one process's up to the float order of the sums.
    Without a process group it is the one-process advisor.
    """
    vit = check_vit(model)
    if candidates < 1:
        raise ValueError(f'candidates={candidates} must be at least 1')
    G, H = num_kv_heads, blocks_of(vit)[0].attn.num_heads
    if G < 1 or H % G:
        raise ValueError(f'num_kv_heads={G} must be a positive divisor of the {H} heads')
    was_training = vit.training
    vit.eval()
    total_images = images.shape[0]
    reduce: Reduce = sum_over_processes if parallel else _alone
    images = process_part(images) if parallel else images
    mha_tokens = block_inputs(vit, images)
    context = block_context(vit, images)
    if max_refine_flops is not None:
        cost = _refine_flops_per_candidate(vit, mha_tokens, total_images)
        candidates = max(1, min(candidates, int(max_refine_flops // cost)))
    refine = candidates > 1 and 1 < G < H and _num_partitions(H, G) <= MAX_EXHAUSTIVE_PARTITIONS
    converted_tokens = mha_tokens  # what the layers chosen so far produce (tracked when stage 2 runs)
    reference = model_output(vit, mha_tokens, 0, batch, context) if refine else None
    advice = HeadOrderAdvice([], [], [])
    for index, block in enumerate(blocks_of(vit)):
        attn = _multi_head(block.attn, index)
        ranked, err_c, how = _ranked_partitions(_Layer.of(attn, context), block.norm1(mha_tokens), G,
                                                output_rows(vit, index), candidates, batch, reduce)
        divergence = None
        if refine:
            divergence, perm, err_a, converted_tokens = _choose_by_output(
                vit, index, attn, ranked, G, converted_tokens, reference, batch, context, reduce)
        else:
            perm, err_a = ranked[0]
        advice.permutations.append(list(perm))
        advice.error_consecutive.append(err_c)
        advice.error_advised.append(err_a)
        advice.search.append(how)
        advice.output_divergence.append(divergence)
        mha_tokens = run_blocks([block], mha_tokens, batch, context)
    vit.train(was_training)
    return advice


def _multi_head(attn: nn.Module, index: int) -> GroupedQueryAttention:
    """The block's multi-head attention as a G = H grouped layer of its kind (exact for timm's own layers, their
    GQA included, and for grouped layers with the K/V their backbone was built with)."""
    if isinstance(attn, GroupedQueryAttention) and attn.num_kv_heads == attn.num_heads:
        mha: Optional[nn.Module] = attn  # as it is: its source_heads line up a model-wide shared position bias
    else:  # timm's layers (their GQA too) and a native grouped layer: each KV head repeated (exact)
        mha = multi_head_equivalent(attn)
    if mha is None:
        raise ValueError(f'block {index}: the head-order advisor needs the multi-head model (G = H) or the K/V heads '
                         f'its backbone was built with, got {type(attn).__name__}'
                         + (f' with G={attn.num_kv_heads}, {not_as_built(attn)}' if hasattr(attn, 'num_kv_heads')
                            else ''))
    attn = mha if isinstance(mha, GroupedQueryAttention) else GroupedQueryAttention.from_attention(mha, 'mha')
    if attn.proj_l is not None:
        raise ValueError(f'block {index}: talking-heads attention mixes every head\'s logits and weights (proj_l, '
                         'proj_w), so the error of pooling one group of heads depends on all the others and the '
                         'advisor\'s per-group costs would not be the layer\'s error; use head_order="consecutive" '
                         'or give an order per layer')
    return attn
