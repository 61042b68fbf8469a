"""Introspection: what every grouped-query layer saw and decided during a forward.

``with record(model) as rec: logits = model(x)`` then ``rec.result`` is a :class:`Recording`. Recording
never changes the forward's output: maps are computed beside the fused kernel, not instead of it. When no
recorder is attached the layers pay nothing but one ``is None`` check (the layer's probe slot,
:mod:`gqa_core.core.probe`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers.attention import resolve_self_attn_mask

from .attention import GroupedQueryAttention, route_kv_fast
from .convert import grouping_config
from .policies import Grouping
from .probe import AttentionProbe, attach, detach
from .vit import (MEAN_ROW, POOL_QUERY, attention_pool, gqa_layers, has_class_token, num_prefix_tokens,
                  prefix_labels, summary_row, token_grid)

__all__ = ['LayerRecord', 'Recording', 'record', 'token_grid', 'pool_query_attention', 'ATTENTION_ROWS', 'FUSIONS',
           'MEAN_ROW', 'POOL_QUERY']

ATTENTION_ROWS = ('prefix', 'full', 'none')
FUSIONS = ('mean', 'max', 'min')
ROW_BLOCK_BYTES = 16 * 2**20  # transient attention scores per tile of query rows (recorded maps)
PREFIX_TILE_ROWS = 16  # query rows computed for the prefix rows (a few tokens): not a whole tile of the T
PASS_BLOCK_BYTES = 4 * 2**20  # ... per tile of the passes over every row (row normalisers, rollout): smaller,
# since each tile has a few same-sized temporaries and these passes run at the largest token counts


@dataclass
class LayerRecord:
    """One layer, batch-first, float32 / int64 on the CPU.

    attention: ``(B, H, R, T)`` post-softmax maps -- the weights that multiply V: for a talking-heads layer
        (CaiT, ``logit_mix`` / ``weight_mix`` set) the softmax of the head-mixed logits mixed again across heads
        by ``proj_w``, whose rows need not sum to 1 nor be positive; R = T for ``"full"``; for ``"prefix"`` the rows of the
        prefix tokens (class token, then registers), or one row averaged over all queries when the model has
        no prefix token; ``None`` for ``"none"``.
    key_norms: ``(B, G)`` Frobenius norm of each key head.
    shares: ``(B, G)`` the normalised ratios the policy apportioned (uniform for static policies).
    allocation: ``(B, G)`` query heads per KV head. query_to_kv: ``(B, H)`` KV head of each query head.
    full: ``(B, H, T, T)`` maps of this layer when it was named in ``full_layers`` (else None), whatever
        ``attention`` says: the one layer a view asks for, without holding T x T for every layer.
    queries, keys: with ``keep_qk``, the scaled queries ``(B, H, T, d)`` and the keys ``(B, G, T, d)`` in float16
        (what any token's row or column of the maps is recomputed from: :func:`query_row`, :func:`key_column`),
        ``log_norm``: ``(B, H, T)`` each row's softmax normaliser (log-sum-exp) in float32 of the scores those
        float16 values give, computed on first use (:meth:`normalisers`), and ``bias``: the additive attention
        bias ``(H, T, T)`` in float16 when the layer has one (BEiT), else None.
    logit_mix, weight_mix: a talking-heads layer's ``proj_l`` and ``proj_w`` as ``(H, H + 1)`` matrices (the bias
        the last column), what rows recomputed from the kept q and k go through (:meth:`weights`); None otherwise.
        ``log_norm`` is then the normaliser of the mixed logits.
    """
    attention: Optional[Tensor]
    key_norms: Tensor
    shares: Tensor
    allocation: Tensor
    query_to_kv: Tensor
    full: Optional[Tensor] = None
    queries: Optional[Tensor] = None
    keys: Optional[Tensor] = None
    log_norm: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    logit_mix: Optional[Tensor] = None
    weight_mix: Optional[Tensor] = None

    def normalisers(self) -> Optional[Tensor]:
        """``log_norm``, computed from the kept q and k the first time a view needs it (None when none were kept).

        Deferred because it costs a pass over every layer's T x T scores (a fifth of a DINOv2 analysis at 1,374
        tokens) that only the views reading whole rows or columns of a layer (hover, key columns, picks) use,
        one layer at a time."""
        if self.log_norm is None and self.queries is not None:
            self.log_norm = row_log_norms(self.queries, self.keys, self.query_to_kv, self.bias, self.logit_mix)
        return self.log_norm

    def weights(self, scores: Tensor, log_norm: Tensor) -> Tensor:
        """The weights that multiply V from the scores ``(H, ...)`` (query head first) and each row's
        normaliser ``log_norm`` (broadcast against them): ``exp(scores - log_norm)``, for talking heads the scores
        mixed across heads before and the weights after."""
        return _mixed((_mixed(scores, self.logit_mix) - log_norm).exp(), self.weight_mix)

    def query_row(self, token: int, sample: int = 0) -> Tensor:
        """``(H, T)``: where ``token`` looks, per query head (post-softmax), recomputed from the kept q and k."""
        q = self.queries[sample, :, token].float()  # (H, d)
        k = self.keys[sample][self.query_to_kv[sample]].float()  # (H, T, d): each head's KV head
        scores = (k @ q[:, :, None])[..., 0]
        if self.bias is not None:
            scores = scores + self.bias[:, token].float()
        return self.weights(scores, self.normalisers()[sample, :, token, None])

    def key_column(self, token: int, sample: int = 0) -> Tensor:
        """``(H, T)``: how much every query attends to ``token``, per query head (its column of the maps)."""
        q = self.queries[sample].float()  # (H, T, d)
        k = self.keys[sample, self.query_to_kv[sample], token].float()  # (H, d)
        scores = (q @ k[:, :, None])[..., 0]
        if self.bias is not None:
            scores = scores + self.bias[:, :, token].float()
        return self.weights(scores, self.normalisers()[sample])


@dataclass
class Recording:
    """All layers of one forward plus its output.

    grid_size: the patch grid (rows, cols) of the tokens this forward actually saw (``dynamic_img_size``
        models at another input size included). row_labels: what each recorded ``"prefix"`` row is
        (``class token``, ``register i``, ``mean over queries``); summary_row: the row that stands for the
        image (the class token, else the mean over all queries). rollout: per head fusion, ``(B, T)`` attention
        rollout of the summary row, accumulated layer by layer while the forward ran.
    logits: the model's output; ``(B, D)`` pooled features for a headless model (``num_classes == 0``), or a
        VLM tower encoder's output tokens (``*_enc``: ``(B, N, D)``).
    """
    layers: List[LayerRecord]
    logits: Tensor
    num_prefix_tokens: int
    grid_size: tuple
    attention_rows: str
    config: Dict[str, Any] = field(default_factory=dict)
    row_labels: List[str] = field(default_factory=list)
    summary_row: int = 0
    rollout: Dict[str, Tensor] = field(default_factory=dict)
    headless: bool = False
    pool_attention: Optional[Tensor] = None  # (B, P, T): an attention-pooling head's query, per pool head
    rollout_label: str = ''  # whose rollout: the summary row's, or the attention-pooling query's

    def pool_patches(self, head: Optional[int] = None, sample: int = 0) -> Optional[np.ndarray]:
        """``(patches,)``: the attention-pooling query's attention over the patch tokens (mean of its heads, or
        one head); None when the model pools otherwise."""
        if self.pool_attention is None:
            return None
        rows = self.pool_attention[sample, :, self.num_prefix_tokens:]
        return (rows.mean(0) if head is None else rows[head]).numpy()

    def probabilities(self) -> Tensor:
        return self.logits.float().softmax(-1)

    def topk(self, k: int = 5) -> tuple:
        """``(probabilities, class indices)``, each ``(B, k)``."""
        return self.probabilities().topk(min(k, self.logits.shape[-1]), dim=-1)

    def summary_rows(self, sample: int = 0) -> np.ndarray:
        """``(L, H, patches)``: one sample's summary-row attention to every patch token ("prefix" recordings)."""
        return self.stacked('attention')[:, sample, :, self.summary_row, self.num_prefix_tokens:]

    def rollout_patches(self, fusion: str = 'mean', sample: int = 0) -> np.ndarray:
        """``(patches,)``: one sample's attention rollout of the summary row over the patch tokens."""
        return self.rollout[fusion][sample, self.num_prefix_tokens:].numpy()

    def stacked(self, name: str) -> np.ndarray:
        """One recorded quantity for all layers, layer-first: e.g. ``allocation`` -> ``(L, B, G)``. Where layers
        have different G (a model whose blocks share K/V heads differently), per-KV-head quantities are padded to
        the largest G with NaN (as floats): a KV head a layer does not have is no value, not an idle head."""
        arrays = [getattr(layer, name).numpy() for layer in self.layers]
        widths = {a.shape[-1] for a in arrays}
        if len(widths) > 1 and name in ('key_norms', 'shares', 'allocation'):
            width = max(widths)
            arrays = [np.pad(a.astype(np.float64), [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])],
                             constant_values=np.nan) for a in arrays]
        return np.stack(arrays)

    def to_numpy(self) -> Dict[str, Any]:
        """Every array, layer-first; per-layer full maps as ``full_layer{i}``; rollouts as ``rollout_{fusion}``."""
        for layer in self.layers:
            layer.normalisers()
        out: Dict[str, Any] = {f.name: self.stacked(f.name) for f in fields(LayerRecord)
                               if f.name != 'full' and self.layers and getattr(self.layers[0], f.name) is not None}
        out.update({f'full_layer{i}': layer.full.numpy() for i, layer in enumerate(self.layers)
                    if layer.full is not None})
        out.update({f'rollout_{fusion}': joint.numpy() for fusion, joint in self.rollout.items()})
        if self.pool_attention is not None:
            out['pool_attention'] = self.pool_attention.numpy()
        out.update(logits=self.logits.float().numpy(), num_prefix_tokens=self.num_prefix_tokens,
                   grid_size=tuple(self.grid_size), attention_rows=self.attention_rows, config=dict(self.config),
                   row_labels=list(self.row_labels), summary_row=self.summary_row, headless=self.headless,
                   rollout_label=self.rollout_label)
        return out

    def to_json(self) -> str:
        def plain(value: Any) -> Any:
            return value.tolist() if isinstance(value, np.ndarray) else value
        return json.dumps({k: plain(v) for k, v in self.to_numpy().items()})


class _LayerProbe(AttentionProbe):
    """Hands what one layer computed to its :class:`record`."""
    needs_key_norms = True

    def __init__(self, capture: Any) -> None:
        self.capture = capture

    def observe(self, layer: nn.Module, q: Tensor, k: Tensor, key_norms: Optional[Tensor], grouping: Grouping,
                attn_mask: Optional[Tensor]) -> None:
        self.capture(layer, q, k, key_norms, grouping, attn_mask)


class record:
    """Context manager attaching a recorder to every :class:`GroupedQueryAttention` of ``model``.

    attention: ``"prefix"`` (class-token / register rows, plus the mean over queries when there is no class
    token; cheap), ``"full"`` (all T x T) or ``"none"``. full_layers: layers whose full ``(B, H, T, T)`` maps
    are kept besides. rollout: head fusions (of :data:`FUSIONS`) whose attention rollout is accumulated layer
    by layer, so no T x T map outlives its layer. keep_qk: keep every layer's queries and keys (float16), so
    that any token's row or column of any layer's maps can be recomputed later without the model
    (:meth:`LayerRecord.query_row`; the rows' normalisers are computed on the CPU when a view first needs a
    layer's: :meth:`LayerRecord.normalisers`); L x (H + G) x T x d half floats. The last forward inside the block is
    kept in :attr:`result`.
    """

    def __init__(self, model: nn.Module, attention: str = 'prefix', full_layers: Sequence[int] = (),
                 rollout: Sequence[str] = (), keep_qk: bool = False) -> None:
        if attention not in ATTENTION_ROWS:
            raise ValueError(f'attention must be one of {ATTENTION_ROWS}, got {attention!r}')
        unknown = [f for f in rollout if f not in FUSIONS]
        if unknown:
            raise ValueError(f'rollout fusions must be among {FUSIONS}, got {unknown}')
        self.model = model
        self.attention = attention
        self.layers_list = gqa_layers(model)
        if not self.layers_list:
            raise ValueError(f'{type(model).__name__} has no grouped-query attention layers; call convert() first')
        depth = len(self.layers_list)
        bad = [i for i in full_layers if not -depth <= int(i) < depth]
        if bad:
            raise ValueError(f'full_layers {bad} out of range for {depth} layers')
        self.full_layers = {int(i) % depth for i in full_layers}
        self.fusions = tuple(dict.fromkeys(rollout))
        self.keep_qk = bool(keep_qk)
        self.num_prefix_tokens = num_prefix_tokens(model)  # of the blocks' tokens (CaiT's class token is not)
        self.row_labels = prefix_labels(model)
        self.summary_row = summary_row(model)
        self.has_class_token = has_class_token(model)
        self.config = grouping_config(model)
        self.result: Optional[Recording] = None
        self._layers: List[LayerRecord] = []
        self._rollout_inputs: List[tuple] = []  # per layer (scaled queries, keys, query_to_kv, bias): the rollout
        self._grid: tuple = ()
        self._hooks: list = []
        self._pool: Optional[Tensor] = None

    def __enter__(self) -> 'record':
        attach(self.layers_list, [_LayerProbe(self._capture) for _ in self.layers_list])
        self._hooks = [
            self.model.register_forward_pre_hook(self._start),
            self.model.register_forward_hook(self._finish),
        ]
        pool = attention_pool(self.model)
        if pool is not None:
            self._hooks.append(pool.register_forward_pre_hook(self._capture_pool))
        return self

    def __exit__(self, *exc: Any) -> None:
        detach(self.layers_list)
        for hook in self._hooks:
            hook.remove()

    def _start(self, module: nn.Module, args: Any) -> None:
        self._layers.clear()
        self._rollout_inputs = []
        self._pool = None
        self._grid = token_grid(module, args[0] if args else None)

    @torch.no_grad()
    def _capture_pool(self, pool: nn.Module, args: Any) -> None:
        attn = pool_query_attention(pool, args[0]).float()
        # timm's ViT pools the patch tokens only (pool_include_prefix=False): the prefix tokens get weight zero,
        # so the map lines up with the T tokens of the blocks (and their rollout) whatever the prefix holds
        skipped = self.num_prefix_tokens if getattr(self.model, 'pool_include_prefix', True) is False else 0
        self._pool = F.pad(attn, (skipped, 0)) if skipped else attn

    def _summary(self, maps: Tensor) -> Tensor:
        """``(..., T, T) -> (..., T)``: the class token's row, else the mean over all query rows."""
        return maps[..., 0, :] if self.has_class_token else maps.mean(-2)

    @torch.no_grad()
    def _capture(self, layer: GroupedQueryAttention, q: Tensor, k: Tensor, key_norms: Tensor,
                 grouping: Grouping, attn_mask: Optional[Tensor]) -> None:
        B, H, T = q.shape[0], q.shape[1], q.shape[2]
        index = len(self._layers)
        keep_full = self.attention == 'full' or index in self.full_layers
        mean_row = self.attention == 'prefix' and not self.has_class_token
        # the maps' rows this forward needs now: all of them for full maps or the mean row, else the prefix rows,
        # computed as PREFIX_TILE_ROWS rows at least (a tile of one row takes the matrix-vector kernel, whose
        # sums may round differently from the matrix-matrix one that full recordings use);
        # the rollout recomputes its rows at the end, one vector through the layers: no T x T x T product
        step = _row_step(B, H, T)
        n_rows = T if keep_full or mean_row else \
            min(T, max(PREFIX_TILE_ROWS, self.num_prefix_tokens)) if self.attention == 'prefix' else 0
        maps = _RowMaps(B, H, T, self.num_prefix_tokens, keep_full, mean_row, (), q.device)
        queries = q.float() * layer.scale
        mixes = _mixes(layer)
        if n_rows or self.keep_qk or self.fusions:
            bias = resolve_self_attn_mask(T, queries, attn_mask)
            keys = route_kv_fast(k.float(), grouping.query_to_kv).transpose(-2, -1) if n_rows else None  # (B, H, d, T)
            for start in range(0, n_rows, step):  # tiles of query rows bound the transient memory at large T
                stop = min(n_rows, start + step)
                block = queries[:, :, start:stop] @ keys  # (B, H, rows, T)
                if bias is not None:
                    block = block + bias[..., start:stop, :]
                maps.add(start, _weights_(block, mixes))
                del block
            keys = None
            if self.fusions:  # the keys unrouted (G heads, not H): routed again, one layer at a time, at the end
                self._rollout_inputs.append((queries, k.float(), grouping.query_to_kv, bias, mixes))
        record = self._layer_record(layer, maps, key_norms, grouping, index)
        record.logit_mix, record.weight_mix = (None, None) if mixes is None else (m.cpu() for m in mixes)
        if self.keep_qk:  # float16: what rows are recomputed from later (LayerRecord.query_row)
            record.queries, record.keys = queries.half().cpu(), k.half().cpu()
            record.bias = bias.expand(B, H, T, T)[0].half().cpu() if bias is not None else None
        self._layers.append(record)

    def _layer_record(self, layer: GroupedQueryAttention, maps: '_RowMaps', key_norms: Tensor,
                      grouping: Grouping, index: int) -> LayerRecord:
        B, H, G = maps.B, layer.num_heads, layer.num_kv_heads

        def batched(t: Tensor, width: int) -> Tensor:
            return t.expand(B, width).cpu() if t.dim() == 1 else t.cpu()

        attention = None
        if self.attention == 'full':
            attention = maps.full.cpu()
        elif self.attention == 'prefix':
            attention = maps.prefix_rows().cpu()
        return LayerRecord(
            attention=attention,
            key_norms=key_norms.float().cpu(),
            shares=batched(grouping.shares.float(), G),
            allocation=batched(grouping.allocation, G),
            query_to_kv=batched(grouping.query_to_kv, H),
            full=maps.full.cpu() if index in self.full_layers else None,
        )

    @torch.no_grad()
    def _rollouts(self, summary: Tensor) -> Dict[str, Tensor]:
        """Abnar & Zuidema's rollout of the row vector ``summary`` ``(B, T)``: ``summary A_L ... A_1`` per head
        fusion, each layer's A its heads fused, 0.5 A + 0.5 I, rows renormalised.

        Only one row of the product is shown, so it is taken vector by matrix from the last layer down, each
        layer's rows recomputed in tiles from its kept queries and keys: O(L H T^2 d) work and one tile of
        transient memory, instead of a (T x T) @ (T x T) product per layer and fusion (O(L T^3)).
        """
        vectors = {fusion: summary.float().clone() for fusion in self.fusions}
        for queries, k, query_to_kv, bias, mixes in reversed(self._rollout_inputs):
            B, H, T = queries.shape[:3]
            keys = route_kv_fast(k, query_to_kv).transpose(-2, -1)  # (B, H, d, T)
            step = _row_step(B, H, T, PASS_BLOCK_BYTES)
            out = {fusion: torch.zeros_like(v) for fusion, v in vectors.items()}
            for start in range(0, T, step):
                stop = min(T, start + step)
                block = queries[:, :, start:stop] @ keys
                if bias is not None:
                    block = block + bias[..., start:stop, :]
                # fused: two passes over the tile, not five (no row is kept from it)
                block = block.softmax(-1) if mixes is None else _weights_(block, mixes)
                for fusion, v in vectors.items():
                    a = block.mean(1) if fusion == 'mean' else getattr(block, 'a' + fusion)(1)  # (B, rows, T)
                    a.mul_(0.5).diagonal(offset=start, dim1=-2, dim2=-1).add_(0.5)
                    a.div_(a.sum(-1, keepdim=True))
                    out[fusion] += (v[:, None, start:stop] @ a)[:, 0]
                del block
            vectors = out
        return vectors

    def _finish(self, module: nn.Module, args: Any, output: Tensor) -> None:
        pool = self._pool.mean(1) if self._pool is not None else None  # (B, T): the pooled output reads this
        rollout: Dict[str, Tensor] = {}
        if self.fusions and self._rollout_inputs:
            T = self._rollout_inputs[0][0].shape[2]
            B = self._rollout_inputs[0][0].shape[0]
            if pool is not None:
                summary = pool
            elif self.has_class_token:
                summary = F.one_hot(torch.zeros(B, dtype=torch.long), T).float().to(output.device)
            else:
                summary = torch.full((B, T), 1.0 / T, device=output.device)
            rollout = {fusion: v.cpu() for fusion, v in self._rollouts(summary).items()}
        self._rollout_inputs = []
        self.result = Recording(
            layers=list(self._layers), logits=output.detach().float().cpu(),
            num_prefix_tokens=self.num_prefix_tokens, grid_size=self._grid,
            attention_rows=self.attention, config=self.config, row_labels=list(self.row_labels),
            summary_row=self.summary_row, rollout=rollout,
            headless=int(getattr(module, 'num_classes', 1)) == 0,
            pool_attention=self._pool.cpu() if self._pool is not None else None,
            rollout_label=POOL_QUERY if self._pool is not None else self.row_labels[self.summary_row],
        )


def pool_query_attention(pool: nn.Module, x: Tensor) -> Tensor:
    """``(B, P, T)``: the post-softmax attention of timm's ``AttentionPoolLatent`` query over the tokens ``x``
    it pools, per pool head (averaged over its latent queries when it has several) -- what its forward computes
    inside its fused kernel."""
    B, N, _ = x.shape
    if pool.pos_embed is not None:
        x = x + pool.pos_embed.unsqueeze(0).to(x.dtype)
    q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, pool.latent_len, pool.num_heads, pool.head_dim)
    k = pool.kv(x).reshape(B, N, 2, pool.num_heads, pool.head_dim)[:, :, 0]
    q, k = pool.q_norm(q.transpose(1, 2)), pool.k_norm(k.transpose(1, 2))
    scores = (q.float() * pool.scale) @ k.float().transpose(-2, -1)  # (B, P, latents, T)
    return scores.softmax(-1).mean(2)


def row_log_norms(queries: Tensor, keys: Tensor, query_to_kv: Tensor, bias: Optional[Tensor] = None,
                  logit_mix: Optional[Tensor] = None) -> Tensor:
    """``(B, H, T)``: the log-sum-exp of every row of the scores that the kept float16 ``queries`` ``(B, H, T, d)``
    (scaled), ``keys`` ``(B, G, T, d)`` and ``bias`` ``(H, T, T)`` give, each query head with its KV head
    (``query_to_kv`` ``(B, H)``), mixed by ``logit_mix`` first for talking heads: so rows recomputed from the same
    values sum to 1. Tiles of query rows bound the transient memory."""
    B, H, T = queries.shape[:3]
    routed = route_kv_fast(keys.float(), query_to_kv).transpose(-2, -1)  # (B, H, d, T)
    out = torch.empty(B, H, T, device=queries.device)
    step = _row_step(B, H, T, PASS_BLOCK_BYTES)
    for start in range(0, T, step):
        stop = min(T, start + step)
        scores = queries[:, :, start:stop].float() @ routed
        if bias is not None:
            scores = scores + bias[:, start:stop].float()
        out[:, :, start:stop] = _mixed(scores, logit_mix, 1).logsumexp(-1)
    return out


def _row_step(B: int, H: int, T: int, budget: int = ROW_BLOCK_BYTES) -> int:
    """Query rows per tile so that one tile of scores stays within ``budget`` bytes."""
    return max(1, budget // max(1, B * H * T * 4))


def _mixes(layer: nn.Module) -> Optional[Tuple[Tensor, Tensor]]:
    """A talking-heads layer's ``proj_l`` and ``proj_w`` as ``(H, H + 1)`` float32 matrices (the bias the last
    column), or None for a layer without them."""
    if getattr(layer, 'proj_l', None) is None:
        return None
    return tuple(torch.cat([m.weight, m.bias[:, None]], 1).detach().float() for m in (layer.proj_l, layer.proj_w))


def _mixed(t: Tensor, mix: Optional[Tensor], dim: int = 0) -> Tensor:
    """``t`` mixed across its heads (dimension ``dim``) by the ``(H, H + 1)`` matrix ``mix`` (None: ``t``)."""
    if mix is None:
        return t
    H = mix.shape[0]
    mix = mix.to(t)
    out = torch.tensordot(mix[:, :H], t.movedim(dim, 0), dims=([1], [0]))
    return (out + mix[:, H].view(H, *[1] * (t.dim() - 1))).movedim(0, dim)


def _weights_(scores: Tensor, mixes: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
    """The weights that multiply V from the scores ``(B, H, rows, T)``: their softmax (in place), for talking
    heads taken of the logits mixed across heads and mixed again after it (as ``TalkingHeadAttn`` does)."""
    if mixes is None:
        return _softmax_(scores)
    return _mixed(_mixed(scores, mixes[0], 1).softmax(-1), mixes[1], 1)


def _softmax_(scores: Tensor) -> Tensor:
    """Softmax over the last dim, in place: at T = 1,374 a second (B, H, T, T) copy would double the peak."""
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return scores.div_(scores.sum(-1, keepdim=True))


class _RowMaps:
    """What one layer's post-softmax maps are reduced to, tile of query rows by tile: the full maps (when
    kept), the prefix rows, the running sum for the mean row, and per head fusion the fused maps (rollout)."""

    def __init__(self, B: int, H: int, T: int, num_prefix: int, keep_full: bool, mean_row: bool,
                 fusions: Sequence[str], device: torch.device) -> None:
        self.B, self.H, self.T, self.P = B, H, T, num_prefix
        self.full = torch.empty(B, H, T, T, device=device) if keep_full else None
        self.fused = {f: torch.empty(B, T, T, device=device) for f in fusions}
        self.row_sum = torch.zeros(B, H, T, device=device) if mean_row else None
        self.prefix: List[Tensor] = []

    def add(self, start: int, block: Tensor) -> None:
        """``block`` ``(B, H, rows, T)``: the maps of query rows ``start .. start + rows``."""
        stop = start + block.shape[2]
        if self.full is not None:
            self.full[:, :, start:stop] = block
        if start < self.P:
            self.prefix.append(block[:, :, :self.P - start].clone())
        if self.row_sum is not None:
            self.row_sum += block.sum(2)
        for fusion, out in self.fused.items():
            out[:, start:stop] = block.mean(1) if fusion == 'mean' else getattr(block, 'a' + fusion)(1)

    def prefix_rows(self) -> Tensor:
        """``(B, H, R, T)``: the prefix tokens' rows, then the mean over all queries when there is a mean row."""
        rows = self.prefix + ([(self.row_sum / self.T)[:, :, None]] if self.row_sum is not None else [])
        return torch.cat(rows, dim=2) if rows else torch.empty(self.B, self.H, 0, self.T)
