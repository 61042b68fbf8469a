"""Removing heads from a forward, many removals in one batch.

``with ablate(model, query_heads=Q, kv_heads=K, mode='zero'): model(x)`` where ``Q`` is ``(B, L, H)`` and ``K``
``(B, L, G)`` boolean: batch row b removes, in layer l, the query heads ``Q[b, l]`` and every query head that a
KV head in ``K[b, l]`` serves *in that forward* (after the policy has routed the queries, so per-image variants
keep their routing). ``mode="zero"`` zeroes a removed head's output -- what zeroing its K and V gives; ``"mean"``
gives it uniform attention over its KV head's values -- what replacing its K and V by their mean over tokens
gives. One ``torch.where`` per layer: every ablation of a model runs as one batched forward.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = ['ablate', 'ABLATION_MODES', 'ablated_output']

ABLATION_MODES = ('zero', 'mean')


def ablated_output(x: Tensor, v: Tensor, query_to_kv: Tensor, query_mask: Optional[Tensor],
                   kv_mask: Optional[Tensor], mode: str) -> Tensor:
    """x: ``(B, H, T, d)`` attention output; v: ``(B, G, T, d)``; query_to_kv: ``(H,)`` or ``(B, H)``."""
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


class ablate:
    """Context manager: the next forwards of ``model`` remove the heads the masks name (see module doc)."""

    def __init__(self, model: nn.Module, query_heads: Optional[Tensor] = None, kv_heads: Optional[Tensor] = None,
                 mode: str = 'zero') -> None:
        if mode not in ABLATION_MODES:
            raise ValueError(f'mode must be one of {ABLATION_MODES}, got {mode!r}')
        from .convert import gqa_layers  # convert -> attention -> this module: import when used
        self.layers = gqa_layers(model)
        if not self.layers:
            raise ValueError(f'{type(model).__name__} has no grouped-query attention layers; call convert() first')
        L = len(self.layers)
        for name, mask in (('query_heads', query_heads), ('kv_heads', kv_heads)):
            if mask is not None and (mask.dim() != 3 or mask.shape[1] != L or mask.dtype != torch.bool):
                raise ValueError(f'{name} must be a boolean (B, {L}, heads) mask')
        self.query_heads, self.kv_heads, self.mode = query_heads, kv_heads, mode

    def __enter__(self) -> 'ablate':
        for i, layer in enumerate(self.layers):
            q = self.query_heads[:, i] if self.query_heads is not None else None
            kv = self.kv_heads[:, i] if self.kv_heads is not None else None
            layer.ablation = (q, kv, self.mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers:
            layer.ablation = None
