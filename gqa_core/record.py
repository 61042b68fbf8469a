"""Introspection: what every grouped-query layer saw and decided during a forward.

``with record(model) as rec: logits = model(x)`` then ``rec.result`` is a :class:`Recording`. Recording
never changes the forward's output: maps are computed beside the fused kernel, not instead of it. When no
recorder is attached the layers pay nothing but one ``is None`` check.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from .attention import GroupedQueryAttention, _uniform_index, route_kv
from .convert import gqa_layers, grouping_config
from .policies import Grouping

__all__ = ['LayerRecord', 'Recording', 'record', 'ATTENTION_ROWS']

ATTENTION_ROWS = ('prefix', 'full', 'none')


@dataclass
class LayerRecord:
    """One layer, batch-first, float32 / int64 on the CPU.

    attention: ``(B, H, R, T)`` post-softmax maps; R = T for ``"full"``; for ``"prefix"`` the rows of the
        prefix tokens (class token, then registers), or one row averaged over all queries when the model has
        no prefix token; ``None`` for ``"none"``.
    key_norms: ``(B, G)`` Frobenius norm of each key head.
    shares: ``(B, G)`` the normalised ratios the policy apportioned (uniform for static policies).
    allocation: ``(B, G)`` query heads per KV head. query_to_kv: ``(B, H)`` KV head of each query head.
    """
    attention: Optional[Tensor]
    key_norms: Tensor
    shares: Tensor
    allocation: Tensor
    query_to_kv: Tensor


@dataclass
class Recording:
    """All layers of one forward plus its logits. ``grid_size`` is the patch grid (rows, cols)."""
    layers: List[LayerRecord]
    logits: Tensor
    num_prefix_tokens: int
    grid_size: tuple
    attention_rows: str
    config: Dict[str, Any] = field(default_factory=dict)

    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(-1)

    def topk(self, k: int = 5) -> tuple:
        """``(probabilities, class indices)``, each ``(B, k)``."""
        return self.probabilities().topk(min(k, self.logits.shape[-1]), dim=-1)

    def stacked(self, name: str) -> np.ndarray:
        """One recorded quantity for all layers, layer-first: e.g. ``allocation`` -> ``(L, B, G)``."""
        return np.stack([getattr(layer, name).numpy() for layer in self.layers])

    def to_numpy(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {f.name: self.stacked(f.name) for f in fields(LayerRecord)
                               if self.layers and getattr(self.layers[0], f.name) is not None}
        out.update(logits=self.logits.float().numpy(), num_prefix_tokens=self.num_prefix_tokens,
                   grid_size=tuple(self.grid_size), attention_rows=self.attention_rows, config=dict(self.config))
        return out

    def to_json(self) -> str:
        def plain(value: Any) -> Any:
            return value.tolist() if isinstance(value, np.ndarray) else value
        return json.dumps({k: plain(v) for k, v in self.to_numpy().items()})


class record:
    """Context manager attaching a recorder to every :class:`GroupedQueryAttention` of ``model``.

    attention: ``"prefix"`` (class-token / register rows; cheap), ``"full"`` (all T x T) or ``"none"``.
    The last forward inside the block is kept in :attr:`result`.
    """

    def __init__(self, model: nn.Module, attention: str = 'prefix') -> None:
        if attention not in ATTENTION_ROWS:
            raise ValueError(f'attention must be one of {ATTENTION_ROWS}, got {attention!r}')
        self.model = model
        self.attention = attention
        self.layers_list = gqa_layers(model)
        if not self.layers_list:
            raise ValueError(f'{type(model).__name__} has no grouped-query attention layers; call convert() first')
        self.num_prefix_tokens = int(getattr(model, 'num_prefix_tokens', 0))
        patch_embed = getattr(model, 'patch_embed', None)
        self.grid_size = tuple(getattr(patch_embed, 'grid_size', ()) or ())
        self.config = grouping_config(model)
        self.result: Optional[Recording] = None
        self._layers: List[LayerRecord] = []
        self._hooks: list = []

    def __enter__(self) -> 'record':
        for layer in self.layers_list:
            layer.recorder = self._capture
        self._hooks = [
            self.model.register_forward_pre_hook(lambda *_: self._layers.clear()),
            self.model.register_forward_hook(self._finish),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.layers_list:
            layer.recorder = None
        for hook in self._hooks:
            hook.remove()

    @torch.no_grad()
    def _capture(self, layer: GroupedQueryAttention, q: Tensor, k: Tensor, key_norms: Tensor,
                 grouping: Grouping, attn_mask: Optional[Tensor]) -> None:
        B, H = q.shape[:2]
        routing = grouping.query_to_kv
        if routing is None:
            routing = _uniform_index(H, layer.num_kv_heads, q.device)
        maps = None
        if self.attention != 'none':
            rows = q if self.attention == 'full' or self.num_prefix_tokens == 0 else q[:, :, :self.num_prefix_tokens]
            scores = (rows.float() * layer.scale) @ route_kv(k.float(), routing).transpose(-2, -1)
            if self.attention == 'full':
                scores = maybe_add_mask(scores, resolve_self_attn_mask(q.shape[-2], scores, attn_mask))
            maps = scores.softmax(-1)
            if self.attention == 'prefix' and self.num_prefix_tokens == 0:
                maps = maps.mean(-2, keepdim=True)
            maps = maps.cpu()

        def batched(t: Tensor, width: int) -> Tensor:
            return t.expand(B, width).cpu() if t.dim() == 1 else t.cpu()

        G = layer.num_kv_heads
        self._layers.append(LayerRecord(
            attention=maps,
            key_norms=key_norms.float().cpu(),
            shares=batched(grouping.shares.float(), G),
            allocation=batched(grouping.allocation, G),
            query_to_kv=batched(routing, H),
        ))

    def _finish(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.result = Recording(
            layers=list(self._layers), logits=output.detach().float().cpu(),
            num_prefix_tokens=self.num_prefix_tokens, grid_size=self.grid_size,
            attention_rows=self.attention, config=self.config,
        )
