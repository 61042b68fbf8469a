"""The picked query: choose any token -- a patch on the picture a model saw, or a prefix token -- and see where it
looks in every head, with the query heads that share one key head side by side and that key head's norms
beside them.

A pick is a place, not a token: fractions ``(x, y)`` of the picture (0..1, x to the right, y down) or a prefix
token's name, so one pick applies to every model of a run, each mapping it into its own patch grid (models may
differ in input size, patch size and prefix tokens). Several places may be picked at once (their maps are
averaged). The maps are recomputed from the queries and keys the recording kept
(:meth:`~gqa_core.core.record.LayerRecord.query_row`): no model runs again. A model that pools with an attention
query (timm's ``AttentionPoolLatent``) offers that query too: its map is the pool's, after the last block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import plotly.graph_objects as go
import torch

from ..core.record import MEAN_ROW, Recording
from .figures import Fit, cell_height, fitted, patch_grid, tile_mosaic
from .heads import group_diversity

__all__ = ['Picked', 'PickedMaps', 'parse_query', 'pick_place', 'pick_places', 'picked_maps', 'pick_figure',
           'pick_caption', 'SIDES', 'prefix_names', 'pick_names', 'cell_place', 'token_places', 'PICK_PREFIX', 'POOL_QUERY', 'MAX_PLACES']

PICK_PREFIX = 'class token'  # what a run shows before anyone picks: the token the other views show
POOL_QUERY = 'attention-pool query'  # the pooling head's latent query: not a token of the blocks
MAX_PLACES = 16  # places one pick may average: more is a region, which the attention views already show
MAX_QUERY_CHARS = 400  # sixteen 'x, y' pairs and their separators


@dataclass(frozen=True)
class Picked:
    """One model's token for a pick: its index among the T tokens (None for the attention-pool query), its grid
    cell (None for a prefix token)."""
    token: Optional[int]
    row: Optional[int]
    col: Optional[int]
    label: str

    def as_dict(self) -> Dict[str, Any]:
        return dict(token=self.token, row=self.row, col=self.col, label=self.label)


def prefix_names(recording: Recording) -> List[str]:
    """The prefix tokens a pick may name (``class token``, ``register 0``, ...), in token order."""
    return [label for label in recording.row_labels if label != MEAN_ROW]


def pick_names(recording: Recording) -> List[str]:
    """Every name a pick may give: the prefix tokens, then the attention-pool query where the model has one."""
    return prefix_names(recording) + ([POOL_QUERY] if recording.pool_attention is not None else [])


Place = Union[str, Sequence[Any]]  # (x, y) fractions of the picture, or a name from pick_names


def parse_query(text: Optional[str], recording: Recording) -> List[Place]:
    """A visitor's query as places: ``'x, y'`` (fractions of the picture) or a name (:func:`pick_names`), several
    separated by ``;``; ``''`` is the default (the class token, else the centre patch)."""
    text = (text or '').strip()
    if not text:
        return [PICK_PREFIX if PICK_PREFIX in prefix_names(recording) else (0.5, 0.5)]
    if len(text) > MAX_QUERY_CHARS:
        raise ValueError(f'query is {len(text)} characters: give x, y or a token name (at most {MAX_PLACES}, '
                         'separated by ;)')
    places: List[Place] = []
    for part in (p.strip() for p in text.split(';')):
        if not part:
            continue
        if ',' in part:
            numbers = part.split(',')
            if len(numbers) != 2:
                raise ValueError(f'query {part[:40]!r}: give x, y (two fractions 0..1) or a prefix token name')
            part = (numbers[0].strip(), numbers[1].strip())
        places.append(part)
    if len(places) > MAX_PLACES:
        raise ValueError(f'{len(places)} places picked: at most {MAX_PLACES} at once')
    return places or [PICK_PREFIX if PICK_PREFIX in prefix_names(recording) else (0.5, 0.5)]


def _fraction(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be a number 0..1, got {str(value)[:20]!r}') from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ValueError(f'{what} must be a number 0..1 (a fraction of the picture), got {str(value)[:20]}')
    return number


def pick_place(recording: Recording, place: Union[str, Sequence[Any]]) -> Picked:
    """``place``: ``(x, y)`` fractions of the picture, or a name from :func:`pick_names`."""
    if isinstance(place, str):
        names = pick_names(recording)
        if place not in names:
            raise ValueError(f'no {place[:40]!r} token in this model (it has: {", ".join(names) or "no prefix token"})')
        return Picked(None if place == POOL_QUERY else names.index(place), None, None, place)
    if not isinstance(place, (list, tuple)) or len(place) != 2:
        raise ValueError('a pick is (x, y): fractions 0..1 of the picture, or a prefix token name')
    x, y = _fraction(place[0], 'x'), _fraction(place[1], 'y')
    rows, cols = int(recording.grid_size[0]), int(recording.grid_size[1])
    row, col = min(int(y * rows), rows - 1), min(int(x * cols), cols - 1)  # y picks the row, x the column
    return Picked(recording.num_prefix_tokens + row * cols + col, row, col, f'patch (row {row}, column {col})')


def cell_place(grid_size: Sequence[int], row: int, col: int) -> str:
    """The query text that picks cell ``(row, col)`` of a ``grid_size`` grid: its centre as fractions."""
    rows, cols = int(grid_size[0]), int(grid_size[1])
    return f'{(col + 0.5) / cols:.4f}, {(row + 0.5) / rows:.4f}'


def token_places(recording: Recording) -> List[str]:
    """The query text that picks each of the T tokens: a prefix token's name, a patch's centre."""
    rows, cols = int(recording.grid_size[0]), int(recording.grid_size[1])
    return (prefix_names(recording)[:recording.num_prefix_tokens]
            + [cell_place((rows, cols), r, c) for r in range(rows) for c in range(cols)])


def pick_places(recording: Recording, places: Sequence[Place]) -> Tuple[Picked, ...]:
    """Each place's token, once each, in the order picked. The attention-pool query is picked alone: it is no
    token of the blocks, so its map does not average with theirs."""
    if not places:
        raise ValueError('pick at least one place')
    if len(places) > MAX_PLACES:
        raise ValueError(f'{len(places)} places picked: at most {MAX_PLACES} at once')
    picks: Dict[Optional[int], Picked] = {}
    for place in places:
        picked = pick_place(recording, place)
        picks.setdefault(picked.token, picked)
    if None in picks and len(picks) > 1:
        raise ValueError(f'the {POOL_QUERY} is picked alone: it is not a token of the blocks')
    return tuple(picks.values())


@dataclass
class PickedMaps:
    """One layer, the picked tokens: where they look (``rows``), who looks at them (``columns``), both
    ``(H, patches)`` and averaged over the picks; each query head's KV head; each KV head's key norm at every patch
    ``(G, patches)``; per KV head the mean Jensen-Shannon divergence (bits) between its query heads' rows (NaN
    below two heads). For the attention-pool query: its heads' rows as one group, no columns and no key norms
    (nothing attends to it; its keys are the pool's own)."""
    picks: Tuple[Picked, ...]
    layer: int
    rows: np.ndarray
    columns: Optional[np.ndarray]
    query_to_kv: np.ndarray
    key_norms: Optional[np.ndarray]
    divergence: np.ndarray
    pooled: bool = False  # an MHA's heads grouped as a conversion would share keys: key_norms are pooled keys'

    @property
    def label(self) -> str:
        return self.picks[0].label if len(self.picks) == 1 else f'{len(self.picks)} picked tokens (maps averaged)'

    @property
    def groups(self) -> List[List[int]]:
        """The query heads of each KV head, in head order."""
        return [np.flatnonzero(self.query_to_kv == g).tolist() for g in range(len(self.divergence))]

    def as_dict(self) -> Dict[str, Any]:
        plain = (lambda a: None if a is None else a.tolist())
        return dict(picked=[p.as_dict() for p in self.picks], layer=self.layer, query_to_kv=self.query_to_kv.tolist(),
                    rows=self.rows.tolist(), columns=plain(self.columns), key_norms=plain(self.key_norms),
                    divergence=[None if np.isnan(d) else float(d) for d in self.divergence])


def picked_maps(recording: Recording, layer: int, places: Sequence[Place],
                pooling: Optional[Sequence[Sequence[int]]] = None) -> PickedMaps:
    """The picked tokens' maps at ``layer`` (averaged over the picks) from the recording's kept queries and keys.
    ``pooling`` (an MHA): the heads each shared key head would serve; the heads are grouped so, each group beside
    the norms of its heads' mean-pooled keys (what a training-free conversion would give it)."""
    record = recording.layers[layer]
    if record.queries is None:
        raise ValueError('this recording kept no queries and keys (record(..., keep_qk=True))')
    picks = pick_places(recording, places)
    first = recording.num_prefix_tokens
    if picks[0].token is None:  # the attention-pool query
        rows = recording.pool_attention[0, :, first:].numpy()
        query_to_kv = np.zeros(len(rows), dtype=np.int64)
        return PickedMaps(picks, layer, rows, None, query_to_kv, None, group_diversity(rows[None], query_to_kv[None], 1)[0])
    rows = np.mean([record.query_row(p.token).numpy()[:, first:] for p in picks], axis=0)
    columns = np.mean([record.key_column(p.token).numpy()[:, first:] for p in picks], axis=0)
    keys = record.keys[0].float()  # (G, T, d)
    query_to_kv = record.query_to_kv[0].numpy()
    if pooling is not None:  # equal groups: the heads in group order, then one mean per group
        order = torch.tensor([h for heads in pooling for h in heads])
        query_to_kv = np.empty(len(order), dtype=np.int64)
        query_to_kv[order.numpy()] = np.repeat(np.arange(len(pooling)), len(order) // len(pooling))
        keys = keys[order].reshape(len(pooling), -1, *keys.shape[1:]).mean(1)
    norms = keys.norm(dim=-1).numpy()[:, first:]  # (G, patches)
    divergence = group_diversity(rows[None], query_to_kv[None], norms.shape[0])[0]
    return PickedMaps(picks, layer, rows, columns, query_to_kv, norms, divergence, pooled=pooling is not None)


def _scaled(tiles: np.ndarray) -> np.ndarray:
    lo = tiles.min(axis=(-2, -1), keepdims=True)
    span = tiles.max(axis=(-2, -1), keepdims=True) - lo
    return (tiles - lo) / np.where(span > 0, span, 1)


TILES_PER_LINE = 8  # groups narrower than this share a line (MHA: four heads with their keys a line)
MIN_TILE_PX = 48  # fewer tiles a line in narrow columns, so that a tile holds its label


SIDES = {'where it looks': 'rows', 'who looks at it': 'columns'}  # the picked token's row or column of the maps


def pick_figure(maps: PickedMaps, grid_size: Sequence[int], fit: Fit = Fit(), side: str = 'rows') -> go.Figure:
    """Per KV head, where the picked token looks (``side='rows'``) or how much each patch looks at it
    (``'columns'``) in each query head sharing it, then that key head's norm at every patch; groups narrower than
    a line share one; the head mean last. Each tile is scaled on its own; the picked patch is outlined in every
    tile."""
    rows, cols = int(grid_size[0]), int(grid_size[1])
    groups = maps.groups
    keyed = maps.key_norms is not None
    width = max(max((len(g) for g in groups), default=0), 1) + keyed  # the widest group, then its key norms
    per_line = max(1, min(TILES_PER_LINE, int(fit.plot_px() // MIN_TILE_PX)) // width)
    tile_px = fit.plot_px() / (width * per_line)
    long, short = ('K{} pooled', 'K{}') if maps.pooled else ('K{} norm', 'K{}')
    key_label = long if fit.text_px(long.format(0)) <= tile_px else short  # narrow tiles: the short name
    heads = patch_grid(maps.rows if side == 'rows' else maps.columns, grid_size)
    blank = np.full((rows, cols), np.nan)
    norms = patch_grid(maps.key_norms, grid_size) if keyed else [None] * len(groups)
    tiles, labels = [], []
    for g, members in enumerate(groups):
        pad = width - keyed - len(members)
        tiles += [heads[h] for h in members] + [blank] * pad + ([norms[g]] if keyed else [])
        labels += [f'q{h}' for h in members] + [''] * pad + ([key_label.format(g)] if keyed else [])
    line = width * per_line
    pad = -len(tiles) % line
    tiles += [blank] * pad + [heads.mean(0)] + [blank] * (line - 1)
    labels += [''] * pad + ['mean'] + [''] * (line - 1)
    stack = np.stack(tiles).astype(np.float64)
    mosaic = tile_mosaic(np.where(np.isnan(stack), np.nan, _scaled(np.nan_to_num(stack))), line)
    font = dict(size=fit.font - 1, color='white')
    placed = [((i // line) * (rows + 1), (i % line) * (cols + 1), label) for i, label in enumerate(labels) if label]
    notes = [dict(x=x - 0.5, y=y - 0.5, text=label, showarrow=False, xanchor='left', yanchor='top', font=font,
                  bgcolor='rgba(0,0,0,0.55)') for y, x, label in placed]  # set at once: plotly re-validates each add
    rings = [dict(type='rect', x0=x + p.col - 0.5, x1=x + p.col + 0.5, y0=y + p.row - 0.5, y1=y + p.row + 0.5,
                  line=dict(color='#00e5ff', width=2)) for y, x, _ in placed for p in maps.picks if p.row is not None]
    fig = fitted(fit, cell_height(fit, mosaic.shape[0], mosaic.shape[1], extra=20, high=900),
                 go.Heatmap(z=mosaic, colorscale='Inferno', showscale=False, hoverinfo='skip'), annotations=notes,
                 shapes=rings)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange='reversed', scaleanchor='x')
    return fig


def pick_caption(maps: PickedMaps, side: str = 'rows') -> str:
    if maps.key_norms is None:
        spread = maps.divergence[0]
        return (f'where the {POOL_QUERY} looks: the pooling head after the last block (the layer does not apply), '
                f'each of its heads, then their mean' + ('' if np.isnan(spread) else
                                                         f'; divergence between its heads (mean JSD): {spread:.2f} bits'))
    shared = [f'K{g}: {d:.2f}' for g, d in enumerate(maps.divergence) if not np.isnan(d)]
    spread = ('; divergence between the query heads sharing a key head (mean JSD, bits): ' + ', '.join(shared)
              if shared else '; no key head is shared by two query heads here')
    what = f'where the {maps.label} looks' if side == 'rows' else f'how much each patch looks at the {maps.label}'
    return (f'{what} in layer {maps.layer}: per KV head, the query heads sharing it side by side, then its key '
            f'norms; the head mean last{spread}')
