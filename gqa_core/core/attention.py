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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention, AttentionRope, apply_rot_embed_cat
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask
from timm.models.beit import Attention as BeitAttention, gen_relative_position_index
from timm.models.cait import TalkingHeadAttn
from timm.models.eva import EvaAttention
from timm.models.gemma4_vit import Gemma4Attention, apply_multidimensional_rope
from timm.models.vision_transformer_relpos import RelPosAttention

from .kernels import routed_attention, triton_enabled
from .policies import Grouping, GroupingPolicy, create_policy
from .probe import AttentionProbe

__all__ = ['GroupedQueryAttention', 'gqa_attention_layer', 'key_head_norms', 'readable_keys', 'route_kv',
           'route_kv_rows', 'route_kv_fast', 'grouped_attention', 'explicit_attention', 'mix_heads',
           'ATTENTION_KINDS', 'attention_kind', 'kv_as_built', 'not_as_built', 'multi_head_equivalent',
           'permute_heads', 'apply_rope', 'shared_bias', 'out_projection', 'context_rope']


def kv_bytes(num_kv_heads: int, head_dim: int, num_tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of one layer's K and V cache for one image."""
    return 2 * num_kv_heads * head_dim * num_tokens * bytes_per_value


def key_head_norms(k: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    """Frobenius norm of every key head over tokens x head dim: ``(B, G, T, d) -> (B, G)``, float32.

    ``attn_mask`` (the layer's, additive or boolean): keys no query may read -- the padding of a NaFlex batch
    of images with different token counts -- are left out, so an image's norms do not depend on what it is
    batched with. Squares then sums rather than ``linalg.vector_norm`` over the two strided dims of the
    projection's view, which on the CPU is single-threaded and slow (it cost KDGQA ~3 % of a ViT-S forward)."""
    squares = k.float().square()
    if attn_mask is None:
        return squares.sum((-2, -1)).sqrt()
    return (squares.sum(-1) * readable_keys(attn_mask)[:, None]).sum(-1).sqrt()


def readable_keys(attn_mask: Tensor) -> Tensor:
    """``(B or 1, T)``, 1.0 where some query may read the key: an additive mask's entries above half the
    dtype's lowest value (timm fills masked places with the lowest, or -inf), a boolean mask's True."""
    readable = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min / 2
    readable = readable.any(-2)  # over the queries
    readable = readable.reshape(1 if readable.dim() == 1 else readable.shape[0], -1, readable.shape[-1])
    return readable.any(1).float()  # over the heads the mask names


def route_kv(kv: Tensor, query_to_kv: Tensor) -> Tensor:
    """Give every query head its KV head: ``(B, G, T, d)`` -> ``(B, H, T, d)`` by a shared ``(H,)`` or
    per-sample ``(B, H)`` index."""
    if query_to_kv.dim() == 1:
        return kv.index_select(1, query_to_kv)
    batch = torch.arange(kv.shape[0], device=kv.device)[:, None]
    return kv[batch, query_to_kv]


def route_kv_rows(kv: Tensor, query_to_kv: Tensor) -> Optional[Tensor]:
    """:func:`route_kv` for a per-image ``(B, H)`` table as one ``index_select`` of whole head-dim rows.

    Advanced indexing ``kv[batch, table]`` on the projection's strided view runs a slow generic kernel on the
    CPU; seen as rows of ``d`` values in its storage, the same copy is a contiguous row gather (2-3x faster).
    Returns None when ``kv``'s strides are not whole rows (then use :func:`route_kv`). Same values exactly.
    """
    B, G, T, d = kv.shape
    strides = kv.stride()
    if strides[-1] != 1 or any(s % d for s in strides[:-1]) or query_to_kv.dim() != 2:
        return None
    s_b, s_g, s_t = (s // d for s in strides[:-1])
    rows = ((B - 1) * s_b + (G - 1) * s_g + (T - 1) * s_t) + 1
    table = kv.as_strided((rows, d), (d, 1))  # every head-dim row the view can address, from its offset
    batch = torch.arange(B, device=kv.device)[:, None, None] * s_b
    tokens = torch.arange(T, device=kv.device)[None, None, :] * s_t
    flat = (batch + query_to_kv[:, :, None] * s_g + tokens).reshape(-1)
    return table.index_select(0, flat).view(B, query_to_kv.shape[1], T, d)


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
            k, v = _route_pair(k, v, query_to_kv)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=k.shape[1] != H,
        )
    return explicit_attention(q, k, v, query_to_kv, scale=scale, dropout_p=dropout_p, attn_mask=attn_mask,
                              is_causal=is_causal, map_transform=map_transform)


def mix_heads(attn: Tensor, mix: Optional[nn.Linear]) -> Tensor:
    """Talking heads: ``attn`` ``(B, H, ...)`` mixed across its heads by ``mix`` (timm's ``proj_l`` / ``proj_w``,
    a ``Linear(H, H)`` applied at every query-key position, as ``TalkingHeadAttn`` applies it); None: unchanged."""
    if mix is None:
        return attn
    return F.linear(attn.movedim(1, -1), mix.weight, mix.bias).movedim(-1, 1)


def explicit_attention(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        query_to_kv: Tensor,
        *,
        scale: float,
        proj_l: Optional[nn.Linear] = None,
        proj_w: Optional[nn.Linear] = None,
        dropout_p: float = 0.0,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
        map_transform: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """Grouped attention with its (B, H, T, T) maps materialised, for what acts on them: PGQA's noise
    (``map_transform``, on the post-softmax map) and CaiT's talking heads (timm's ``TalkingHeadAttn``): query
    head h's logits ``q_h k_{g(h)}^T * scale`` are mixed across heads by ``proj_l``, softmaxed, mixed again by
    ``proj_w``, and output head h reads ``v_{g(h)}`` with its mixed weights (None: no mix). q: ``(B, H, T, d)``; k, v: ``(B, G, T, d)``;
    ``query_to_kv`` ``(H,)`` or ``(B, H)`` (the routing every kind uses). Exactly timm's layer at G = H.

    Not one fused call: the mixes act on the logits and on the weights across heads, between the two matmuls
    that SDPA fuses, so the (B, H, T, T) maps are materialised (as timm's own layer does). ``map_transform``
    (PGQA's noise) acts on the post-softmax map, before ``proj_w``.
    """
    k, v = _route_pair(k, v, query_to_kv)
    attn = (q * scale) @ k.transpose(-2, -1)
    attn = maybe_add_mask(attn, resolve_self_attn_mask(q.shape[-2], attn, attn_mask, is_causal))
    attn = mix_heads(attn, proj_l).softmax(dim=-1)
    if map_transform is not None:
        attn = map_transform(attn)
    attn = mix_heads(attn, proj_w)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    return attn @ v


def route_kv_fast(kv: Tensor, query_to_kv: Tensor) -> Tensor:
    """:func:`route_kv` as the row gather of :func:`route_kv_rows` where it applies (a per-image table, no
    autograd): the same values, without advanced indexing's slow CPU kernel."""
    if query_to_kv.dim() == 2 and not (torch.is_grad_enabled() and kv.requires_grad):
        rows = route_kv_rows(kv, query_to_kv)
        if rows is not None:
            return rows
    return route_kv(kv, query_to_kv)


def _route_pair(k: Tensor, v: Tensor, query_to_kv: Tensor) -> Tuple[Tensor, Tensor]:
    """K and V routed to the query heads (:func:`route_kv_fast`)."""
    return route_kv_fast(k, query_to_kv), route_kv_fast(v, query_to_kv)


# The timm attention classes a grouped layer replaces (and reverts to), by the name the layer keeps.
ATTENTION_KINDS: Dict[str, Type[nn.Module]] = {
    'vit': Attention,  # timm.layers.Attention: vision_transformer.py, deit.py
    'eva': EvaAttention,  # eva.py: EVA-02, DINOv3 (RoPE on the patch tokens, q/v-only biases)
    'rope': AttentionRope,  # eva.py attn_type='rope': Perception Encoder
    'beit': BeitAttention,  # beit.py: relative position bias per head, q/v-only biases
    'relpos': RelPosAttention,  # vision_transformer_relpos.py: a bias module per layer (rel_pos), per head
    'talking': TalkingHeadAttn,  # cait.py: logits and weights mixed across heads (proj_l, proj_w)
    'gemma4': Gemma4Attention,  # gemma4_vit.py: q/k/v RMS norms, 2D RoPE (rotate-half per axis), scale 1, clamps
}

# What a block calls the model-wide relative position bias it passes its attention: BEiT's, timm's relpos ViT's.
SHARED_BIAS_KEYS = ('shared_rel_pos_bias', 'shared_rel_pos')


def shared_bias(context: Dict[str, Any]) -> Optional[Tensor]:
    """The model-wide relative position bias among a block's keyword arguments ``context`` (None: none)."""
    return next((context[key] for key in SHARED_BIAS_KEYS if context.get(key) is not None), None)

# Gemma4's clippable linears: (input_min, input_max, output_min, output_max) of q, k, v and the output projection
_CLIPPED = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
_BOUNDS = ('input_min', 'input_max', 'output_min', 'output_max')


def attention_kind(attn: nn.Module) -> Optional[str]:
    """The name of ``attn``'s timm class in :data:`ATTENTION_KINDS` (exact class), or None."""
    return next((name for name, cls in ATTENTION_KINDS.items() if type(attn) is cls), None)


def _linear(proj: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` of a projection (Gemma4's ``Gemma4ClippableLinear`` holds one as ``linear``)."""
    return getattr(proj, 'linear', proj)


def out_projection(attn: nn.Module) -> nn.Linear:
    """The output projection's ``nn.Linear`` of any attention layer GQA Lens converts (Gemma4 calls it
    ``o_proj``)."""
    return _linear(attn.proj if getattr(attn, 'proj', None) is not None else attn.o_proj)


def context_rope(context: Dict[str, Any]) -> Any:
    """The RoPE a block's context gives its attention: EVA's ``rope`` tensor, Gemma4's ``(cos, sin)``, or None."""
    if context.get('rope_cos') is not None:
        return context['rope_cos'], context['rope_sin']
    return context.get('rope')


def _qkv_tensors(attn: nn.Module) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """``[W_q, W_k, W_v]`` and ``[b_q, b_k, b_v]`` (a missing bias is None) of any layout: one fused ``qkv``
    (with its own bias or timm's ``q_bias`` / ``k_bias`` / ``v_bias``) or separate ``q_proj`` / ``k_proj`` /
    ``v_proj``."""
    if getattr(attn, 'qkv', None) is not None:
        split = getattr(attn, 'qkv_split', None) or (attn.qkv.out_features // 3,) * 3
        weights = list(attn.qkv.weight.detach().split(split, 0))
        if attn.qkv.bias is not None:
            biases = list(attn.qkv.bias.detach().split(split, 0))
        elif getattr(attn, 'q_bias', None) is not None:
            biases = [attn.q_bias.detach(), attn.k_bias.detach(), attn.v_bias.detach()]
        else:
            biases = [None, None, None]
        return weights, biases
    projections = [_linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj)]
    return ([p.weight.detach() for p in projections],
            [p.bias.detach() if p.bias is not None else None for p in projections])


@torch.no_grad()
def _load_qkv(attn: nn.Module, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> None:
    """Write q/k/v weights and biases into ``attn``'s layout (see :func:`_qkv_tensors`). A k bias the layout
    cannot hold (timm's fixed zero ``k_bias``) must be zero."""
    if getattr(attn, 'qkv', None) is not None:
        attn.qkv.weight.copy_(torch.cat(list(weights)))
        if attn.qkv.bias is not None:
            attn.qkv.bias.copy_(torch.cat(list(biases)))
        elif getattr(attn, 'q_bias', None) is not None:
            attn.q_bias.copy_(biases[0])
            attn.v_bias.copy_(biases[2])
            attn.k_bias.zero_()
        return
    for proj, w, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), weights, biases):
        proj = _linear(proj)
        proj.weight.copy_(w)
        if proj.bias is not None:
            proj.bias.copy_(b)


@torch.no_grad()
def permute_heads(attn: nn.Module, perm: Sequence[int]) -> None:
    """Reorder a multi-head layer's heads in place (new head i is old head ``perm[i]``) -- timm's attention of
    any kind in :data:`ATTENTION_KINDS` or a G = H grouped layer: q/k/v rows (weights, biases), the output
    projection's columns, and what else is per head (BEiT's bias table columns, an output gate's rows, the
    scale norm's weights). The layer computes exactly the same function."""
    H = attn.num_heads
    if getattr(attn, 'num_kv_heads', H) != H:
        raise ValueError('heads are permuted in the multi-head layer (G = H), before pooling')
    index = torch.as_tensor(list(perm))

    def rows(t: Optional[Tensor]) -> Optional[Tensor]:  # (H d, ...) reordered by head
        return None if t is None else t.reshape(H, -1, *t.shape[1:])[index.to(t.device)].reshape(t.shape)

    weights, biases = _qkv_tensors(attn)
    _load_qkv(attn, [rows(w) for w in weights], [rows(b) for b in biases])
    p = out_projection(attn).weight
    p.copy_(p.view(p.shape[0], H, -1)[:, index.to(p.device)].reshape_as(p))
    gate = getattr(attn, 'gate', None)
    if gate is not None:
        gate.weight.copy_(rows(gate.weight))
        if gate.bias is not None:
            gate.bias.copy_(rows(gate.bias))
    norm = getattr(attn, 'norm', None)
    for param in (getattr(norm, 'weight', None), getattr(norm, 'bias', None)):
        if param is not None and param.dim() == 1 and param.numel() == weights[0].shape[0]:
            param.copy_(rows(param))
    table = getattr(attn, 'relative_position_bias_table', None)
    if table is not None:
        table.copy_(table[:, index.to(table.device)])
    rel_pos = getattr(attn, 'rel_pos', None)
    if rel_pos is not None:  # timm's RelPosBias (a table column per head) or RelPosMlp (an output row per head)
        table = getattr(rel_pos, 'relative_position_bias_table', None)
        if table is not None:
            table.copy_(table[:, index.to(table.device)])
        fc2 = getattr(getattr(rel_pos, 'mlp', None), 'fc2', None)
        if fc2 is not None:
            fc2.weight.copy_(fc2.weight[index.to(fc2.weight.device)])
            if fc2.bias is not None:
                fc2.bias.copy_(fc2.bias[index.to(fc2.bias.device)])
    for mix in (getattr(attn, 'proj_l', None), getattr(attn, 'proj_w', None)):  # talking heads: H x H mixes
        if mix is not None:
            i = index.to(mix.weight.device)
            mix.weight.copy_(mix.weight[i][:, i])
            mix.bias.copy_(mix.bias[i])
    if isinstance(attn, GroupedQueryAttention):  # a model-wide shared bias follows through source_heads
        before = attn.source_heads or list(range(H))
        attn.source_heads = [before[int(h)] for h in index]


def apply_rope(t: Tensor, rope: Tensor, num_prefix_tokens: int, half: bool) -> Tensor:
    """timm's RoPE on the non-prefix tokens of ``t`` ``(B, heads, T, d)``, as ``EvaAttention`` applies it."""
    npt = num_prefix_tokens
    return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2)


class GroupedQueryAttention(nn.Module):
    """Self-attention with H query heads sharing G key/value heads under a grouping policy.

    Accepts timm ``Attention``'s constructor arguments, so it also plugs in at model construction
    (``attn_layer=gqa_attention_layer(...)``); :meth:`from_attention` converts a trained timm layer of any
    kind in :data:`ATTENTION_KINDS` and keeps that kind's parts: EVA's q/v-only biases and separate
    projections, RoPE applied to the non-prefix queries and keys exactly where timm applies it, BEiT's relative
    position bias kept per query head, CaiT's talking heads (``proj_l`` / ``proj_w``, per query head: see
    :func:`explicit_attention`).

    Args:
        dim: input (and by default output) channels.
        num_heads: query heads H.
        attn_head_dim: channels per head (default ``dim // num_heads``).
        dim_out: output channels (default ``dim``).
        qkv_bias: whether the q/k/v projections have biases.
        qk_norm: normalise queries and keys per head (``norm_layer``).
        scale_norm: normalise the attention output before the projection (``norm_layer``).
        proj_bias: whether the output projection has a bias.
        gated: multiply the attention output by a sigmoid gate computed from the input.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        norm_layer: the norm class for ``qk_norm`` / ``scale_norm``.
        num_kv_heads: key/value heads G, a divisor of H (default: the policy's; ``mha``: H).
        variant: the grouping policy (:data:`~gqa_core.core.policies.POLICIES`).
        qkv_fused: one fused q/k/v projection (timm's ``qkv``) or three (EVA's ``q_proj``, ``k_proj``, ``v_proj``).
        qv_bias: EVA / BEiT biases: on q and v only (the k bias a fixed zero).
        num_prefix_tokens: leading tokens RoPE leaves unrotated (class and register tokens).
        rotate_half: RoPE's rotate-half layout instead of interleaved pairs.
        window_size: BEiT's patch grid, for a relative position bias per query head (None: no bias).
        kind: which timm attention class this layer stands for (:data:`ATTENTION_KINDS`), to convert back;
            ``gemma4`` also means attention scale 1 (its q and k are RMS-normalised).
        clipped: Gemma4's clippable linears: q, k, v and output projections clamp their input and output to
            bounds held in ``clip_bounds`` ``(4, 4)`` (one scalar each, shared by all heads, so a pooled KV head
            is clamped as every head it stands for).
        device: where parameters are created.
        dtype: parameter dtype.
        **policy_options: the policy's options (``compat``, ``seed``, ``stat``, ``window``, ...).
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
            qkv_fused: bool = True,
            qv_bias: bool = False,
            num_prefix_tokens: int = 0,
            rotate_half: bool = False,
            window_size: Optional[Tuple[int, int]] = None,
            kind: str = 'vit',
            clipped: bool = False,
            device=None,
            dtype=None,
            **policy_options: Any,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if attn_head_dim is None and dim % num_heads:
            raise ValueError(f'dim={dim} is not divisible by num_heads={num_heads}')
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError('norm_layer is required when qk_norm or scale_norm is set')
        if kind not in ATTENTION_KINDS:
            raise ValueError(f'kind must be one of {sorted(ATTENTION_KINDS)}, got {kind!r}')
        self.policy: GroupingPolicy = create_policy(variant, num_heads, num_kv_heads, **policy_options)
        self.kind = kind
        self.num_heads = num_heads
        self.num_kv_heads = self.policy.num_kv_heads
        self.head_dim = attn_head_dim or dim // num_heads
        self.attn_dim = num_heads * self.head_dim
        self.scale = 1.0 if kind == 'gemma4' else self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self._init_projections(dim, qkv_bias, qv_bias, qkv_fused, dd)
        self._init_position_bias(window_size, dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.v_norm: nn.Module = nn.Identity()  # Gemma4's parameter-free RMS norm of every value head
        if clipped:  # rows q, k, v, output; columns (input_min, input_max, output_min, output_max); no-op: +-inf
            self.register_buffer('clip_bounds', torch.tensor([-float('inf'), float('inf')] * 2, **dd).repeat(4, 1))
        else:
            self.clip_bounds = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        # CaiT's talking heads (kind 'talking'): the logits and the weights mixed across the H query heads
        self.proj_l = nn.Linear(num_heads, num_heads, **dd) if kind == 'talking' else None
        self.proj_w = nn.Linear(num_heads, num_heads, **dd) if kind == 'talking' else None
        # Set by record() / ablate() (gqa_core.core.probe): sees or edits what a forward computed. None: no cost.
        self.probe: Optional[AttentionProbe] = None
        # The original MHA head at each head position when the heads were reordered before pooling (None: kept).
        self.source_heads: Optional[List[int]] = None
        # The KV heads of the timm layer this one was made from (H for multi-head attention; fewer for timm's own
        # GQA layers): what the backbone is rebuilt with before conversion.
        self.native_kv_heads: int = num_heads

    def _init_projections(self, dim: int, qkv_bias: bool, qv_bias: bool, qkv_fused: bool, dd: dict) -> None:
        """q (H heads) and k / v (G heads): one fused ``qkv`` or EVA's three; EVA / BEiT's q/v-only biases."""
        kv_dim = self.num_kv_heads * self.head_dim
        self.qkv_split = (self.attn_dim, kv_dim, kv_dim)
        self.qkv = self.q_proj = self.k_proj = self.v_proj = None
        if qkv_fused and qkv_bias and qv_bias:  # the k bias a fixed zero, not a parameter
            self.q_bias = nn.Parameter(torch.zeros(self.attn_dim, **dd))
            self.register_buffer('k_bias', torch.zeros(kv_dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(kv_dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        if qkv_fused:
            self.qkv = nn.Linear(dim, sum(self.qkv_split), bias=qkv_bias and not qv_bias, **dd)
        else:
            self.q_proj = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd)
            self.k_proj = nn.Linear(dim, kv_dim, bias=qkv_bias and not qv_bias, **dd)
            self.v_proj = nn.Linear(dim, kv_dim, bias=qkv_bias, **dd)

    def _init_position_bias(self, window_size: Optional[Tuple[int, int]], dd: dict) -> None:
        """BEiT's relative position bias table: one bias per query head, whatever the grouping. (timm's relpos
        ViT's bias module, ``rel_pos``, is the converted layer's own, copied by :meth:`from_attention`.)"""
        self.rel_pos: Optional[nn.Module] = None
        self.window_size = tuple(window_size) if window_size else None
        self.relative_position_bias_table = None
        if self.window_size:
            distances = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1) + 3
            self.relative_position_bias_table = nn.Parameter(torch.zeros(distances, self.num_heads, **dd))
            self.register_buffer('relative_position_index', gen_relative_position_index(
                self.window_size, device=dd['device']), persistent=False)

    @classmethod
    def from_attention(
            cls,
            attn: nn.Module,
            variant: str,
            num_kv_heads: Optional[int] = None,
            **policy_options: Any,
    ) -> 'GroupedQueryAttention':
        """Convert a timm attention layer (:data:`ATTENTION_KINDS`), or a multi-head (G = H) grouped layer:
        consecutive blocks of H/G key and value heads are mean-pooled (weights and biases), everything else
        is copied.

        A layer that already shares K/V heads (timm's ``AttentionRope`` with ``num_kv_heads`` = G0 < H: query
        head h reads KV head h // (H / G0)) keeps them as they are when ``num_kv_heads`` is None or G0; another
        G repeats each KV head for its H / G0 query heads, then pools as above (G = H: the multi-head layer that
        computes the same function; a divisor of G0: its KV heads pooled in consecutive blocks of G0 / G).
        """
        kind = attn.kind if isinstance(attn, GroupedQueryAttention) and attn.num_kv_heads == attn.num_heads \
            else attention_kind(attn)
        if kind is None:
            raise ValueError(f'{type(attn).__name__} is not one of the timm attention layers GQA Lens converts '
                             f'({", ".join(c.__name__ for c in ATTENTION_KINDS.values())})')
        H = attn.num_heads
        G0 = int(getattr(attn, 'num_kv_heads', None) or H)  # the KV heads the layer has now
        weights, biases = _qkv_tensors(attn)
        d = weights[0].shape[0] // H
        if num_kv_heads is None:
            G = H if variant == 'mha' else G0 if G0 != H else None
        else:
            G = num_kv_heads
        if G is None or G < 1 or H % G:
            raise ValueError(f'{variant}: num_kv_heads={G} must be a positive divisor of the {H} heads')
        qv_bias = getattr(attn, 'q_bias', None) is not None or (
            getattr(attn, 'k_proj', None) is not None and biases[1] is None and biases[0] is not None)
        out = out_projection(attn)
        bounds = _clip_bounds(attn)
        new = cls(
            weights[0].shape[1], num_heads=H, attn_head_dim=d, dim_out=out.out_features,
            qkv_bias=biases[0] is not None, proj_bias=out.bias is not None,
            gated=getattr(attn, 'gate', None) is not None, attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
            num_kv_heads=G, variant=variant, qkv_fused=getattr(attn, 'qkv', None) is not None, qv_bias=qv_bias,
            num_prefix_tokens=int(getattr(attn, 'num_prefix_tokens', 0)),
            rotate_half=bool(getattr(attn, 'rotate_half', False)), window_size=getattr(attn, 'window_size', None),
            kind=kind, clipped=bounds is not None, device=weights[0].device, dtype=weights[0].dtype,
            **policy_options,
        )
        for name in ('q_norm', 'k_norm', 'v_norm', 'norm', 'gate', 'proj_l', 'proj_w'):
            if getattr(attn, name, None) is not None:
                setattr(new, name, copy.deepcopy(getattr(attn, name)))
        new.proj = copy.deepcopy(out)
        if bounds is not None:
            new.clip_bounds.copy_(bounds)
        if new.relative_position_bias_table is not None:
            with torch.no_grad():
                new.relative_position_bias_table.copy_(attn.relative_position_bias_table)
        if getattr(attn, 'rel_pos', None) is not None:  # timm's relpos ViT: its bias per query head, as it is
            new.rel_pos = copy.deepcopy(attn.rel_pos)
        new.source_heads = getattr(attn, 'source_heads', None)
        new.native_kv_heads = int(getattr(attn, 'native_kv_heads', None) or G0)

        def pool(t: Optional[Tensor]) -> Optional[Tensor]:  # (G0 d, ...) -> (G d, ...)
            if t is None or G == G0:
                return t
            rest = t.shape[1:]
            heads = t.reshape(G0, d, *rest)
            if G0 % G:  # each KV head repeated for the query heads it serves: the multi-head layer's K/V
                heads = heads.repeat_interleave(H // G0, 0)
            return heads.reshape(G, -1, d, *rest).mean(1).reshape(G * d, *rest)  # consecutive blocks averaged

        _load_qkv(new, [weights[0], pool(weights[1]), pool(weights[2])], [biases[0], pool(biases[1]), pool(biases[2])])
        return new.train(attn.training)

    def to_attention(self, keep_weights: bool = False) -> nn.Module:
        """The equivalent timm attention layer of the kind it came from (MHA): each KV head repeated for the
        query heads it serves.

        Exact only for a grouping fixed at inference time; per-sample or noisy-at-eval policies raise.
        ``keep_weights``: repeat each KV head for H / G consecutive query heads whatever the policy instead --
        the layer's function only under a consecutive static grouping, but pooled back at the same G it gives
        this layer's K/V exactly: what a change of policy at the same G keeps.
        """
        p = self.policy
        if keep_weights:
            allocation = p.uniform
        elif not p.fixed_at_inference:
            raise ValueError(f'{p.name} (compat={p.compat}) has no fixed grouping at inference; cannot express '
                             'it as plain multi-head attention')
        else:
            allocation = getattr(p, 'allocation', p.uniform)
        index = torch.repeat_interleave(torch.arange(self.num_kv_heads, device=allocation.device), allocation)
        weights, biases = _qkv_tensors(self)
        d, dim = self.head_dim, weights[0].shape[1]
        dd = dict(device=weights[0].device, dtype=weights[0].dtype)
        common = dict(num_heads=self.num_heads, attn_head_dim=d, qkv_bias=biases[0] is not None,
                      attn_drop=self.attn_drop.p, proj_drop=self.proj_drop.p, **dd)
        norm_layer = _norm_class(self)
        if self.kind == 'vit':
            attn = Attention(dim, dim_out=self.proj.out_features, proj_bias=self.proj.bias is not None,
                             gated=self.gate is not None, **common)
        elif self.kind == 'eva':
            attn = EvaAttention(dim, qkv_fused=self.qkv is not None, num_prefix_tokens=self.num_prefix_tokens,
                                norm_layer=norm_layer, qk_norm=not isinstance(self.q_norm, nn.Identity),
                                scale_norm=not isinstance(self.norm, nn.Identity), rotate_half=self.rotate_half,
                                gated=self.gate is not None, **common)
        elif self.kind == 'rope':
            attn = AttentionRope(dim, dim_out=self.proj.out_features, qkv_fused=self.qkv is not None,
                                 num_prefix_tokens=self.num_prefix_tokens, norm_layer=norm_layer,
                                 qk_norm=not isinstance(self.q_norm, nn.Identity),
                                 scale_norm=not isinstance(self.norm, nn.Identity), proj_bias=self.proj.bias is not None,
                                 rotate_half=self.rotate_half, gated=self.gate is not None, **common)
        elif self.kind == 'relpos':
            attn = RelPosAttention(dim, num_heads=self.num_heads, qkv_bias=biases[0] is not None,
                                   qk_norm=not isinstance(self.q_norm, nn.Identity), attn_drop=self.attn_drop.p,
                                   proj_drop=self.proj_drop.p, norm_layer=norm_layer or nn.LayerNorm, **dd)
            attn.rel_pos = copy.deepcopy(self.rel_pos)
        elif self.kind == 'talking':
            attn = TalkingHeadAttn(dim, num_heads=self.num_heads, qkv_bias=biases[0] is not None,
                                   attn_drop=self.attn_drop.p, proj_drop=self.proj_drop.p, **dd)
        elif self.kind == 'gemma4':
            attn = Gemma4Attention(dim, num_heads=self.num_heads, head_dim=d, attn_drop=self.attn_drop.p,
                                   proj_drop=self.proj_drop.p, norm_eps=self.q_norm.eps,
                                   use_clipped_linears=self.clip_bounds is not None, **dd)
            attn.o_proj.linear = copy.deepcopy(self.proj)
            if self.clip_bounds is not None:
                with torch.no_grad():
                    for name, row in zip(_CLIPPED, self.clip_bounds):
                        for bound, value in zip(_BOUNDS, row):
                            getattr(getattr(attn, name), bound).copy_(value)
        else:
            attn = BeitAttention(dim, window_size=self.window_size, **common)
            if self.relative_position_bias_table is not None:
                with torch.no_grad():
                    attn.relative_position_bias_table.copy_(self.relative_position_bias_table)
        for name in ('q_norm', 'k_norm', 'v_norm', 'norm', 'proj', 'gate', 'proj_l', 'proj_w'):
            if getattr(attn, name, None) is not None:
                setattr(attn, name, copy.deepcopy(getattr(self, name)))

        def expand(t: Optional[Tensor]) -> Optional[Tensor]:  # (G d, ...) -> (H d, ...): a KV head per query
            return None if t is None else t.reshape(self.num_kv_heads, d, *t.shape[1:])[index].reshape(
                self.attn_dim, *t.shape[1:])

        _load_qkv(attn, [weights[0], expand(weights[1]), expand(weights[2])],
                  [biases[0], expand(biases[1]), expand(biases[2])])
        attn.native_kv_heads = self.native_kv_heads  # what the backbone is rebuilt with, through re-conversions
        return attn.train(self.training)

    def project(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q ``(B, N, H d)``, k and v ``(B, N, G d)`` from whichever projection layout the layer has."""
        if self.clip_bounds is not None:
            projections = (self.q_proj, self.k_proj, self.v_proj)
            return tuple(self._clipped(p, x, b) for p, b in zip(projections, self.clip_bounds))
        if self.qkv is None:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        return qkv.split(self.qkv_split, dim=-1)

    @staticmethod
    def _clipped(proj: nn.Linear, x: Tensor, bounds: Tensor) -> Tensor:
        """``proj`` as Gemma4's clippable linear computes it: input and output clamped to ``bounds``."""
        return torch.clamp(proj(torch.clamp(x, bounds[0], bounds[1])), bounds[2], bounds[3])

    def out_project(self, x: Tensor) -> Tensor:
        """The output projection (clamped like Gemma4's ``o_proj`` when the layer is clipped)."""
        return self.proj(x) if self.clip_bounds is None else self._clipped(self.proj, x, self.clip_bounds[3])

    def rotate(self, t: Tensor, rope: Any) -> Tensor:
        """RoPE on queries or keys ``(B, heads, T, d)``: EVA's (a tensor, prefix tokens left as they are) or
        Gemma4's 2D ``(cos, sin)`` (rotate-half in each axis' half of the head). The same rotation for every head
        (RoPE with per-head frequencies is refused before conversion), so a pooled key is rotated as its heads."""
        if rope is None:
            return t
        if isinstance(rope, tuple):
            return apply_multidimensional_rope(t, rope[0], rope[1], ndim=2, unsqueeze_dim=1).type_as(t)
        return apply_rope(t, rope, self.num_prefix_tokens, self.rotate_half).type_as(t)

    def position_bias(self, attn_mask: Optional[Tensor], shared_rel_pos_bias: Optional[Tensor]) -> Optional[Tensor]:
        """The relative position bias (this layer's -- BEiT's table, timm's relpos ViT's ``rel_pos`` module --
        and the model's shared one) added to ``attn_mask``: one bias per query head, whatever the grouping."""
        bias = attn_mask
        if self.relative_position_bias_table is not None:
            area = self.window_size[0] * self.window_size[1] + 1
            own = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
            own = own.permute(2, 0, 1).unsqueeze(0)
            bias = own if bias is None else bias + own
        if self.rel_pos is not None:  # (1, H, T, T), zero rows and columns for a class token
            own = self.rel_pos.get_bias()
            bias = own if bias is None else bias + own
        if shared_rel_pos_bias is not None:
            shared = shared_rel_pos_bias.view(-1, *shared_rel_pos_bias.shape[-3:])  # (1, H, T, T)
            if self.source_heads is not None:  # the model's shared table is in the original head order
                shared = shared[:, torch.as_tensor(self.source_heads, device=shared.device)]
            bias = shared if bias is None else bias + shared
        return bias

    def forward(self, x: Tensor, rope: Optional[Tensor] = None, rope_sin: Optional[Tensor] = None, *,
                rope_cos: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                shared_rel_pos_bias: Optional[Tensor] = None, shared_rel_pos: Optional[Tensor] = None) -> Tensor:
        """``rope``: EVA's RoPE, or with ``rope_sin`` Gemma4's cos and sin (its block passes both positionally,
        a block context by name: ``rope_cos``, ``rope_sin``). ``shared_rel_pos_bias`` (BEiT's blocks) and
        ``shared_rel_pos`` (timm's relpos ViT's): the model-wide relative position bias, ``(1, H, N, N)`` in the
        original head order."""
        B, N, _ = x.shape
        if rope_sin is not None:
            rope = (rope if rope_cos is None else rope_cos, rope_sin)
        shared_rel_pos_bias = shared_rel_pos_bias if shared_rel_pos_bias is not None else shared_rel_pos
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.project(x)
        q = self.q_norm(q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2))
        k = self.k_norm(k.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2))
        v = self.v_norm(v.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2))
        q, k = self.rotate(q, rope), self.rotate(k, rope)  # a rotation per token: key norms are kept
        probe = self.probe
        wants_norms = self.policy.wants_key_norms() or (probe is not None and probe.needs_key_norms)
        key_norms = key_head_norms(k, attn_mask) if wants_norms else None  # the padding's mask, before biases
        attn_mask = self.position_bias(attn_mask, shared_rel_pos_bias)
        grouping: Grouping = self.policy(key_norms)
        map_transform = self.policy.perturb_attention_map if self.policy.perturbs_attention_map() else None
        dropout_p = self.attn_drop.p if self.training else 0.
        if self.proj_l is not None:  # talking heads: logits and weights mixed across heads (no fused kernel)
            x = explicit_attention(q, k, v, grouping.query_to_kv, scale=self.scale, proj_l=self.proj_l,
                                   proj_w=self.proj_w, dropout_p=dropout_p, attn_mask=attn_mask,
                                   is_causal=is_causal, map_transform=map_transform)
        else:
            x = grouped_attention(
                q, k, v, grouping.query_to_kv, scale=self.scale, uniform=grouping.uniform, attn_mask=attn_mask,
                is_causal=is_causal, dropout_p=dropout_p, map_transform=map_transform,
            )
        if probe is not None:
            x = probe.edit(x, v, grouping)
        x = self.policy.perturb_output(x)
        if probe is not None:
            probe.observe(self, q, k, key_norms, grouping, attn_mask)

        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.out_project(x))

    def grouping_config(self) -> dict:
        return self.policy.config()

    def kv_cache_bytes(self, num_tokens: int, bytes_per_value: int = 2) -> int:
        """Bytes to cache this layer's K and V for one image of ``num_tokens`` tokens."""
        return kv_bytes(self.num_kv_heads, self.head_dim, num_tokens, bytes_per_value)

    def extra_repr(self) -> str:
        return f'num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}'


def kv_as_built(attn: nn.Module) -> bool:
    """Whether ``attn``'s K/V heads are the ones its backbone was built with -- timm's own layer (multi-head or
    timm's GQA), or a grouped layer at G = H or at its native G, in the built head order, with a grouping fixed
    at inference -- so that the multi-head layer computing the same function exists (each KV head repeated)
    and any G can be pooled from it. False for K/V a conversion pooled from more heads: the multi-head layer
    they came from is no longer in the model. Decided from the layer as it stands: one pooled, expanded to MHA
    and pooled back to its native G counts as built (exactly what it computes, its KV heads equal copies)."""
    if not isinstance(attn, GroupedQueryAttention):
        return attention_kind(attn) is not None
    H, G = attn.num_heads, attn.num_kv_heads
    in_order = attn.source_heads is None or list(attn.source_heads) == list(range(H))
    return attn.policy.fixed_at_inference and (G == H or (G == attn.native_kv_heads and in_order))


def not_as_built(attn: nn.Module) -> str:
    """Why ``attn`` is not :func:`kv_as_built`, in a few words for a refusal."""
    if isinstance(attn, GroupedQueryAttention) and not attn.policy.fixed_at_inference:
        return f'its policy, {attn.policy.name.upper()}, does not fix its groups at inference'
    return 'its K/V pooled by a conversion'


def multi_head_equivalent(attn: nn.Module) -> Optional[nn.Module]:
    """timm's multi-head layer (G = H) of ``attn``'s kind computing the same function (``attn`` itself when it is
    one), or None when its K/V are not :func:`kv_as_built`. Why: a head order permutes query heads across KV
    groups, which only a layer with one KV head per query head can express."""
    if not kv_as_built(attn):
        return None
    if isinstance(attn, GroupedQueryAttention):
        return attn.to_attention()
    if int(getattr(attn, 'num_kv_heads', None) or attn.num_heads) == attn.num_heads:
        return attn
    return GroupedQueryAttention.from_attention(attn, 'mha').to_attention()  # timm's GQA: KV heads repeated


def _clip_bounds(attn: nn.Module) -> Optional[Tensor]:
    """``(4, 4)`` clamp bounds of a clipped layer (Gemma4's clippable linears, or a clipped grouped layer's own),
    None when it does not clamp."""
    if getattr(attn, 'clip_bounds', None) is not None:
        return attn.clip_bounds.detach().clone()
    if not getattr(getattr(attn, 'q_proj', None), 'use_clipped', False):
        return None
    return torch.stack([torch.stack([getattr(getattr(attn, name), b).detach() for b in _BOUNDS])
                        for name in _CLIPPED])


def _norm_class(attn: nn.Module) -> Optional[Type[nn.Module]]:
    """The norm layer class of ``attn``'s q/k or output norm (to rebuild a layer with the same parts)."""
    for name in ('q_norm', 'norm'):
        module = getattr(attn, name, None)
        if module is not None and not isinstance(module, nn.Identity):
            return type(module)
    return None


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
