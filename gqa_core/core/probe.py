"""The one slot through which a forward of :class:`~gqa_core.core.attention.GroupedQueryAttention` is watched
or edited: recording (:mod:`gqa_core.core.record`) and head ablation (:mod:`gqa_core.core.ablation`) are both
probes. A layer with no probe pays one ``is None`` check; a layer holds at most one probe at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .policies import Grouping

__all__ = ['AttentionProbe', 'HeadAblation', 'ablated_output', 'ABLATION_MODES', 'attach', 'detach']

ABLATION_MODES = ('zero', 'mean')


class AttentionProbe:
    """Base probe: sees what a layer computed (``observe``) and may replace its attention output (``edit``)."""
    needs_key_norms: bool = False  # the layer computes key norms for this probe even when its policy does not

    def edit(self, out: Tensor, v: Tensor, grouping: Grouping) -> Tensor:
        """``out`` ``(B, H, T, d)`` before the output projection; ``v`` ``(B, G, T, d)``."""
        return out

    def observe(self, layer: nn.Module, q: Tensor, k: Tensor, key_norms: Optional[Tensor], grouping: Grouping,
                attn_mask: Optional[Tensor]) -> None:
        """Called after the attention output is computed (and edited)."""


def attach(layers: list, probes: list) -> None:
    """Put one probe on each layer, or none at all when any layer already holds one."""
    busy = [i for i, layer in enumerate(layers) if layer.probe is not None]
    if busy:
        raise ValueError(f'layer {busy[0]} already has a probe ({type(layers[busy[0]].probe).__name__}); '
                         'record and ablate one at a time')
    for layer, probe in zip(layers, probes):
        layer.probe = probe


def detach(layers: list) -> None:
    for layer in layers:
        layer.probe = None


def ablated_output(x: Tensor, v: Tensor, query_to_kv: Tensor, query_mask: Optional[Tensor],
                   kv_mask: Optional[Tensor], mode: str) -> Tensor:
    """x: ``(B, H, T, d)`` attention output; v: ``(B, G, T, d)``; query_to_kv: ``(H,)`` or ``(B, H)``.

    Batch row b removes the query heads ``query_mask[b]`` and every query head a KV head in ``kv_mask[b]``
    serves in this forward. ``"zero"`` zeroes a removed head's output (what zeroing its K and V gives);
    ``"mean"`` gives it uniform attention over its KV head's values (what their mean over tokens gives).
    """
    B, H = x.shape[:2]
    routing = query_to_kv.expand(B, H) if query_to_kv.dim() == 1 else query_to_kv
    mask = torch.zeros(B, H, dtype=torch.bool, device=x.device)
    if query_mask is not None:
        mask |= query_mask
    if kv_mask is not None:
        mask |= kv_mask.gather(1, routing)
    if mode == 'zero':
        replacement = torch.zeros((), dtype=x.dtype, device=x.device)
    else:  # uniform attention over the KV head's tokens = the mean of its values
        means = v.mean(2, keepdim=True)  # (B, G, 1, d)
        replacement = means[torch.arange(B, device=x.device)[:, None], routing]  # (B, H, 1, d)
    return torch.where(mask[:, :, None, None], replacement, x)


class HeadAblation(AttentionProbe):
    """Removes heads of one layer: ``query_mask`` ``(B, H)`` and / or ``kv_mask`` ``(B, G)`` boolean."""

    def __init__(self, query_mask: Optional[Tensor], kv_mask: Optional[Tensor], mode: str) -> None:
        if mode not in ABLATION_MODES:
            raise ValueError(f'mode must be one of {ABLATION_MODES}, got {mode!r}')
        self.query_mask, self.kv_mask, self.mode = query_mask, kv_mask, mode

    def edit(self, out: Tensor, v: Tensor, grouping: Grouping) -> Tensor:
        return ablated_output(out, v, grouping.query_to_kv, self.query_mask, self.kv_mask, self.mode)
