"""The picked query: choose any token -- a patch on the picture a model saw, or a prefix token -- and see where it
looks in every head, with the query heads that share one key head side by side and that key head's norms
beside them.

A pick is a place, not a token: fractions ``(x, y)`` of the picture (0..1, x to the right, y down) or a prefix
token's name, so one pick applies to every model of a run, each mapping it into its own patch grid (models may
differ in input size, patch size and prefix tokens). The maps are recomputed from the queries and keys the
recording kept (:meth:`~gqa_core.core.record.LayerRecord.query_row`): no model runs again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import plotly.graph_objects as go

from ..core.record import MEAN_ROW, Recording
from .figures import Fit, cell_height, fitted, patch_grid, tile_mosaic
from .heads import group_diversity

__all__ = ['Picked', 'PickedMaps', 'parse_query', 'pick_place', 'picked_maps', 'pick_figure', 'pick_caption',
           'prefix_names', 'PICK_PREFIX']

PICK_PREFIX = 'class token'  # what a run shows before anyone picks: the token the other views show


@dataclass(frozen=True)
class Picked:
    """One model's token for a pick: its index among the T tokens, its grid cell (None for a prefix token)."""
    token: int
    row: Optional[int]
    col: Optional[int]
    label: str

    def as_dict(self) -> Dict[str, Any]:
        return dict(token=self.token, row=self.row, col=self.col, label=self.label)


def prefix_names(recording: Recording) -> List[str]:
    """The prefix tokens a pick may name (``class token``, ``register 0``, ...), in token order."""
    return [label for label in recording.row_labels if label != MEAN_ROW]


def parse_query(text: Optional[str], recording: Recording) -> Union[str, tuple]:
    """A visitor's query as a place: ``'x, y'`` (fractions of the picture), a prefix token's name, or ``''`` for
    the default (the class token, else the centre patch)."""
    text = (text or '').strip()
    if not text:
        return PICK_PREFIX if PICK_PREFIX in prefix_names(recording) else (0.5, 0.5)
    if len(text) > 60:
        raise ValueError(f'query is {len(text)} characters: give x, y or a prefix token name')
    if ',' in text:
        parts = text.split(',')
        if len(parts) != 2:
            raise ValueError(f'query {text[:40]!r}: give x, y (two fractions 0..1) or a prefix token name')
        return (parts[0].strip(), parts[1].strip())
    return text


def _fraction(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f'{what} must be a number 0..1, got {str(value)[:20]!r}') from None
    if not (math.isfinite(number) and 0.0 <= number <= 1.0):
        raise ValueError(f'{what} must be a number 0..1 (a fraction of the picture), got {str(value)[:20]}')
    return number


def pick_place(recording: Recording, place: Union[str, Sequence[Any]]) -> Picked:
    """``place``: ``(x, y)`` fractions of the picture, or a prefix token's name (:func:`prefix_names`)."""
    if isinstance(place, str):
        names = prefix_names(recording)
        if place not in names:
            raise ValueError(f'no {place[:40]!r} token in this model (it has: {", ".join(names) or "no prefix token"})')
        return Picked(names.index(place), None, None, place)
    if not isinstance(place, (list, tuple)) or len(place) != 2:
        raise ValueError('a pick is (x, y): fractions 0..1 of the picture, or a prefix token name')
    x, y = _fraction(place[0], 'x'), _fraction(place[1], 'y')
    rows, cols = int(recording.grid_size[0]), int(recording.grid_size[1])
    row, col = min(int(y * rows), rows - 1), min(int(x * cols), cols - 1)  # y picks the row, x the column
    return Picked(recording.num_prefix_tokens + row * cols + col, row, col, f'patch (row {row}, column {col})')


@dataclass
class PickedMaps:
    """One layer, one picked token: where it looks (``rows``), who looks at it (``columns``), both ``(H, patches)``;
    each query head's KV head; each KV head's key norm at every patch ``(G, patches)``; per KV head the mean
    Jensen-Shannon divergence (bits) between its query heads' rows (NaN below two heads)."""
    picked: Picked
    layer: int
    rows: np.ndarray
    columns: np.ndarray
    query_to_kv: np.ndarray
    key_norms: np.ndarray
    divergence: np.ndarray

    @property
    def groups(self) -> List[List[int]]:
        """The query heads of each KV head, in head order."""
        return [np.flatnonzero(self.query_to_kv == g).tolist() for g in range(self.key_norms.shape[0])]

    def as_dict(self) -> Dict[str, Any]:
        return dict(picked=self.picked.as_dict(), layer=self.layer, query_to_kv=self.query_to_kv.tolist(),
                    rows=self.rows.tolist(), columns=self.columns.tolist(), key_norms=self.key_norms.tolist(),
                    divergence=[None if np.isnan(d) else float(d) for d in self.divergence])


def picked_maps(recording: Recording, layer: int, place: Union[str, Sequence[Any]]) -> PickedMaps:
    """The picked token's maps at ``layer`` from the recording's kept queries and keys."""
    record = recording.layers[layer]
    if record.queries is None:
        raise ValueError('this recording kept no queries and keys (record(..., keep_qk=True))')
    picked = pick_place(recording, place)
    first = recording.num_prefix_tokens
    rows = record.query_row(picked.token).numpy()[:, first:]
    columns = record.key_column(picked.token).numpy()[:, first:]
    query_to_kv = record.query_to_kv[0].numpy()
    norms = record.keys[0].float().norm(dim=-1).numpy()[:, first:]  # (G, patches)
    divergence = group_diversity(rows[None], query_to_kv[None], norms.shape[0])[0]
    return PickedMaps(picked, layer, rows, columns, query_to_kv, norms, divergence)


def _scaled(tiles: np.ndarray) -> np.ndarray:
    lo = tiles.min(axis=(-2, -1), keepdims=True)
    span = tiles.max(axis=(-2, -1), keepdims=True) - lo
    return (tiles - lo) / np.where(span > 0, span, 1)


TILES_PER_LINE = 8  # groups narrower than this share a line (MHA: four heads with their keys a line)
MIN_TILE_PX = 48  # fewer tiles a line in narrow columns, so that a tile holds its label


def pick_figure(maps: PickedMaps, grid_size: Sequence[int], fit: Fit = Fit()) -> go.Figure:
    """Per KV head, where the picked token looks in each query head sharing it, then that key head's norm at every
    patch; groups narrower than a line share one; the head mean last. Each tile is scaled on its own; the picked
    patch is outlined in every tile."""
    rows, cols = int(grid_size[0]), int(grid_size[1])
    groups = maps.groups
    width = max(max((len(g) for g in groups), default=0), 1) + 1  # the widest group, then its key norms
    per_line = max(1, min(TILES_PER_LINE, int(fit.plot_px() // MIN_TILE_PX)) // width)
    tile_px = fit.plot_px() / (width * per_line)
    key_label = 'K{} norm' if fit.text_px('K0 norm') <= tile_px else 'K{}'  # narrow tiles: the short name
    heads = patch_grid(maps.rows, grid_size)
    norms = patch_grid(maps.key_norms, grid_size)
    blank = np.full((rows, cols), np.nan)
    tiles, labels = [], []
    for g, members in enumerate(groups):
        tiles += [heads[h] for h in members] + [blank] * (width - 1 - len(members)) + [norms[g]]
        labels += [f'q{h}' for h in members] + [''] * (width - 1 - len(members)) + [key_label.format(g)]
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
    rings = [] if maps.picked.row is None else [
        dict(type='rect', x0=x + maps.picked.col - 0.5, x1=x + maps.picked.col + 0.5, y0=y + maps.picked.row - 0.5,
             y1=y + maps.picked.row + 0.5, line=dict(color='#00e5ff', width=2)) for y, x, _ in placed]
    fig = fitted(fit, cell_height(fit, mosaic.shape[0], mosaic.shape[1], extra=20, high=900),
                 go.Heatmap(z=mosaic, colorscale='Inferno', showscale=False, hoverinfo='skip'), annotations=notes,
                 shapes=rings)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange='reversed', scaleanchor='x')
    return fig


def pick_caption(maps: PickedMaps) -> str:
    shared = [f'K{g}: {d:.2f}' for g, d in enumerate(maps.divergence) if not np.isnan(d)]
    spread = ('; divergence between the query heads sharing a key head (mean JSD, bits): ' + ', '.join(shared)
              if shared else '; no key head is shared by two query heads here')
    return (f'where the {maps.picked.label} looks in layer {maps.layer}: per KV head, the query heads sharing it '
            f'side by side, then its key norms; the head mean last{spread}')
