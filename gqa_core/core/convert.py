"""Converting timm Vision Transformers between multi-head attention and the grouped-query family."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from torch import Tensor, nn

from .attention import (ATTENTION_KINDS, GroupedQueryAttention, attention_kind, kv_as_built, kv_bytes,
                        multi_head_equivalent, not_as_built)
from .calibrate import CalibrationBudget, calibrate_layers, check_calibration
from .head_order import HEAD_ORDERS, advise_head_order, check_permutations, permute_heads
from .vit import blocks_of, check_positions, check_vit, gqa_layers, num_tokens

__all__ = ['convert', 'revert', 'INITS', 'check_convertible', 'grouping_config', 'kv_cache_bytes', 'source_heads',
           'block_kv_heads', 'native_kv_heads', 'kv_heads_label', 'check_kv_as_built']


INITS = ('mean', 'calibrated')  # how the shared K/V heads are initialised from the MHA's


def convert(
        model: nn.Module,
        variant: str,
        num_kv_heads: Optional[Union[int, Sequence[int]]] = None,
        head_order: Union[str, Sequence[Sequence[int]]] = 'consecutive',
        calibration: Optional[Tensor] = None,
        max_refine_flops: Optional[float] = None,
        init: str = 'mean',
        budget: Optional[CalibrationBudget] = None,
        progress: Optional[Callable[[float, str], None]] = None,
        parallel: bool = False,
        **policy_options: Any,
) -> nn.Module:
    """Swap every block's attention of a timm ViT (``VisionTransformer``, ``Eva``, ``Beit``), in place, for
    :class:`GroupedQueryAttention`.

    From timm's multi-head attention layer (any kind in :data:`~gqa_core.core.attention.ATTENTION_KINDS`) the
    K/V heads are mean-pooled in consecutive blocks of H/G; Q, the output projection and what the kind adds
    (RoPE, BEiT's position bias) are kept; no other weight is touched (the final norm included). A model converted
    before can change policy at the same G (weights kept) or be re-pooled from G = H. ``policy_options``
    go to the policy (``compat``, ``seed``, ``stat``, ``window``, ``beta``, ``noise_scale``, ...).

    ``num_kv_heads``: one G for every block, one per block (a sequence), or None for the G each block has now --
    a model that already shares K/V heads (timm's Sapiens2, ``Eva`` / ``NaFlexVit`` with ``num_kv_heads``) then
    keeps them as they are under the chosen policy; ``"mha"`` with None expands every block to H KV heads.

    ``head_order`` decides which MHA heads share a KV head (the heads are pooled in this order, H/G at a time):
    ``"consecutive"`` (the paper's), ``"output-error"`` (chosen per layer on the ``calibration`` images, see
    :mod:`gqa_core.core.head_order`) or one order per layer. Other orders permute the MHA's heads
    (function-preserving) before pooling; each layer's
    ``source_heads`` then records which original head sits at each position. ``max_refine_flops`` bounds the
    advisor's model-output comparison (for live requests).

    ``init``: ``"mean"`` (the paper's mean-pooling) or ``"calibrated"`` -- each converted layer then fitted on
    the unlabeled ``calibration`` images to the MHA layer's output (:mod:`gqa_core.core.calibrate`: a closed
    form, then ``budget`` of optimisation steps on the layer's K/V, Q and output projections); nothing outside
    the attention layers changes, layers that share nothing (G = H, a static policy) are kept exactly, and the
    :class:`~gqa_core.core.calibrate.CalibrationReport` is left on the model as ``calibration_report`` and a
    short record (saved in the config, shown on the card) as ``gqa_conversion``.
    ``progress(fraction, message)`` is called after each calibrated layer. A failure leaves the model as it was.
    ``parallel``: every process of a ``torch.distributed`` group converts with the same ``calibration``
    images and the advisor's scoring and the calibration's closed form are split between them
    (:func:`~gqa_core.core.head_order.advise_head_order`, :mod:`gqa_core.core.calibrate`).
    """
    if 'grouping' in policy_options:  # its name before 0.3; "grouping" is what a policy decides per forward
        warnings.warn('convert(grouping=...) is deprecated; use head_order=...', DeprecationWarning, stacklevel=2)
        head_order = policy_options.pop('grouping')
    vit = check_vit(model)
    if num_kv_heads is None and variant != 'mha':
        native = native_kv_heads(vit)
        if all(g == b.attn.num_heads for g, b in zip(native, blocks_of(vit))):
            raise ValueError(f'{variant}: num_kv_heads is required (every block has all {native[0]} KV heads)')
        num_kv_heads = native  # each block keeps the KV heads it has
    per_block = block_kv_heads(vit, num_kv_heads)
    attns = check_convertible(vit, num_kv_heads)
    if init not in INITS:
        raise ValueError(f'init must be one of {INITS}, got {init!r}')
    if init == 'calibrated':
        if calibration is None:
            raise ValueError('init="calibrated" needs calibration images (a tensor (N, 3, H, W))')
        check_calibration(calibration, vit)
        for index, block in enumerate(blocks_of(vit)):
            attn = block.attn  # a grouped source must compute what its expansion (the teacher) computes
            if (isinstance(attn, GroupedQueryAttention) and attn.num_kv_heads < attn.num_heads
                    and not attn.policy.consecutive_at_inference):
                raise ValueError(f'block {index}: init="calibrated" fits each layer to what the source layer computes, '
                                 f'and its {attn.policy.name.upper()} grouping is not consecutive and fixed; '
                                 'calibrate from the multi-head model (G = H)')
        budget = budget if budget is not None else CalibrationBudget()
    sources = [getattr(block.attn, 'source_heads', None) for block in blocks_of(vit)]
    perms = _head_order_permutations(vit, attns, head_order, calibration, num_kv_heads, max_refine_flops, parallel)
    if perms is not None:  # permute multi-head copies (timm's GQA expanded): a failure leaves the model as it was
        expanded = [multi_head_equivalent(a) for a in attns]  # a new layer, or ``a`` itself when it is multi-head
        attns = [copy.deepcopy(mha) if mha is a else mha for a, mha in zip(attns, expanded)]
        for attn, perm in zip(attns, perms):
            permute_heads(attn, perm)
        sources = perms
    # Build every new layer before touching the model: a failure (bad G, bad option) leaves it as it was.
    new_layers = []
    for index, (attn, g) in enumerate(zip(attns, per_block)):
        new = GroupedQueryAttention.from_attention(attn, variant, g, **policy_options)
        new.policy.stream = index
        new.source_heads = list(sources[index]) if sources[index] is not None else None
        new_layers.append(new)
    if init == 'calibrated':
        report = calibrate_layers(vit, attns, new_layers, calibration, budget, progress=progress, parallel=parallel)
        vit.calibration_report = report
        vit.gqa_conversion = dict(init='calibrated', images=report.images, steps_per_layer=report.steps_per_layer,
                                  params=report.params, seconds=round(report.seconds, 1))
        return vit
    for block, new in zip(blocks_of(vit), new_layers):
        block.attn = new
    vit.calibration_report = vit.gqa_conversion = None
    return vit


def block_kv_heads(model: nn.Module, num_kv_heads: Optional[Union[int, Sequence[int]]]) -> List[Optional[int]]:
    """``num_kv_heads`` as one entry per block (None: the block keeps the KV heads it has)."""
    vit = check_vit(model)
    depth = len(blocks_of(vit))
    if num_kv_heads is None or isinstance(num_kv_heads, int):
        return [num_kv_heads] * depth
    per_block = list(num_kv_heads)
    if len(per_block) != depth or not all(isinstance(g, int) for g in per_block):
        raise ValueError(f'num_kv_heads: give one integer, or one per block ({depth}), got {str(num_kv_heads)[:60]}')
    return per_block


def kv_heads_label(num_kv_heads: Union[int, Sequence[int], None]) -> str:
    """G as people read it: ``4``, or ``2-4 by block (4, 2, 2, 4)`` for a model whose blocks differ."""
    if num_kv_heads is None or isinstance(num_kv_heads, int):
        return str(num_kv_heads)
    per_block = list(num_kv_heads)
    if len(set(per_block)) == 1:
        return str(per_block[0])
    return f'{min(per_block)}–{max(per_block)} by block ({", ".join(map(str, per_block))})'


def check_kv_as_built(model: nn.Module, name: str, needed_by: str) -> bool:
    """Whether ``model`` shares K/V heads as it was built (timm's GQA ViTs, e.g. Sapiens2: the advisor and the
    explorer then start from its exact multi-head expansion); False for a multi-head model. A ``ValueError``
    naming ``name`` and ``needed_by`` when a layer is not :func:`~gqa_core.core.attention.kv_as_built` (its
    K/V pooled by a conversion, or a policy without fixed groups): the MHA it came from is the one to use."""
    layers = [block.attn for block in blocks_of(check_vit(model))]
    refused = next((a for a in layers if not kv_as_built(a)), None)
    if refused is not None:
        raise ValueError(f'{name}: {not_as_built(refused)}; {needed_by} starts from an MHA model (G = H) or one '
                         'that shares the K/V heads it was built with')
    return any(getattr(a, 'num_kv_heads', None) not in (None, a.num_heads) for a in layers)


def native_kv_heads(model: nn.Module) -> List[int]:
    """The KV heads each block's attention has now (H for multi-head layers)."""
    return [int(getattr(b.attn, 'num_kv_heads', None) or b.attn.num_heads) for b in blocks_of(model)]


def check_convertible(model: nn.Module, num_kv_heads: Optional[Union[int, Sequence[int]]] = None) -> List[nn.Module]:
    """Every block's attention layer of a ViT :func:`convert` takes, or a ``ValueError`` naming the first block
    that cannot be converted (nothing is changed either way)."""
    vit = check_vit(model)
    check_positions(vit)
    return [_convertible_attention(index, block, g)
            for index, (block, g) in enumerate(zip(blocks_of(vit), block_kv_heads(vit, num_kv_heads)))]


def _head_order_permutations(vit: nn.Module, attns: list, head_order: Any, calibration: Optional[Tensor],
                             num_kv_heads: Union[int, Sequence[int]],
                             max_refine_flops: Optional[float], parallel: bool = False) -> Optional[List[List[int]]]:
    if isinstance(head_order, str):
        if head_order == 'consecutive':
            return None
        if head_order not in HEAD_ORDERS:
            raise ValueError(f'head_order must be one of {HEAD_ORDERS} or one head order per layer, '
                             f'got {head_order!r}')
        if calibration is None:
            raise ValueError('head_order="output-error" needs calibration images (a tensor (N, 3, H, W))')
        if not isinstance(num_kv_heads, int):  # one G per block: the advisor takes one G for all
            if len(set(num_kv_heads)) != 1:
                raise ValueError('head_order="output-error" chooses groups for one G in every block, got a G per '
                                 f'block ({kv_heads_label(num_kv_heads)}); give one G, or a head order per layer')
            num_kv_heads = num_kv_heads[0]
        return advise_head_order(vit, num_kv_heads, calibration, max_refine_flops=max_refine_flops,
                                 parallel=parallel).permutations
    return check_permutations(head_order, len(attns), attns[0].num_heads)


def source_heads(model: nn.Module) -> Optional[List[List[int]]]:
    """Per layer, the original MHA head at each head position (None when every layer kept the MHA order)."""
    layers = gqa_layers(model)
    perms = [getattr(layer, 'source_heads', None) for layer in layers]
    if all(p is None or list(p) == list(range(len(p))) for p in perms):
        return None
    return [list(p) if p is not None else list(range(layer.num_heads)) for p, layer in zip(perms, layers)]


def _convertible_attention(index: int, block: nn.Module, num_kv_heads: Optional[int]) -> nn.Module:
    """The block's timm attention (MHA, a kind in :data:`ATTENTION_KINDS`), or a ``ValueError`` naming the block
    and what it holds instead."""
    attn = getattr(block, 'attn', None)
    if attn is None:
        raise ValueError(f'block {index} ({type(block).__name__}) has no single `attn` module (parallel or fused '
                         'attention blocks are not supported); the model was not changed')
    if isinstance(attn, GroupedQueryAttention):
        same_g = num_kv_heads in (None, attn.num_kv_heads)
        if not same_g and not kv_as_built(attn):
            raise ValueError(f'block {index} has G={attn.num_kv_heads}, {not_as_built(attn)}; convert to '
                             f'G={num_kv_heads} from the multi-head model (G = H), not from another grouping')
        return attn.to_attention(keep_weights=same_g)  # a policy change at the same G keeps the K/V as they are
    if attention_kind(attn) is None:
        known = ', '.join(f'{cls.__module__.split(".")[-1]}.{cls.__name__}' for cls in ATTENTION_KINDS.values())
        raise ValueError(f'block {index} ({type(block).__name__}): attention {type(attn).__name__} is not one of '
                         f'timm\'s {known}; the model was not changed')
    return attn


def revert(model: nn.Module) -> nn.Module:
    """Back to timm's own attention (MHA) in the original head order, exactly equivalent at inference for fixed
    groupings (a BEiT model's shared position bias included)."""
    vit = check_vit(model)
    for block in blocks_of(vit):
        if isinstance(block.attn, GroupedQueryAttention):
            order = block.attn.source_heads
            block.attn = block.attn.to_attention()
            if order is not None and list(order) != list(range(len(order))):
                permute_heads(block.attn, sorted(range(len(order)), key=list(order).__getitem__))
    return vit


def grouping_config(model: nn.Module) -> Dict[str, Any]:
    """The grouping every layer of ``model`` uses (variant, G, compat, policy options); layers must agree but
    for G, which is one integer, or a list with one per layer where blocks differ (a native GQA model)."""
    layers = gqa_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no grouped-query attention layers; call convert() first')
    configs = [dict(layer.grouping_config()) for layer in layers]
    kv_heads = [c.pop('num_kv_heads') for c in configs]
    if any(c != configs[0] for c in configs):
        raise ValueError('layers of this model use different groupings: ' + str(configs))
    return dict(configs[0], num_kv_heads=kv_heads[0] if len(set(kv_heads)) == 1 else kv_heads)


def kv_cache_bytes(model: nn.Module, bytes_per_value: int = 2) -> int:
    """Bytes of K and V one image occupies over all layers (fp16 by default) -- what grouping saves."""
    vit = check_vit(model)
    tokens = num_tokens(vit)
    total = 0
    for block in blocks_of(vit):
        attn = block.attn
        kv_heads = getattr(attn, 'num_kv_heads', attn.num_heads)  # timm's own MHA: G = H
        head_dim = getattr(attn, 'head_dim', None) or attn.proj.in_features // attn.num_heads  # CaiT's has none
        total += kv_bytes(kv_heads, head_dim, tokens, bytes_per_value)
    return total
