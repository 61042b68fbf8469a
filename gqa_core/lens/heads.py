"""Which heads and groups matter, for one model on one image.

- :func:`ablation_study`: the drop in the predicted class's probability when each KV head (with every query
  head it serves in that forward) or each single query head is removed -- zero or mean ablation, every
  removal of the model in batched forwards (see :mod:`gqa_core.core.ablation`). Headless models: the change
  of the features (1 - cosine similarity).
- :func:`group_diversity`: per layer and KV head, the mean pairwise Jensen-Shannon divergence (bits) between
  the summary-row attention maps of the query heads sharing it -- the within-group similarity PGQA claims to
  reduce. NaN where a KV head serves fewer than two query heads. The maps are over the patch tokens only,
  renormalised: the same rows every other view shows (attention to the class token or registers, often a
  large sink, would otherwise dominate the divergence and hide how the heads differ over the image).
- :func:`faithfulness`: deletion and insertion curves and their AUCs for a patch ranking (the class-token map,
  the rollout): patches removed from / revealed onto a mean-colour image in the order the map ranks them, one
  batched forward per curve, the area taken over the fraction of patches including the unperturbed point.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ..core.ablation import ABLATION_MODES, ablate
from ..core.device import model_device
from ..core.vit import (block_context, block_inputs, blocks_of, family, gqa_layers, model_output, num_tokens,
                        token_pixels)

__all__ = ['AblationResult', 'Progress', 'ablation_study', 'group_diversity', 'jensen_shannon', 'faithfulness',
           'deletion_insertion', 'CURVE_STEPS']

CURVE_STEPS = 32  # points per deletion / insertion curve (fewer when the model has fewer patches)
ROWS_PER_FORWARD_TOKENS = 8192  # batch rows x tokens per forward on the CPU: bounds memory for large models
GPU_ROWS_PER_FORWARD_TOKENS = 32_768  # ... on a GPU, where larger batches are faster
Progress = Callable[[float, str], None]  # (fraction done, what is running): the deep analyses report through it


def _score(outputs: Tensor, reference: Tensor, target: Optional[int]) -> Tensor:
    """Probability of ``target`` (classifiers) or cosine similarity to the reference features (headless; an
    encoder's tokens, a VLM tower's ``*_enc``, are one feature vector per image)."""
    if target is not None:
        return outputs.float().softmax(-1)[:, target]
    return torch.nn.functional.cosine_similarity(outputs.float().flatten(1), reference.float().flatten()[None], dim=-1)


def _chunks(model: nn.Module) -> int:
    """Batch rows per forward for this model's token count."""
    budget = ROWS_PER_FORWARD_TOKENS if model_device(model).type == 'cpu' else GPU_ROWS_PER_FORWARD_TOKENS
    return max(1, budget // num_tokens(model))


@torch.inference_mode()
def _batched(model: nn.Module, x: Tensor, query_heads: Optional[Tensor] = None, kv_heads: Optional[Tensor] = None,
             mode: str = 'zero', progress: Optional[Callable[[int], None]] = None,
             scale: Optional[Tensor] = None) -> Tensor:
    """Run ``x`` (one row per ablation or perturbation) in bounded chunks, the head masks sliced alongside;
    ``progress(rows)`` after each chunk. With ``scale`` ``(N, 1, H, W)`` the rows are ``x * scale`` for the one
    image ``x``, made chunk by chunk (a curve's 33 perturbed images at 518 px would hold 106 MB at once)."""
    step = _chunks(model)
    outs = []
    for start in range(0, x.shape[0] if scale is None else scale.shape[0], step):
        chunk = x[start:start + step] if scale is None else x * scale[start:start + step]
        if query_heads is None and kv_heads is None:
            outs.append(model(chunk))
        else:
            q = query_heads[start:start + step] if query_heads is not None else None
            kv = kv_heads[start:start + step] if kv_heads is not None else None
            with ablate(model, q, kv, mode):
                outs.append(model(chunk))
        if progress is not None:
            progress(chunk.shape[0])
    return torch.cat(outs)


@dataclass
class AblationResult:
    """Drops of the score when heads are removed, per mode: ``kv[mode]`` ``(L, G)``, ``query[mode]`` ``(L, H)``."""
    kv: Dict[str, np.ndarray]
    query: Dict[str, np.ndarray]
    target: str  # what the score is: "p(label)" or "feature cosine"
    base_score: float


@torch.inference_mode()
def ablation_study(model: nn.Module, x: Tensor, target: Optional[int], target_name: str = '',
                   progress: Optional[Progress] = None) -> AblationResult:
    """Every single KV-head and query-head removal of ``model`` on the one image ``x`` ``(1, 3, H, W)``, both
    modes: for each layer l, its G KV-head and H query-head removals in batched forwards.

    A removal in layer l leaves blocks 0 .. l-1 untouched, so those run once: each layer's removals start
    from the tokens entering block l (kept from one forward, L x T x C floats), which saves about half the
    block forwards of running every removal from the image. ``progress(fraction, what)`` is told after each
    chunk of forwards.
    """
    layers = gqa_layers(model)
    L, H, G = len(layers), layers[0].num_heads, max(layer.num_kv_heads for layer in layers)
    context = block_context(model, x)
    entering = [block_inputs(model, x)]
    for block in blocks_of(model):
        entering.append(block(entering[-1], **context))
    base = family(model).head(model, entering.pop())[0]
    base_score = float(_score(base[None], base, target)[0])
    step = _chunks(model)
    # a KV head a layer does not have (a model's own blocks may differ in G) stays NaN
    kv_out = {mode: np.full((L, G), np.nan) for mode in ABLATION_MODES}
    q_out = {mode: np.zeros((L, H)) for mode in ABLATION_MODES}
    total = sum((L - i) * (layers[i].num_kv_heads + H) for i in range(L)) * len(ABLATION_MODES)  # block forwards
    done = 0
    for layer in range(L):
        g = layers[layer].num_kv_heads
        rows = torch.arange(g + H, device=x.device)
        kv_mask = torch.zeros(g + H, L, G, dtype=torch.bool, device=x.device)
        q_mask = torch.zeros(g + H, L, H, dtype=torch.bool, device=x.device)
        kv_mask[rows[:g], layer, rows[:g]] = True  # rows 0 .. g-1: one KV head each
        q_mask[rows[g:], layer, rows[:H]] = True  # rows g .. g+H-1: one query head each
        for mode in ABLATION_MODES:
            outs = []
            for start in range(0, g + H, step):
                stop = min(g + H, start + step)
                tokens = entering[layer].expand(stop - start, *entering[layer].shape[1:])
                with ablate(model, q_mask[start:stop], kv_mask[start:stop], mode):
                    outs.append(model_output(model, tokens, layer, step, context))
                done += (stop - start) * (L - layer)
                if progress is not None:
                    progress(done / total, f'head ablation: layer {layer + 1} of {L}, {mode}')
            drop = base_score - _score(torch.cat(outs), base, target).double().cpu().numpy()
            kv_out[mode][layer, :g], q_out[mode][layer] = drop[:g], drop[g:]
    return AblationResult(kv_out, q_out, f'p({target_name})' if target is not None else 'feature cosine',
                          base_score)


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JSD in bits between distributions along the last axis (0 = identical, 1 = disjoint)."""
    p = p / p.sum(-1, keepdims=True)
    q = q / q.sum(-1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide='ignore', invalid='ignore'):
            terms = np.where(a > 0, a * np.log2(a / b), 0.0)
        return terms.sum(-1)
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def group_diversity(rows: np.ndarray, query_to_kv: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """rows: ``(L, H, T)`` attention of each query head's summary row; query_to_kv: ``(L, H)``.
    Returns ``(L, G)`` mean pairwise JSD among the query heads sharing each KV head (NaN below two)."""
    L = rows.shape[0]
    out = np.full((L, num_kv_heads), np.nan)
    for layer in range(L):  # tiny numpy work on recorded data, not the forward pass
        for g in range(num_kv_heads):
            heads = np.flatnonzero(query_to_kv[layer] == g)
            if len(heads) >= 2:
                pairs = np.array(list(itertools.combinations(heads, 2)))
                out[layer, g] = float(jensen_shannon(rows[layer, pairs[:, 0]], rows[layer, pairs[:, 1]]).mean())
    return out


def _patch_masks(order: np.ndarray, counts: List[int], grid: tuple, patch: tuple, size: tuple) -> Tensor:
    """``(len(counts), 1, H, W)`` pixel masks: 1 on the first ``k`` patches of ``order`` for each k."""
    rows, cols = grid
    masks = torch.zeros(len(counts), rows * cols)
    for i, k in enumerate(counts):
        masks[i, torch.as_tensor(order[:k], dtype=torch.long)] = 1.0
    masks = masks.view(-1, 1, rows, cols)
    masks = masks.repeat_interleave(patch[0], 2).repeat_interleave(patch[1], 3)
    pad_h, pad_w = size[0] - masks.shape[2], size[1] - masks.shape[3]
    return torch.nn.functional.pad(masks, (0, max(0, pad_w), 0, max(0, pad_h)))[..., :size[0], :size[1]]


@torch.inference_mode()
def deletion_insertion(model: nn.Module, x: Tensor, ranking: np.ndarray, grid: tuple, target: Optional[int],
                       steps: int = CURVE_STEPS, base: Optional[Tensor] = None,
                       progress: Optional[Callable[[int], None]] = None) -> Dict[str, object]:
    """Deletion and insertion curves for one patch ranking (higher = more important) on ``x`` ``(1, 3, H, W)``.

    Removed patches take the value 0 of the normalised input (the dataset's mean colour). Returns the
    fractions, both curves and their trapezoidal AUCs (each curve includes its unperturbed end). ``base``: the
    model's output on ``x`` when the caller has it; ``progress(rows)`` after each chunk of forwards.
    """
    P = int(grid[0] * grid[1])
    order = np.argsort(-np.asarray(ranking), kind='stable')
    counts = sorted({round(i * P / min(steps, P)) for i in range(min(steps, P) + 1)})
    patch = token_pixels(model)  # a hybrid ViT's token covers its stem's stride times the patch
    masks = _patch_masks(order, counts, grid, patch, tuple(x.shape[-2:])).to(x.device)
    base = model(x)[0] if base is None else base
    deletion = _score(_batched(model, x, progress=progress, scale=1 - masks), base, target)  # top-k removed
    insertion = _score(_batched(model, x, progress=progress, scale=masks), base, target)  # only the top-k shown
    deletion, insertion = (curve.double().cpu().numpy() for curve in (deletion, insertion))
    fractions = np.array(counts, dtype=np.float64) / P
    return dict(fractions=fractions, deletion=deletion, insertion=insertion,
                deletion_auc=float(np.trapezoid(deletion, fractions)),
                insertion_auc=float(np.trapezoid(insertion, fractions)))


def faithfulness(model: nn.Module, x: Tensor, maps: Dict[str, np.ndarray], grid: tuple,
                 target: Optional[int], progress: Optional[Progress] = None) -> Dict[str, Dict[str, object]]:
    """:func:`deletion_insertion` for each named map (e.g. ``{"class-token map": ..., "rollout": ...}``);
    ``progress(fraction, what)`` after each chunk of forwards."""
    with torch.inference_mode():
        base = model(x)[0]
    P = int(grid[0] * grid[1])
    total = 2 * len(maps) * len({round(i * P / min(CURVE_STEPS, P)) for i in range(min(CURVE_STEPS, P) + 1)})
    done = [0]
    out = {}
    for name, ranking in maps.items():
        def tell(rows: int, name: str = name) -> None:
            done[0] += rows
            if progress is not None:
                progress(min(1.0, done[0] / total), f'faithfulness: {name}')
        out[name] = deletion_insertion(model, x, ranking, grid, target, base=base, progress=tell)
    return out
