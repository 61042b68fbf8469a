"""Calibrated conversion: shared K/V heads fitted to the MHA layer's output on unlabeled images.

Mean-pooling the K/V heads of a group (the paper's initialisation) ignores what the queries of the group ask
of the shared key and what the output projection does with the shared value; without uptraining the model
loses much of its accuracy. Calibration repairs each converted layer in order, on images only (no labels),
in two stages:

1. *Closed form.* Each shared key projection becomes the query-covariance-weighted average of the key
   projections it replaces, ``W_g = (sum_h C_h)^-1 sum_h C_h W_h`` with ``C_h = E[q_h q_h^T]`` -- the
   least-squares fit of every query head's logits when queries and keys come from different tokens. Each
   shared value projection is then refitted by least squares to the MHA heads' outputs under the new
   maps. For per-image routing (KDGQA) a head counts towards a KV head as often as it read it.
2. *Optimisation* (``steps > 0``): Adam on the layer's K/V projections (and, with ``params="all"``, its Q
   and output projections) so that the block, given the tokens the already-calibrated layers below produce,
   outputs what the MHA block outputs from the MHA's own tokens. Matching the MHA's residual stream rather
   than its layer on the same input lets each layer also correct the drift of the layers below.

Work is counted, never timed, so the same seed gives the same model (on the CPU; on a GPU only with
``torch.use_deterministic_algorithms``): ``steps`` per layer, capped by ``max_flops`` for the optimisation of the
whole conversion. The passes over the images (targets, closed form, checks, report) are not in that cap: they
are a few forwards of the calibration images per layer (servers bound them by the images they give). What each variant's calibration
means: every layer is calibrated through its own forward in eval mode, so static GQA, DGQA (under the
allocation it holds; calibration never moves it: that is a training-time decision) and PGQA (no noise in
eval unless ``noise_in_eval``) are fitted as they will run, and KDGQA's per-image routing is recomputed
from the changing keys at every step. Policy state (DGQA's statistics) is restored afterwards.

Data-parallel (``parallel=True``, every process of a ``torch.distributed`` group calling with the same images,
e.g. under ``accelerate launch``): the closed form's sums over images -- the query covariances, the routing
counts and the value fit's normal equations -- are each computed on a contiguous part of the images per
process and all-reduced before the solve (:mod:`~gqa_core.core.distributed`), so the closed form is the
one-process fit up to the float order of those sums. The rest (the optimisation's steps, the held-out checks,
the report) is sequential in the steps and runs on every process on all the images, deterministically (on
the CPU): every process ends with the same weights.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import process_part, sum_over_processes
from .attention import (GroupedQueryAttention, _load_qkv, _qkv_tensors, context_rope, key_head_norms, mix_heads,
                        out_projection, route_kv, shared_bias)
from .probe import AttentionProbe
from .vit import block_context, block_inputs, blocks_of, check_vit, in_chans, output_rows, patch_embed_of, run_blocks

__all__ = ['CalibrationBudget', 'CalibrationReport', 'calibrate_layers', 'check_calibration', 'layer_errors', 'block_flops',
           'CALIBRATED_PARAMS']

CALIBRATED_PARAMS = ('kv', 'all')  # which weights of a converted layer calibration may change
CHUNK_VALUES = 16_000_000  # floats of attention maps per closed-form chunk (64 MB)
RIDGE = 1e-3  # closed-form ridge toward the mean-pooled weights, relative to the data's scale
REPORT_IMAGES = 32  # calibration images the report's per-layer errors are measured on
CHECK_IMAGES = 64  # at most this many calibration images check each stage (kept out of its fit) ...
CHECK_FRACTION = 4  # ... and at most a quarter of them


@dataclass(frozen=True)
class CalibrationBudget:
    """How much work calibration may do -- counted in steps and FLOPs, so it is deterministic.

    Args:
        steps: optimisation steps per layer after the closed form (0: closed form only).
        batch_images: calibration images per optimisation step.
        max_flops: the most the optimisation may cost over the whole model (forward + backward FLOPs,
            estimated); fewer steps per layer when the cap binds. None: no cap.
        lr: Adam's step size, relative to each weight's root-mean-square (scale-free across models).
        params: ``"kv"`` (only the shared K/V projections move) or ``"all"`` (Q and output projections too).
        seed: orders the minibatches.
    """
    steps: int = 300
    batch_images: int = 64
    max_flops: Optional[float] = None
    lr: float = 0.02
    params: str = 'all'
    seed: int = 0

    def __post_init__(self) -> None:
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not number(self.lr) or (self.max_flops is not None and not number(self.max_flops)):
            raise ValueError(f'lr and max_flops must be numbers, got {self.lr!r}, {self.max_flops!r}')
        for name in ('steps', 'batch_images', 'seed'):
            if isinstance(getattr(self, name), bool):
                raise ValueError(f'{name} must be an integer, got {getattr(self, name)!r}')
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f'seed must be a non-negative integer, got {self.seed!r}')
        if not isinstance(self.steps, int) or not 0 <= self.steps <= 100_000:
            raise ValueError(f'steps must be an integer 0..100000, got {self.steps!r}')
        if not isinstance(self.batch_images, int) or self.batch_images < 1:
            raise ValueError(f'batch_images must be a positive integer, got {self.batch_images!r}')
        if self.max_flops is not None and not (math.isfinite(self.max_flops) and self.max_flops >= 0):
            raise ValueError(f'max_flops must be a finite number >= 0, got {self.max_flops!r}')
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f'lr must be a positive number, got {self.lr!r}')
        if self.params not in CALIBRATED_PARAMS:
            raise ValueError(f'params must be one of {CALIBRATED_PARAMS}, got {self.params!r}')


@dataclass
class CalibrationReport:
    """What calibration did, measured on the first :data:`REPORT_IMAGES` calibration images.

    ``error_*``: per layer, how far the converted model's tokens after that block are from the MHA model's
    (relative squared error, ``||x - x_mha||^2 / ||x_mha - mean||^2``, over the rows that reach the output), for
    the mean-pooled and the calibrated conversion -- where the damage is done and how it accumulates.
    ``*_per_kv_head``: per layer and KV head, how far the outputs of the query heads that KV head served are
    from the MHA heads' (through the output projection, relative to the MHA layer's output)."""
    images: int
    steps_per_layer: int
    params: str
    flops: float
    seconds: float
    error_mean_pooled: List[float] = field(default_factory=list)
    error_calibrated: List[float] = field(default_factory=list)
    error_mean_pooled_per_kv_head: List[List[float]] = field(default_factory=list)
    error_calibrated_per_kv_head: List[List[float]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def check_calibration(images: Any, model: nn.Module) -> Tensor:
    """``images`` as calibration data for ``model``, or a ``ValueError`` saying what is wrong with them."""
    if not isinstance(images, Tensor):
        raise ValueError('calibration images must be a tensor (N, 3, H, W) preprocessed for the model')
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError('calibration images must be a tensor (N, 3, H, W) of at least 2 images (a quarter is held '
                         f'back to check the fit); got shape {tuple(images.shape)}')
    if not images.is_floating_point():
        raise ValueError(f'calibration images must be floating point (preprocessed), got {images.dtype}')
    embed = patch_embed_of(model)
    chans = in_chans(model) or images.shape[1]  # a hybrid ViT's projection reads its stem's features
    if images.shape[1] != chans:
        raise ValueError(f'calibration images have {images.shape[1]} channels; the model takes {chans}')
    size = tuple(getattr(embed, 'img_size', None) or images.shape[-2:])
    if getattr(embed, 'strict_img_size', False) and tuple(images.shape[-2:]) != size:
        raise ValueError(f'calibration images are {images.shape[-2]} x {images.shape[-1]} px; the model takes '
                         f'{size[0]} x {size[1]} (preprocess them for it)')
    if not torch.isfinite(images).all():
        raise ValueError('calibration images contain NaN or infinite values')
    return images


class _Capture(AttentionProbe):
    """Keeps the attention output before the projection ``(B, H, T, d)`` and the routing of one forward."""
    out: Optional[Tensor] = None
    query_to_kv: Optional[Tensor] = None

    def edit(self, out: Tensor, v: Tensor, grouping: Any) -> Tensor:
        self.out, self.query_to_kv = out, grouping.query_to_kv
        return out


def _heads_out(layer: GroupedQueryAttention, x: Tensor, kwargs: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    """Per-head outputs before the projection and the ``(B, H)`` routing of one forward of ``layer``."""
    probe = _Capture()
    before, layer.probe = layer.probe, probe
    try:
        layer(x, **kwargs)
    finally:
        layer.probe = before
    B, H = probe.out.shape[:2]
    return probe.out, probe.query_to_kv.expand(B, H)


def _relative(out: Tensor, reference: Tensor, rows: Optional[slice]) -> float:
    """``||out - reference||^2 / ||reference - its mean||^2`` over the rows that reach the model's output."""
    sl = rows or slice(None)
    ref = reference[:, sl]
    return float((out[:, sl] - ref).square().sum() / (ref - ref.mean((0, 1))).square().sum().clamp_min(1e-30))


@torch.no_grad()
def _kv_head_errors(teacher: GroupedQueryAttention, teacher_in: Tensor, layer: GroupedQueryAttention,
                    layer_in: Tensor, kwargs: Dict[str, Any], rows: Optional[slice], batch: int) -> List[float]:
    """How far each KV head's query heads output (through the projection) from the MHA heads', each model on
    its own tokens, relative to the MHA layer's output (cross terms between heads left out); in chunks of
    ``batch`` images, each head's error through its projection's Gram matrix (no (B, H, T, dim) tensor)."""
    H, d, G = layer.num_heads, layer.head_dim, layer.num_kv_heads
    sl = rows or slice(None)
    w_t, w_s = teacher.proj.weight.view(-1, H, d), layer.proj.weight.view(-1, H, d)
    gram = torch.einsum('ohd,ohe->hde', w_s, w_s)  # (H, d, d)
    per_kv = torch.zeros(G, dtype=torch.float64, device=layer_in.device)
    reference = 0.0
    for start in range(0, teacher_in.shape[0], batch):
        o_t, _ = _heads_out(teacher, teacher_in[start:start + batch], kwargs)
        o_s, route = _heads_out(layer, layer_in[start:start + batch], kwargs)
        reference += float(torch.einsum('bhtd,ohd->bto', o_t[:, :, sl], w_t).square().sum())
        delta = o_s[:, :, sl] - o_t[:, :, sl]
        per_head = torch.einsum('bhtd,hde,bhte->bh', delta, gram, delta)
        per_kv.scatter_add_(0, route.reshape(-1), per_head.reshape(-1).double())
    return (per_kv / max(reference, 1e-30)).tolist()


class _AttnInput:
    """Captures what a block gives its attention layer (tokens after the block's norm, and keyword arguments):
    the first ``limit`` images' (all when None)."""

    def __init__(self, attn: nn.Module, limit: Optional[int] = None) -> None:
        self.inputs: List[Tensor] = []
        self.kwargs: Dict[str, Any] = {}
        self.kept, self.limit = 0, limit
        self.handle = attn.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        x = args[0] if args else kwargs['x']
        if self.limit is not None:
            x = x[:max(self.limit - self.kept, 0)]
        self.kept += x.shape[0]
        self.inputs.append(x)
        self.kwargs = {k: v for k, v in kwargs.items() if k != 'x'}

    def remove(self) -> None:
        self.handle.remove()

    def result(self) -> Tuple[Tensor, Dict[str, Any]]:
        return torch.cat(self.inputs), self.kwargs


class _Stop(Exception):
    """Raised by :func:`_attention_inputs`' hook: the rest of the block is not needed."""


def _run_block(block: nn.Module, tokens: Tensor, context: Dict[str, Any], batch: int,
               capture: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor], Dict[str, Any]]:
    """``block`` over ``tokens`` in chunks; with ``capture=k``, also its attention layer's inputs for the first
    k images."""
    hook = _AttnInput(block.attn, capture) if capture is not None else None
    try:
        out = torch.cat([block(tokens[i:i + batch], **context) for i in range(0, tokens.shape[0], batch)])
    finally:
        if hook is not None:
            hook.remove()
    attn_in, kwargs = hook.result() if hook is not None else (None, {})
    return out, attn_in, kwargs


def _attention_inputs(block: nn.Module, tokens: Tensor, context: Dict[str, Any],
                      batch: int) -> Tuple[Tensor, Dict[str, Any]]:
    """What ``block`` gives its attention layer for ``tokens``, without running the attention or the MLP."""
    hook = _AttnInput(block.attn)

    def stop(module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        raise _Stop

    handle = block.attn.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for i in range(0, tokens.shape[0], batch):
            try:
                block(tokens[i:i + batch], **context)
            except _Stop:
                pass
    finally:
        handle.remove()
        hook.remove()
    return hook.result()


def _kv_tensors(layer: GroupedQueryAttention) -> List[Tuple[nn.Parameter, slice]]:
    """The parameters (and their K/V rows) that hold a layer's key and value projections."""
    if layer.qkv is not None:
        a, kv = layer.qkv_split[0], sum(layer.qkv_split[1:])
        out = [(layer.qkv.weight, slice(a, a + kv))]
        if layer.qkv.bias is not None:
            out.append((layer.qkv.bias, slice(a, a + kv)))
        if layer.v_bias is not None:
            out.append((layer.v_bias, slice(None)))
        return out
    out = []
    for proj in (layer.k_proj, layer.v_proj):
        out += [(p, slice(None)) for p in (proj.weight, proj.bias) if p is not None]
    return out


def _trainable(layer: GroupedQueryAttention, params: str) -> List[Tuple[nn.Parameter, Optional[Tensor]]]:
    """``(parameter, gradient mask or None)`` of what calibration moves."""
    if params == 'all':
        names = ('qkv', 'q_proj', 'k_proj', 'v_proj', 'proj')
        out = [(p, None) for n in names if getattr(layer, n, None) is not None for p in getattr(layer, n).parameters()]
        out += [(p, None) for p in (layer.q_bias, layer.v_bias) if p is not None]
        return out
    out = []
    for param, rows in _kv_tensors(layer):
        mask = torch.zeros_like(param)
        mask[rows] = 1
        out.append((param, None if bool(mask.all()) else mask))
    return out


def _qkv_heads(layer: GroupedQueryAttention, x: Tensor, kwargs: Dict[str, Any]) -> Tuple[Tensor, Tensor, Tensor]:
    """q ``(B, H, T, d)`` and k, v ``(B, G, T, d)`` as the layer's forward computes them (norms, RoPE)."""
    B, N, _ = x.shape
    q, k, v = layer.project(x)
    q = layer.q_norm(q.view(B, N, layer.num_heads, layer.head_dim).transpose(1, 2))
    k = layer.k_norm(k.view(B, N, layer.num_kv_heads, layer.head_dim).transpose(1, 2))
    v = layer.v_norm(v.view(B, N, layer.num_kv_heads, layer.head_dim).transpose(1, 2))
    rope = context_rope(kwargs)
    return layer.rotate(q, rope), layer.rotate(k, rope), v


def _augmented(x: Tensor, bias: bool) -> Tensor:
    return torch.cat([x, torch.ones_like(x[..., :1])], -1) if bias else x


def _routing(layer: GroupedQueryAttention, x: Tensor, kwargs: Dict[str, Any]) -> Tensor:
    """The ``(B, H)`` KV head of every query head that ``layer``'s policy picks for ``x`` (keys only)."""
    norms = None
    if layer.policy.uses_key_norms:
        _, k, _ = _qkv_heads(layer, x, kwargs)
        norms = key_head_norms(k, kwargs.get('attn_mask'))
    return layer.policy(norms).query_to_kv.expand(x.shape[0], layer.num_heads)


def _ridge_solve(lhs: Tensor, rhs: Tensor, prior: Tensor, strength: float) -> Tensor:
    """``argmin_W ||A W - B||^2 + lam ||W - prior||^2`` from the normal equations (``lhs = A^T A``,
    ``rhs = A^T B``), ``lam`` = ``strength`` x the mean of A^T A's diagonal, batched over the first dim: where
    the calibration data does not pin a direction down, the mean-pooled weights stay."""
    lam = strength * lhs.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[:, None, None]
    eye = torch.eye(lhs.shape[-1], dtype=lhs.dtype, device=lhs.device)
    factor, info = torch.linalg.cholesky_ex(lhs + lam * eye)  # positive definite: the ridge sees to it
    if bool(info.any()):
        return prior
    return torch.cholesky_solve(rhs + lam * prior, factor)


@torch.no_grad()
def _closed_form(teacher: GroupedQueryAttention, student: GroupedQueryAttention, x: Tensor,
                 kwargs: Dict[str, Any], batch: int, parallel: bool = False) -> None:
    """Stage 1 (see the module docstring), in place on ``student``'s K/V projections (mean-pooled on entry);
    ``parallel``: its sums over ``x`` split between the processes (module docstring)."""
    H, G, d = student.num_heads, student.num_kv_heads, student.head_dim
    (_, w_k, _), (_, b_k, _) = _qkv_tensors(teacher)
    (_, pooled_k, pooled_v), (_, pooled_bk, pooled_bv) = _qkv_tensors(student)
    k_bias = b_k is not None and _has_bias(student, 1)
    # Which KV head each query head reads (how often): the mean-pooled start's routing on these images.
    dd = dict(dtype=torch.float64, device=x.device)
    counts = torch.zeros(H, G, **dd)
    cov = torch.zeros(H, d, d, **dd)
    part = process_part(x) if parallel else x
    for start in range(0, part.shape[0], batch):
        xb = part[start:start + batch]
        q, _, _ = _qkv_heads(teacher, xb, kwargs)
        cov += torch.einsum('bhtd,bhte->hde', q.double(), q.double())
        counts += F.one_hot(_routing(student, xb, kwargs), G).double().sum(0)
    if parallel:
        cov, counts = sum_over_processes(cov), sum_over_processes(counts)
    weight = counts / counts.sum(0, keepdim=True).clamp_min(1)  # (H, G): query head h's weight in KV head g
    wk = w_k.double().view(H, d, -1)
    prior = pooled_k.double().view(G, d, -1)
    if k_bias:
        wk = torch.cat([wk, b_k.double().view(H, d, 1)], -1)
        prior = torch.cat([prior, pooled_bk.double().view(G, d, 1)], -1)
    lhs = torch.einsum('hg,hde->gde', weight, cov)
    rhs = torch.einsum('hg,hde,hef->gdf', weight, cov, wk)
    new_k = _ridge_solve(lhs, rhs, prior, RIDGE)  # (G, d, D [+1])
    _write(student, 1, new_k[..., :w_k.shape[1]].reshape(G * d, -1), new_k[..., -1].reshape(-1) if k_bias else None)
    v_bias = pooled_bv is not None and _has_bias(student, 2)
    prior_v = pooled_v.double().view(G, d, -1)
    if v_bias:
        prior_v = torch.cat([prior_v, pooled_bv.double().view(G, d, 1)], -1)
    _refit_values(teacher, student, x, kwargs, batch, v_bias, prior_v, parallel)


def _refit_values(teacher: GroupedQueryAttention, student: GroupedQueryAttention, x: Tensor,
                  kwargs: Dict[str, Any], batch: int, bias: bool, prior: Tensor, parallel: bool = False) -> None:
    """Each shared value projection by (ridge) least squares: the heads it serves, under the student's maps,
    should output what the MHA heads output (``parallel``: the normal equations summed over the processes'
    parts of ``x``)."""
    H, G, d = student.num_heads, student.num_kv_heads, student.head_dim
    D = x.shape[-1] + int(bias)
    lhs = torch.zeros(G, D, D, dtype=torch.float64, device=x.device)
    rhs = torch.zeros(G, D, d, dtype=torch.float64, device=x.device)
    T = x.shape[1]
    step = max(1, min(batch, CHUNK_VALUES // (H * T * T)))
    part = process_part(x) if parallel else x
    for start in range(0, part.shape[0], step):
        xb = part[start:start + step]
        o_t, _ = _heads_out(teacher, xb, kwargs)
        maps, route = _maps(student, xb, kwargs)  # (B, H, T, T), (B, H)
        z = (maps @ _augmented(xb, bias)[:, None]).flatten(0, 1)  # (B H, T, D): what each head's map gathers
        o_t, route = o_t.flatten(0, 1), route.reshape(-1)
        for g in range(G):  # one GEMM per KV head over the (image, query head) pairs it served
            served = (route == g).nonzero().squeeze(1)
            zg = z.index_select(0, served).reshape(-1, D)
            lhs[g] += (zg.T @ zg).double()
            rhs[g] += (zg.T @ o_t.index_select(0, served).reshape(-1, d)).double()
    if parallel:
        lhs, rhs = sum_over_processes(lhs), sum_over_processes(rhs)
    new_v = _ridge_solve(lhs, rhs, prior.transpose(1, 2), RIDGE).transpose(1, 2)  # (G, d, D)
    _write(student, 2, new_v[..., :x.shape[-1]].reshape(G * d, -1), new_v[..., -1].reshape(-1) if bias else None)


def _maps(layer: GroupedQueryAttention, x: Tensor, kwargs: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    """Post-softmax maps ``(B, H, T, T)`` of ``layer`` on ``x`` (what multiplies V) and the routing ``(B, H)``
    that made them."""
    q, k, v = _qkv_heads(layer, x, kwargs)
    norms = key_head_norms(k, kwargs.get('attn_mask')) if layer.policy.uses_key_norms else None
    grouping = layer.policy(norms)
    route = grouping.query_to_kv.expand(x.shape[0], layer.num_heads)
    scores = (q * layer.scale) @ route_kv(k, route).transpose(-2, -1)
    bias = layer.position_bias(kwargs.get('attn_mask'), shared_bias(kwargs))
    if bias is not None:
        scores = scores + bias
    # the weights that multiply V: for talking heads (CaiT) the logits and the weights mixed across heads
    return mix_heads(mix_heads(scores, layer.proj_l).softmax(-1), layer.proj_w), route


def _has_bias(layer: GroupedQueryAttention, which: int) -> bool:
    """Whether ``layer`` can hold a bias for projection ``which`` (1: keys, 2: values)."""
    if layer.qkv is not None:
        return layer.qkv.bias is not None or (which == 2 and layer.v_bias is not None)
    return (layer.k_proj if which == 1 else layer.v_proj).bias is not None


@torch.no_grad()
def _write(layer: GroupedQueryAttention, which: int, weight: Tensor, bias: Optional[Tensor]) -> None:
    """Replace ``layer``'s key (1) or value (2) projection."""
    weights, biases = _qkv_tensors(layer)
    weights = [w.clone() for w in weights]
    biases = [b.clone() if b is not None else None for b in biases]
    weights[which] = weight.to(weights[which])
    if bias is not None:
        biases[which] = bias.to(weights[which])
    _load_qkv(layer, weights, biases)


def step_images(layer: GroupedQueryAttention, budget: CalibrationBudget, tokens: int) -> int:
    """Images per optimisation step: ``budget.batch_images``, fewer when the step's attention maps (kept for the
    backward pass) would pass :data:`CHUNK_VALUES` floats -- memory stays bounded at any resolution."""
    return max(1, min(budget.batch_images, CHUNK_VALUES // (layer.num_heads * tokens * tokens)))


def block_flops(block: nn.Module, tokens: int) -> float:
    """Forward FLOPs of ``block`` for one image of ``tokens`` tokens (2 per multiply-add: weights and maps)."""
    params = sum(p.numel() for p in block.parameters())
    return 2 * params * tokens + 4 * tokens * tokens * out_projection(block.attn).in_features  # H x head dim in


def _step_flops(block: nn.Module, images: int, tokens: int) -> float:
    """Forward + backward FLOPs of one optimisation step through ``block`` (backward about twice the forward)."""
    return 3 * images * block_flops(block, tokens)


def _optimise(block: nn.Module, layer: GroupedQueryAttention, inputs: Tensor, targets: Tensor,
              context: Dict[str, Any], rows: Optional[slice], steps: int, budget: CalibrationBudget) -> None:
    """Stage 2 (see the module docstring): ``block(inputs) -> targets`` on the rows that reach the output."""
    trainable = _trainable(layer, budget.params)
    groups = [dict(params=[p], lr=budget.lr * float(p.detach().float().square().mean().sqrt().clamp_min(1e-8)))
              for p, _ in trainable]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    gen = torch.Generator().manual_seed(budget.seed)
    n, sl = inputs.shape[0], rows or slice(None)
    per_step = step_images(layer, budget, inputs.shape[1])
    scale = targets[:, sl].var().clamp_min(1e-12)
    frozen = [p for p in block.parameters() if not any(p is q for q, _ in trainable)]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for p, _ in trainable:
            p.requires_grad_(True)
        order = torch.randperm(n, generator=gen)
        pos = 0
        for _ in range(steps):
            if pos + min(per_step, n) > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + per_step]
            pos += len(idx)
            with torch.enable_grad():
                out = block(inputs[idx], **context)
                loss = F.mse_loss(out[:, sl], targets[idx][:, sl]) / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
            for p, mask in trainable:
                if mask is not None and p.grad is not None:
                    p.grad.mul_(mask)
            opt.step()
            sched.step()
    finally:
        for p, flag in zip(frozen, flags):
            p.requires_grad_(flag)
        for p, _ in trainable:
            p.grad = None


@torch.no_grad()
def _block_loss(block: nn.Module, tokens: Tensor, targets: Tensor, context: Dict[str, Any],
                rows: Optional[slice], batch: int) -> float:
    """The optimisation's objective on ``tokens`` (relative squared error of the block's output rows)."""
    out, _, _ = _run_block(block, tokens, context, batch)
    sl = rows or slice(None)
    return float((out[:, sl] - targets[:, sl]).square().mean() / targets[:, sl].var().clamp_min(1e-12))


def _weights(layer: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def _calibrate_layer(block: nn.Module, teacher: GroupedQueryAttention, student: GroupedQueryAttention,
                     x_s: Tensor, y_t: Tensor, context: Dict[str, Any], rows: Optional[slice], steps: int,
                     budget: CalibrationBudget, batch: int, parallel: bool = False) -> None:
    """Both stages for one layer (``block.attn`` is ``student``, mean-pooled on entry), fitted on all but the
    last images, which check them: a stage's result is kept only if it lowers the objective on those unseen
    images, so calibration never leaves a layer worse there than mean-pooling (nor overfits a few images)."""
    n = x_s.shape[0]
    held = min(CHECK_IMAGES, max(1, n // CHECK_FRACTION)) if n > 1 else 0
    fit, check = slice(0, n - held), slice(n - held, n) if held else slice(0, n)
    policy = {k: v.clone() for k, v in student.policy.state_dict().items()}
    best = _block_loss(block, x_s[check], y_t[check], context, rows, batch), _weights(student)
    in_s, kwargs = _attention_inputs(block, x_s[fit], context, batch)
    _closed_form(teacher, student, in_s, kwargs, batch, parallel)
    student.policy.load_state_dict(policy)
    stages = [lambda: None]
    if steps:
        stages.append(lambda: _optimise(block, student, x_s[fit], y_t[fit], context, rows, steps, budget))
    for stage in stages:
        stage()
        student.policy.load_state_dict(policy)
        loss = _block_loss(block, x_s[check], y_t[check], context, rows, batch)
        if loss < best[0]:
            best = loss, _weights(student)
        else:
            student.load_state_dict(best[1])


def calibrate_layers(vit: nn.Module, teachers: Sequence[nn.Module], students: Sequence[GroupedQueryAttention],
                     images: Tensor, budget: CalibrationBudget = CalibrationBudget(), batch: int = 64,
                     progress: Optional[Callable[[float, str], None]] = None,
                     parallel: bool = False) -> CalibrationReport:
    """Put ``students`` (the converted layers, mean-pooled) into ``vit``'s blocks, calibrating each in order
    against ``teachers`` (its blocks' MHA layers, in the students' head order) on ``images``; ``parallel``:
    the closed form's sums split between the processes (see the module docstring).

    All or nothing: on any failure every block gets its teacher back and the exception propagates.
    """
    start_time = time.perf_counter()
    images = check_calibration(images, vit)
    blocks = list(blocks_of(vit))
    if not (len(blocks) == len(teachers) == len(students)):
        raise ValueError('one teacher and one student layer per block')
    mha = [GroupedQueryAttention.from_attention(t, 'mha').eval() for t in teachers]
    for teacher, student in zip(mha, students):  # a model-wide shared bias (BEiT) follows the head order
        teacher.source_heads = list(student.source_heads) if student.source_heads is not None else None
    originals = [b.attn for b in blocks]
    was_training = vit.training
    vit.eval()  # dropout and drop-path off: calibration is deterministic
    report = CalibrationReport(images=images.shape[0], steps_per_layer=budget.steps, params=budget.params,
                               flops=0.0, seconds=0.0)
    try:
        with torch.no_grad():
            context = block_context(vit, images[:1])
            x_t = x_s = block_inputs(vit, images)
        T = x_t.shape[1]
        # images per chunk of every pass: a fused kernel may still materialise the maps (e.g. SDPA with GQA)
        batch = max(1, min(batch, CHUNK_VALUES // (max(s.num_heads for s in students) * T * T)))
        per_step = [_step_flops(b, min(step_images(s, budget, T), images.shape[0]), T)
                    for b, s in zip(blocks, students)]
        steps = budget.steps
        if budget.max_flops is not None and steps:
            steps = min(steps, int(budget.max_flops // sum(per_step)))
        report.steps_per_layer = steps
        sample = slice(0, REPORT_IMAGES)
        x_m = x_t[sample]  # the mean-pooled conversion's tokens, for the report
        for index, (block, teacher, student) in enumerate(zip(blocks, mha, students)):
            rows = output_rows(vit, index)
            policy = {k: v.clone() for k, v in student.policy.state_dict().items()}  # eval may move it (official)
            mean_pooled = copy.deepcopy(student)
            with torch.no_grad():
                block.attn = teacher
                y_t, in_t, kw = _run_block(block, x_t, context, batch, capture=REPORT_IMAGES)
                block.attn = mean_pooled
                y_m, in_m, _ = _run_block(block, x_m, context, batch, capture=REPORT_IMAGES)
            block.attn = student
            if not (student.num_kv_heads == student.num_heads and student.policy.fixed_at_inference):
                _calibrate_layer(block, teacher, student, x_s, y_t, context, rows, steps, budget, batch, parallel)
                report.flops += steps * per_step[index]
            # else nothing is shared: the converted layer is the MHA layer, kept exactly
            with torch.no_grad():
                x_s, in_s, _ = _run_block(block, x_s, context, batch, capture=REPORT_IMAGES)
                report.error_mean_pooled.append(_relative(y_m, y_t[sample], rows))
                report.error_calibrated.append(_relative(x_s[sample], y_t[sample], rows))
                report.error_mean_pooled_per_kv_head.append(
                    _kv_head_errors(teacher, in_t, mean_pooled, in_m, kw, rows, batch))
                report.error_calibrated_per_kv_head.append(
                    _kv_head_errors(teacher, in_t, student, in_s, kw, rows, batch))
            student.policy.load_state_dict(policy)
            x_t, x_m = y_t, y_m
            if progress is not None:
                progress((index + 1) / len(blocks), f'calibrating layer {index + 1} of {len(blocks)}')
    except BaseException:
        for block, attn in zip(blocks, originals):
            block.attn = attn
        vit.train(was_training)
        raise
    vit.train(was_training)
    for student in students:  # the random streams too (official DGQA's repair, PGQA's noise): as if fresh
        student.policy._generators.clear()
    report.seconds = time.perf_counter() - start_time
    return report


@torch.no_grad()
def layer_errors(mha: nn.Module, converted: nn.Module, images: Tensor, batch: int = 64) -> List[float]:
    """Per layer, how far ``converted``'s tokens after each block are from ``mha``'s on ``images`` (the measure
    of :class:`CalibrationReport`), e.g. on held-out images."""
    mha_vit, vit = check_vit(mha), check_vit(converted)
    context = block_context(mha_vit, images[:1])
    x = y = block_inputs(mha_vit, images)
    errors = []
    for index, (reference, block) in enumerate(zip(blocks_of(mha_vit), blocks_of(vit))):
        x = run_blocks([reference], x, batch, context)
        y = run_blocks([block], y, batch, context)
        errors.append(_relative(y, x, output_rows(mha_vit, index)))
    return errors
