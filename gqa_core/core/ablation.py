"""Removing heads from a forward, many removals in one batch.

``with ablate(model, query_heads=Q, kv_heads=K, mode='zero'): model(x)`` where ``Q`` is ``(B, L, H)`` and ``K``
``(B, L, G)`` boolean: batch row b removes, in layer l, the query heads ``Q[b, l]`` and every query head that a
KV head in ``K[b, l]`` serves *in that forward* (after the policy has routed the queries, so per-image variants
keep their routing). See :func:`~gqa_core.core.probe.ablated_output` for the two modes. One ``torch.where``
per layer: every ablation of a model runs as one batched forward.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from .probe import ABLATION_MODES, HeadAblation, attach, detach
from .vit import gqa_layers

__all__ = ['ablate', 'ABLATION_MODES']


class ablate:
    """Context manager: the next forwards of ``model`` remove the heads the masks name (see module doc)."""

    def __init__(self, model: nn.Module, query_heads: Optional[Tensor] = None, kv_heads: Optional[Tensor] = None,
                 mode: str = 'zero') -> None:
        if mode not in ABLATION_MODES:
            raise ValueError(f'mode must be one of {ABLATION_MODES}, got {mode!r}')
        self.layers = gqa_layers(model)
        if not self.layers:
            raise ValueError(f'{type(model).__name__} has no grouped-query attention layers; call convert() first')
        L = len(self.layers)
        for name, mask in (('query_heads', query_heads), ('kv_heads', kv_heads)):
            if mask is not None and (mask.dim() != 3 or mask.shape[1] != L or mask.dtype != torch.bool):
                raise ValueError(f'{name} must be a boolean (B, {L}, heads) mask')
        self.query_heads, self.kv_heads, self.mode = query_heads, kv_heads, mode

    def __enter__(self) -> 'ablate':
        def layer_mask(mask: Optional[Tensor], i: int, width: int) -> Optional[Tensor]:
            return mask[:, i, :width] if mask is not None else None  # layers may have fewer KV heads than the mask
        attach(self.layers, [HeadAblation(layer_mask(self.query_heads, i, layer.num_heads),
                                          layer_mask(self.kv_heads, i, layer.num_kv_heads), self.mode)
                             for i, layer in enumerate(self.layers)])
        return self

    def __exit__(self, *exc: Any) -> None:
        detach(self.layers)
