"""Grouped-query self-attention as a drop-in replacement for timm's ``Attention``.

One fused projection makes H query heads and G key/value heads; a
:class:`~gqa_core.core.policies.GroupingPolicy` decides which KV head each query head reads; one fused
attention call per layer computes the result. Uniform groupings go straight to
``scaled_dot_product_attention(enable_gqa=True)``; other groupings route K/V to the query heads with an index
(no Python loop over heads or groups). One :class:`~gqa_core.core.probe.AttentionProbe` slot lets recording
and ablation see or edit what a forward computed.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

from .kernels import routed_attention, triton_enabled
from .policies import Grouping, GroupingPolicy, create_policy
from .probe import AttentionProbe

__all__ = ['GroupedQueryAttention', 'gqa_attention_layer', 'key_head_norms', 'route_kv', 'grouped_attention']


def kv_bytes(num_kv_heads: int, head_dim: int, num_tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of one layer's K and V cache for one image."""
    return 2 * num_kv_heads * head_dim * num_tokens * bytes_per_value


def key_head_norms(k: Tensor) -> Tensor:
    """Frobenius norm of every key head over tokens x head dim: ``(B, G, T, d) -> (B, G)``, float32."""
    return torch.linalg.vector_norm(k.float(), dim=(-2, -1))


def route_kv(kv: Tensor, query_to_kv: Tensor) -> Tensor:
    """Give every query head its KV head: ``(B, G, T, d)`` -> ``(B, H, T, d)`` by a shared ``(H,)`` or
    per-sample ``(B, H)`` index."""
    if query_to_kv.dim() == 1:
        return kv.index_select(1, query_to_kv)
    batch = torch.arange(kv.shape[0], device=kv.device)[:, None]
    return kv[batch, query_to_kv]


def grouped_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        query_to_kv: Tensor,
        *,
        scale: float,
        uniform: bool = False,
        dropout_p: float = 0.0,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        map_transform: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """``softmax(q_h k_{g(h)}^T * scale) v_{g(h)}`` for every query head h in one fused call.

    q: ``(B, H, T, d)``; k, v: ``(B, G, T, d)``; ``query_to_kv`` ``(H,)`` or ``(B, H)``; ``uniform`` says it is
    the uniform grouping, which SDPA's ``enable_gqa`` runs without routing. With ``map_transform`` the
    post-softmax map is materialised and transformed (PGQA's noise) before ``@ v``.
    """
    H = q.shape[1]
    if map_transform is None:
        if not uniform:
            if (attn_mask is None and not is_causal and dropout_p == 0
                    and not (torch.is_grad_enabled() and q.requires_grad) and triton_enabled(q)):
                return routed_attention(q, k, v, query_to_kv, scale)  # reads K/V through the table: no copy
            k, v = route_kv(k, query_to_kv), route_kv(v, query_to_kv)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=k.shape[1] != H,
        )
    k, v = route_kv(k, query_to_kv), route_kv(v, query_to_kv)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
    attn = map_transform(attn.softmax(dim=-1))
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


@torch.no_grad()
def _copy_qkv(source: nn.Linear, target: nn.Linear, split: tuple, kv_map: Callable[[Tensor], Tensor]) -> None:
    """Copy a fused q/k/v projection into one with another KV-head layout: q as it is, k and v (weights and
    biases) through ``kv_map``."""
    def remap(t: Tensor) -> Tensor:
        q, k, v = t.split(split, 0)
        return torch.cat([q, kv_map(k), kv_map(v)])
    target.weight.copy_(remap(source.weight.detach()))
    if source.bias is not None:
        target.bias.copy_(remap(source.bias.detach()))


class GroupedQueryAttention(nn.Module):
    """Self-attention with H query heads sharing G key/value heads under a grouping policy.

    Accepts timm ``Attention``'s constructor arguments, so it also plugs in at model construction
    (``attn_layer=gqa_attention_layer(...)``); :meth:`from_attention` converts a trained timm layer.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            attn_head_dim: Optional[int] = None,
            dim_out: Optional[int] = None,
            qkv_bias: bool = False,
            qk_norm: bool = False,
            scale_norm: bool = False,
            proj_bias: bool = True,
            gated: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            norm_layer: Optional[Type[nn.Module]] = None,
            num_kv_heads: Optional[int] = None,
            variant: str = 'gqa',
            device=None,
            dtype=None,
            **policy_options: Any,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        head_dim = attn_head_dim or dim // num_heads
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}')
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError('norm_layer is required when qk_norm or scale_norm is set')
        self.policy: GroupingPolicy = create_policy(variant, num_heads, num_kv_heads, **policy_options)
        self.num_heads = num_heads
        self.num_kv_heads = self.policy.num_kv_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv_split = (self.attn_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim)
        self.qkv = nn.Linear(dim, sum(self.qkv_split), bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        # Set by record() / ablate() (gqa_core.core.probe): sees or edits what a forward computed. None: no cost.
        self.probe: Optional[AttentionProbe] = None

    @classmethod
    def from_attention(
            cls,
            attn: Attention,
            variant: str,
            num_kv_heads: Optional[int] = None,
            **policy_options: Any,
    ) -> 'GroupedQueryAttention':
        """Convert a timm ``Attention``: consecutive blocks of H/G key and value heads are mean-pooled
        (weights and biases), everything else is copied."""
        H, d = attn.num_heads, attn.head_dim
        G = H if num_kv_heads is None and variant == 'mha' else num_kv_heads
        if G is None or G < 1 or H % G:
            raise ValueError(f'{variant}: num_kv_heads={G} must be a positive divisor of the {H} heads')
        weight = attn.qkv.weight.detach()
        new = cls(
            attn.qkv.in_features, num_heads=H, attn_head_dim=d, dim_out=attn.proj.out_features,
            qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None,
            gated=getattr(attn, 'gate', None) is not None,
            attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p, num_kv_heads=G, variant=variant,
            device=weight.device, dtype=weight.dtype, **policy_options,
        )
        for name in ('q_norm', 'k_norm', 'norm', 'proj', 'gate'):
            setattr(new, name, copy.deepcopy(getattr(attn, name, None)))

        def pool(t: Tensor) -> Tensor:  # (H d, ...) -> (G d, ...): consecutive blocks of H / G heads averaged
            return t.reshape(G, H // G, d, *t.shape[1:]).mean(1).reshape(G * d, *t.shape[1:])

        _copy_qkv(attn.qkv, new.qkv, (H * d,) * 3, pool)
        return new.train(attn.training)

    def to_attention(self) -> Attention:
        """The equivalent timm ``Attention`` (MHA): each KV head repeated for the query heads it serves.

        Exact only for a grouping fixed at inference time; per-sample or noisy-at-eval policies raise.
        """
        p = self.policy
        if not p.fixed_at_inference:
            raise ValueError(f'{p.name} (compat={p.compat}) has no fixed grouping at inference; cannot express '
                             'it as plain multi-head attention')
        allocation = getattr(p, 'allocation', p.uniform)
        index = torch.repeat_interleave(torch.arange(self.num_kv_heads, device=allocation.device), allocation)
        d, weight = self.head_dim, self.qkv.weight.detach()
        attn = Attention(
            weight.shape[1], num_heads=self.num_heads, attn_head_dim=d, dim_out=self.proj.out_features,
            qkv_bias=self.qkv.bias is not None, proj_bias=self.proj.bias is not None, gated=self.gate is not None,
            attn_drop=self.attn_drop.p, proj_drop=self.proj_drop.p, device=weight.device, dtype=weight.dtype,
        )
        for name in ('q_norm', 'k_norm', 'norm', 'proj', 'gate'):
            setattr(attn, name, copy.deepcopy(getattr(self, name)))

        def expand(t: Tensor) -> Tensor:  # (G d, ...) -> (H d, ...): each KV head for the queries it serves
            return t.reshape(self.num_kv_heads, d, *t.shape[1:])[index].reshape(self.attn_dim, *t.shape[1:])

        _copy_qkv(self.qkv, attn.qkv, self.qkv_split, expand)
        return attn.train(self.training)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).split(self.qkv_split, dim=-1)
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(k.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2))
        v = v.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)

        probe = self.probe
        wants_norms = self.policy.uses_key_norms or (probe is not None and probe.needs_key_norms)
        key_norms = key_head_norms(k) if wants_norms else None
        grouping: Grouping = self.policy(key_norms)
        map_transform = self.policy.perturb_attention_map if self.policy.perturbs_attention_map() else None
        x = grouped_attention(
            q, k, v, grouping.query_to_kv, scale=self.scale, uniform=grouping.uniform, attn_mask=attn_mask,
            is_causal=is_causal, dropout_p=self.attn_drop.p if self.training else 0., map_transform=map_transform,
        )
        if probe is not None:
            x = probe.edit(x, v, grouping)
        x = self.policy.perturb_output(x)
        if probe is not None:
            probe.observe(self, q, k, key_norms, grouping, attn_mask)

        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def grouping_config(self) -> dict:
        return self.policy.config()

    def kv_cache_bytes(self, num_tokens: int, bytes_per_value: int = 2) -> int:
        """Bytes to cache this layer's K and V for one image of ``num_tokens`` tokens."""
        return kv_bytes(self.num_kv_heads, self.head_dim, num_tokens, bytes_per_value)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}'


def gqa_attention_layer(variant: str = 'gqa', num_kv_heads: Optional[int] = None,
                        **policy_options: Any) -> Type[GroupedQueryAttention]:
    """A subclass with the grouping bound, for timm's ``attn_layer=`` (timm requires a class, not a partial).

    ``timm.create_model('vit_small_patch16_224', attn_layer=gqa_attention_layer('kdgqa', 3))``
    """
    bound = dict(variant=variant, num_kv_heads=num_kv_heads, **policy_options)

    class BoundGroupedQueryAttention(GroupedQueryAttention):
        def __init__(self, dim: int, **kwargs: Any) -> None:
            super().__init__(dim, **{**kwargs, **bound})

    BoundGroupedQueryAttention.__name__ = f'GroupedQueryAttention_{variant}'
    return BoundGroupedQueryAttention
