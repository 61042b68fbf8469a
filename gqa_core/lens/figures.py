"""Figures from recorded data. Pure functions: numbers in, plotly figures or RGB arrays out."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from ..core.apportion import largest_remainder, min_max_shares
from ..core.convert import kv_heads_label
from ..core.head_order import head_groups

__all__ = ['Fit', 'pixelated', 'idle_heads', 'total_variation', 'patch_grid', 'overlay', 'colorize', 'heads_layers_figure', 'key_norm_figure', 'assignment_figure',
           'allocation_history_figure', 'difference_figure', 'kv_colors',
           'ablation_figure', 'diversity_figure', 'faithfulness_figure', 'kv_budget_figure', 'stats_figures',
           'seeds_figure']

# A small white template built once: plotly deep-copies and validates the template of every new figure, and
# its built-in ones cost ~15 ms a figure -- most of a column's render time.
_GRID = dict(gridcolor='#EBF0F8', linecolor='#EBF0F8', zerolinecolor='#EBF0F8', automargin=True)
TEMPLATE = go.layout.Template(layout=dict(paper_bgcolor='white', plot_bgcolor='white', font=dict(color='#2a3f5f'),
                                          xaxis=_GRID, yaxis=_GRID, colorway=qualitative.Plotly))
MISSING_CELL = '#c8c8c8'  # a cell with no value where white means zero (a KV head a layer does not have)
LAYOUT = dict(margin=dict(l=40, r=10, t=40, b=40), height=300, template=TEMPLATE)


@dataclass(frozen=True)
class Fit:
    """The width in CSS pixels a figure will be drawn at, and the text that stays legible in it.

    SVG text never wraps, so every figure of a result column is laid out for its column: tick labels are thinned
    until they fit side by side, numbers are printed in heat-map cells only when the cell holds them, and no
    figure carries a title (the page says what a view shows in wrapping HTML beside it).
    """
    width: int = 640

    @property
    def font(self) -> int:
        return 11 if self.width < 480 else 12

    def text_px(self, text: str) -> float:
        """Generous width of ``text`` at this font (plotly's default sans: about 0.62 em a character)."""
        return 0.62 * self.font * max(len(text), 1) + 6

    def thin(self, positions: Sequence[float], labels: Sequence[str], span_px: float) -> dict:
        """tickvals / ticktext keeping every k-th label so that the kept ones do not touch over ``span_px``."""
        n = len(labels)
        widest = max((self.text_px(t) for t in labels), default=0)
        stride = max(1, int(np.ceil(n * widest / max(span_px, 1))))
        keep = list(range(0, n, stride))
        return dict(tickvals=[positions[i] for i in keep], ticktext=[labels[i] for i in keep], tickangle=0)

    def cell_text(self, cells_x: int, cells_y: int, span_x: float, span_y: float, longest: str) -> bool:
        """Whether ``longest`` fits inside one cell of a ``cells_x`` × ``cells_y`` heat map."""
        return span_x / max(cells_x, 1) >= self.text_px(longest) and span_y / max(cells_y, 1) >= self.font + 4

    def layout(self, height: int, **extra) -> dict:
        return dict(template=TEMPLATE, height=int(height), font=dict(size=self.font),
                    margin=dict(l=6, r=6, t=extra.pop('top', 10), b=6), **extra)

    def plot_px(self, colorbar: bool = False) -> float:
        """Width of the plotting area: the figure less its axis labels and, when present, a colour bar."""
        return self.width - 44 - (46 if colorbar else 0)


def _figure(data=None) -> go.Figure:
    return go.Figure(data, layout=LAYOUT)


def fitted(fit: Fit, height: int, data=None, **extra) -> go.Figure:
    return go.Figure(data, layout=fit.layout(height, **extra))


def _colorbar(fit: Fit, **extra) -> dict:
    return dict(thickness=10, tickfont=dict(size=fit.font), **extra)


def cell_height(fit: Fit, rows: float, cols: float, extra: int = 40, low: int = 160, high: int = 520) -> int:
    """A height that keeps heat-map cells about square for ``rows`` × ``cols`` cells."""
    return int(np.clip(fit.plot_px() * rows / max(cols, 1) + extra, low, high))


def _axis_labels(prefix: str, n: int) -> List[str]:
    return [f'{prefix}{i}' for i in range(n)]


def patch_grid(values: np.ndarray, grid_size: Sequence[int]) -> np.ndarray:
    """Flat per-patch values -> ``(rows, cols)``; fails loudly if they do not tile the grid."""
    rows, cols = int(grid_size[0]), int(grid_size[1])
    if values.shape[-1] != rows * cols:
        raise ValueError(f'{values.shape[-1]} patch values do not fill a {rows}x{cols} grid')
    return values.reshape(*values.shape[:-1], rows, cols)


def colorize(values: np.ndarray, colorscale: str = 'Inferno') -> np.ndarray:
    """Min-max scaled values -> RGB uint8 through a plotly colour scale."""
    v = values.astype(np.float64)
    span = v.max() - v.min()
    v = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    return _lut(colorscale)[np.clip((v * 255).round().astype(int), 0, 255)]


@lru_cache(maxsize=8)
def _lut(colorscale: str) -> np.ndarray:
    """256 RGB entries of a plotly colour scale (sampled once per scale)."""
    return np.array([[int(c) for c in s[s.index('(') + 1:-1].split(',')[:3]]
                     for s in sample_colorscale(colorscale, list(np.linspace(0, 1, 256)), colortype='rgb')],
                    dtype=np.uint8)


def overlay(view: np.ndarray, grid_values: np.ndarray, alpha: float = 0.55, size: int = 224) -> np.ndarray:
    """The model's view of the image with a patch-level heat map blended on top, both upsampled to ``size``."""
    h, w = view.shape[:2]
    scale = size / max(h, w)
    out_size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = Image.fromarray(view).resize(out_size, Image.BICUBIC)
    heat = Image.fromarray(colorize(grid_values)).resize(out_size, Image.BILINEAR)
    return np.asarray(Image.blend(base, heat, alpha))


def pixelated(view: np.ndarray, least: int = 128) -> np.ndarray:
    """``view`` enlarged by the whole factor that brings its longer side to at least ``least`` pixels, each pixel
    repeated (no smoothing): a 32 px input shown as what it is, 32 × 32 visible pixels."""
    k = max(1, -(-least // max(view.shape[:2])))
    return np.repeat(np.repeat(view, k, axis=0), k, axis=1) if k > 1 else view


def tile_mosaic(tiles: np.ndarray, per_row: int) -> np.ndarray:
    """``(N, rows, cols)`` tiles laid out ``per_row`` to a row, one NaN line between neighbours."""
    n, rows, cols = tiles.shape
    lines = -(-n // per_row)
    mosaic = np.full((lines * (rows + 1) - 1, min(n, per_row) * (cols + 1) - 1), np.nan)
    for i in range(n):
        r, c = divmod(i, per_row)
        mosaic[r * (rows + 1):r * (rows + 1) + rows, c * (cols + 1):c * (cols + 1) + cols] = tiles[i]
    return mosaic


def heads_layers_figure(prefix_maps: np.ndarray, grid_size: Sequence[int], fit: Fit = Fit(), title: str = '') \
        -> go.Figure:
    """Class-token attention of every head (columns) in every layer (rows) as one mosaic heat map.

    prefix_maps: ``(L, H, patches)``. Each tile is min-max scaled on its own so every head's pattern shows.
    """
    L, H, _ = prefix_maps.shape
    rows, cols = int(grid_size[0]), int(grid_size[1])
    tiles = patch_grid(prefix_maps, grid_size).astype(np.float64)
    lo = tiles.min(axis=(-2, -1), keepdims=True)
    span = tiles.max(axis=(-2, -1), keepdims=True) - lo
    tiles = (tiles - lo) / np.where(span > 0, span, 1)
    mosaic = tile_mosaic(tiles.reshape(L * H, rows, cols), H)
    fig = fitted(fit, cell_height(fit, mosaic.shape[0], mosaic.shape[1]),
                  go.Heatmap(z=mosaic, colorscale='Inferno', showscale=False, hoverinfo='skip'), title=title)
    fig.update_xaxes(**fit.thin([h * (cols + 1) + cols / 2 - 0.5 for h in range(H)], _axis_labels('h', H),
                                fit.plot_px()))
    fig.update_yaxes(tickvals=[layer * (rows + 1) + rows / 2 - 0.5 for layer in range(L)],
                     ticktext=_axis_labels('L', L), autorange='reversed')
    return fig


def kv_colors(num_kv_heads: int) -> List[str]:
    palette = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
    return [palette[g % len(palette)] for g in range(num_kv_heads)]


def idle_heads(allocation: np.ndarray) -> List[str]:
    """``L3 kv0`` for every KV head that serves no query head, layer by layer (allocation ``(L, G)``)."""
    return [f'L{layer} kv{g}' for layer in range(allocation.shape[0]) for g in range(allocation.shape[1])
            if allocation[layer, g] == 0]


def assignment_figure(query_to_kv: np.ndarray, allocation: np.ndarray, fit: Fit = Fit(), title: str = '',
                      source_heads: Optional[Sequence[Sequence[int]]] = None) -> go.Figure:
    """Which KV head serves each query head, layers (rows) × query heads (columns), coloured by KV head.

    query_to_kv: ``(L, H)``; allocation: ``(L, G)``. KV heads serving no query have no cell; the view names
    them (:func:`idle_heads`). source_heads: ``(L, H)`` original MHA head at each position (an advised head order);
    the hover then names the MHA heads each KV head pooled.
    """
    L, H = query_to_kv.shape
    G = allocation.shape[1]
    colors = kv_colors(G)
    scale = []
    for g in range(G):  # a discrete colour scale: band g -> colour g
        scale += [[g / G, colors[g]], [(g + 1) / G, colors[g]]]
    span = fit.plot_px(colorbar=True)
    height = cell_height(fit, L, H)
    text = [[f'kv{g}' for g in row] for row in query_to_kv]
    fig = fitted(fit, height, go.Heatmap(
        z=query_to_kv, x=_axis_labels('q', H), y=_axis_labels('L', L), zmin=-0.5, zmax=G - 0.5, colorscale=scale,
        text=text, texttemplate='%{text}' if fit.cell_text(H, L, span, height - 40, f'kv{G - 1}') else None,
        xgap=1, ygap=1,
        customdata=[[_assignment_hover(allocation, source_heads, layer, h) for h in range(H)] for layer in range(L)],
        hovertemplate='%{y} %{x} → %{text}<br>%{customdata}<extra></extra>',
        colorbar=_colorbar(fit, **fit.thin(list(range(G)), _axis_labels('kv', G), height - 40))), title=title)
    fig.update_xaxes(**fit.thin(list(range(H)), _axis_labels('q', H), span))
    fig.update_yaxes(autorange='reversed')
    return fig


def _assignment_hover(allocation: np.ndarray, source_heads: Optional[Sequence[Sequence[int]]], layer: int,
                      h: int) -> str:
    kept = [int(a) for a in allocation[layer] if not np.isnan(a)]  # NaN: a KV head this layer does not have
    text = f'allocation {kept}' + (f' (G = {len(kept)} in this layer)' if len(kept) < allocation.shape[1] else '')
    if source_heads is not None:
        src = list(source_heads[layer])
        pooled = ' '.join(f'kv{g}←{group}' for g, group in enumerate(head_groups(src, allocation.shape[1])))
        text += f'<br>query head = MHA head {src[h]}<br>pooled: {pooled}'
    return text


def allocation_history_figure(steps: Sequence[int], allocation: np.ndarray, layer: int, fit: Fit = Fit(),
                              title: str = '') -> go.Figure:
    """DGQA: query heads per KV head at every recomputation during training, for one layer.

    steps: ``(N,)`` training step of each change; allocation: ``(N, G)``.
    """
    allocation = np.asarray(allocation)
    colors = kv_colors(allocation.shape[1])
    fig = fitted(fit, 300, title=title, legend=dict(orientation='h', x=0, y=1.02, yanchor='bottom'), top=30)
    for g in range(allocation.shape[1]):
        fig.add_trace(go.Scatter(x=list(steps), y=allocation[:, g], mode='lines+markers', name=f'kv{g}',
                                 line=dict(shape='hv', color=colors[g]), stackgroup='a'))
    fig.update_xaxes(title='training step', nticks=max(2, int(fit.plot_px() // 70)))
    heads = int(allocation.sum(1).max()) if allocation.size else 1
    step = max(1, heads // 4)
    # no 0 on the y axis: it would print on top of the x axis's 0 at the corner (the stack starts at 0 anyway)
    fig.update_yaxes(title='query heads', range=[0, heads], tickmode='array', tickvals=list(range(step, heads + 1, step)))
    return fig


def total_variation(variant_prefix: np.ndarray, reference_prefix: np.ndarray) -> np.ndarray:
    """Per-layer total-variation distance of two ``(L, patches)`` attention distributions."""
    return 0.5 * np.abs(variant_prefix - reference_prefix).sum(-1)


def difference_figure(variant_prefix: np.ndarray, reference_prefix: np.ndarray, grid_size: Sequence[int],
                      fit: Fit = Fit(), title: str = '') -> go.Figure:
    """Head-mean class-token attention of a variant minus the reference (MHA), one tile per layer, as many to a
    row as stay at least 40 px wide. Inputs: ``(L, patches)`` each; hover gives each tile's layer and TV."""
    if variant_prefix.shape != reference_prefix.shape:
        raise ValueError(f'cannot compare attention of shapes {variant_prefix.shape} and {reference_prefix.shape}: '
                         'the models must share backbone geometry')
    diff = patch_grid(variant_prefix - reference_prefix, grid_size)
    L, rows, cols = diff.shape
    per_row = int(np.clip(fit.plot_px(colorbar=True) // 40, 1, L))
    per_row = -(-L // -(-L // per_row))  # the same number of tiles on every line
    mosaic = tile_mosaic(diff, per_row)
    tv = total_variation(variant_prefix, reference_prefix)
    where = tile_mosaic(np.broadcast_to(np.arange(L, dtype=float)[:, None, None], diff.shape), per_row)
    hover = [[f'L{int(v)} · TV {tv[int(v)]:.2f}' if v == v else '' for v in line] for line in where]
    bound = float(np.nanmax(np.abs(mosaic))) or 1.0
    fig = fitted(fit, cell_height(fit, mosaic.shape[0], mosaic.shape[1], low=120), go.Heatmap(
        z=mosaic, colorscale='RdBu', zmid=0, zmin=-bound, zmax=bound, reversescale=True, customdata=hover,
        hovertemplate='%{customdata}: Δ %{z:.4f}<extra></extra>', colorbar=_colorbar(fit, nticks=4)), title=title)
    lines = -(-L // per_row)
    fig.update_xaxes(**fit.thin([c * (cols + 1) + cols / 2 - 0.5 for c in range(per_row)],
                                [f'+{c}' if lines > 1 else f'L{c}' for c in range(per_row)],
                                fit.plot_px(colorbar=True)))
    fig.update_yaxes(autorange='reversed', tickvals=[r * (rows + 1) + rows / 2 - 0.5 for r in range(lines)],
                     ticktext=[f'L{r * per_row}' for r in range(lines)], showticklabels=lines > 1)
    return fig


def key_norm_figure(key_norms: np.ndarray, allocation: np.ndarray, fit: Fit = Fit(), title: str = '') -> go.Figure:
    """Top: each layer's normalised key norms -- the shares KDGQA would apportion from these keys (min-max
    scaled), with the query heads KDGQA would give each KV head as text. Bottom: the allocation the model's own
    policy used. Both layers (rows) × KV heads (columns); hover shows the raw norms.

    key_norms, allocation: ``(L, G)`` for one image.
    """
    L, G = key_norms.shape
    H = int(np.nansum(allocation[0]))
    allocation_text = allocation
    if not np.isnan(key_norms).any():
        shares = min_max_shares(torch.as_tensor(key_norms)).numpy()
        would = largest_remainder(torch.as_tensor(shares), H).numpy()
    else:  # layers with fewer KV heads (NaN beyond them): each apportioned over its own heads
        shares, would = np.full((L, G), np.nan), np.full((L, G), np.nan)
        for layer in range(L):
            own = ~np.isnan(key_norms[layer])
            shares[layer, own] = min_max_shares(torch.as_tensor(key_norms[layer, own])[None]).numpy()[0]
            would[layer, own] = largest_remainder(torch.as_tensor(shares[layer, own])[None], H).numpy()[0]
        would = np.where(np.isnan(would), '', np.nan_to_num(would).astype(int).astype(str))
        allocation_text = np.where(np.isnan(allocation), '', np.nan_to_num(allocation).astype(int).astype(str))
        allocation = np.where(np.isnan(allocation), None, allocation)  # None: a blank cell
    x, y = _axis_labels('kv', G), _axis_labels('L', L)
    span = fit.plot_px(colorbar=True)
    panel = cell_height(fit, L, G, extra=0, low=90, high=260)
    text = '%{text}' if fit.cell_text(G, L, span, panel, str(H)) else None
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.1, shared_xaxes=True,
                        subplot_titles=('key-norm shares → KDGQA', 'allocation used'))
    fig.update_layout(**fit.layout(2 * panel + 80, title=title, top=24))
    fig.update_annotations(font_size=fit.font)
    fig.add_trace(go.Heatmap(z=shares, x=x, y=y, zmin=0, colorscale='Viridis', text=would, texttemplate=text,
                             customdata=key_norms, showscale=False,
                             hovertemplate='%{y} %{x}<br>share %{z:.3f} → KDGQA would give %{text} queries'
                                           '<br>key norm %{customdata:.2f}<extra></extra>'), row=1, col=1)
    fig.add_trace(go.Heatmap(z=allocation, x=x, y=y, zmin=0, zmax=H, colorscale='Viridis', text=allocation_text,
                             texttemplate=text, colorbar=_colorbar(fit, nticks=4),
                             hovertemplate='%{y} %{x}: %{z} query heads<extra></extra>'), row=2, col=1)
    fig.update_yaxes(autorange='reversed', **fit.thin(list(range(L)), y, panel))
    fig.update_xaxes(**fit.thin(list(range(G)), x, span))
    return fig


def ablation_figure(kv_drop: np.ndarray, query_drop: np.ndarray, score: str, fit: Fit = Fit(),
                    title: str = '') -> go.Figure:
    """Drop of the score when one KV head (top, layers × KV heads) or one query head (bottom, layers × query
    heads) is removed. kv_drop: ``(L, G)``, NaN past a layer's own KV heads where blocks differ in G (grey: on
    this white-centred scale a blank cell would read as no drop); query_drop: ``(L, H)``."""
    L, G = kv_drop.shape
    H = query_drop.shape[1]
    drops = np.abs(np.concatenate([np.ravel(kv_drop), np.ravel(query_drop)]))
    bound = float(np.nanmax(drops)) if np.isfinite(drops).any() else 0.0
    bound = bound or 1.0
    span = fit.plot_px(colorbar=True)
    panel = cell_height(fit, L, H, extra=0, low=90, high=260)
    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.16,
                        subplot_titles=('remove one KV head', 'remove one query head'))
    fig.update_layout(**fit.layout(2 * panel + 90, title=title, top=24))
    fig.update_annotations(font_size=fit.font)
    common = dict(colorscale='RdBu', reversescale=True, zmid=0, zmin=-bound, zmax=bound, y=_axis_labels('L', L))
    fig.add_trace(go.Heatmap(z=kv_drop, x=_axis_labels('kv', G), showscale=False,
                             hovertemplate='%{y} %{x}: Δ %{z:.4f}<extra></extra>', **common), row=1, col=1)
    fig.add_trace(go.Heatmap(z=query_drop, x=_axis_labels('q', H), colorbar=_colorbar(fit, nticks=4),
                             hovertemplate='%{y} %{x}: Δ %{z:.4f}<extra></extra>', **common), row=2, col=1)
    fig.update_yaxes(autorange='reversed', **fit.thin(list(range(L)), _axis_labels('L', L), panel))
    fig.update_xaxes(**fit.thin(list(range(G)), _axis_labels('kv', G), span), row=1, col=1)
    fig.update_xaxes(**fit.thin(list(range(H)), _axis_labels('q', H), span), row=2, col=1)
    if np.isnan(kv_drop).any():
        fig.update_layout(plot_bgcolor=MISSING_CELL)
        fig.update_xaxes(showgrid=False)
        fig.update_yaxes(showgrid=False)
    return fig


def diversity_figure(diversity: np.ndarray, fit: Fit = Fit(), title: str = '') -> go.Figure:
    """Mean pairwise Jensen-Shannon divergence (bits) among the query heads sharing each KV head,
    layers (rows) × KV heads (columns); blank where a KV head serves fewer than two query heads."""
    L, G = diversity.shape
    span = fit.plot_px(colorbar=True)
    fig = fitted(fit, cell_height(fit, L, G, high=360), go.Heatmap(
        z=diversity, x=_axis_labels('kv', G), y=_axis_labels('L', L), zmin=0, colorscale='Magma',
        colorbar=_colorbar(fit, nticks=4), hovertemplate='%{y} %{x}: JSD %{z:.3f}<extra></extra>'), title=title)
    fig.update_xaxes(**fit.thin(list(range(G)), _axis_labels('kv', G), span))
    fig.update_yaxes(autorange='reversed')
    return fig


def faithfulness_figure(curves: dict, score: str, fit: Fit = Fit(), title: str = '') -> go.Figure:
    """Deletion (solid) and insertion (dashed) curves per map; the legend names the maps (AUCs in the hover
    and in the view's caption)."""
    fig = fitted(fit, 300, title=title, legend=dict(orientation='h', x=0, y=1.02, yanchor='bottom'), top=30)
    colors = qualitative.Plotly
    for i, (name, c) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(x=c['fractions'], y=c['deletion'], mode='lines', line=dict(color=colors[i]),
                                 name=f'{name} −', legendgroup=name,
                                 hovertemplate=f'deletion, AUC {c["deletion_auc"]:.3f}<extra>{name}</extra>'))
        fig.add_trace(go.Scatter(x=c['fractions'], y=c['insertion'], mode='lines', legendgroup=name,
                                 line=dict(color=colors[i], dash='dash'), name=f'{name} +',
                                 hovertemplate=f'insertion, AUC {c["insertion_auc"]:.3f}<extra>{name}</extra>'))
    fig.update_xaxes(title='fraction of patches', nticks=max(2, int(fit.plot_px() // 70)))
    fig.update_yaxes(title=score if fit.text_px(score) < 200 else 'score')
    return fig


def kv_budget_figure(result: dict, metric: str = 'auto') -> go.Figure:
    """Accuracy (or agreement with MHA) against K/V cache bytes per image, one line per variant × head order (×
    K/V init when mean-pooled and calibrated rows are both present); the MHA a star, and a model that shares K/V
    heads as it was built (the ``native`` row) a square."""
    rows = result['rows']
    if metric == 'auto':
        metric = 'top1' if all(r.get('top1') is not None for r in rows) else 'agreement'
    mha = next(r for r in rows if r['variant'] == 'mha')
    fig = _figure()
    styles = {('consecutive', 'mean'): 'dash', ('output-error', 'mean'): 'solid',
              ('consecutive', 'calibrated'): 'dot', ('output-error', 'calibrated'): 'dashdot'}
    colors = dict(gqa=qualitative.Plotly[0], kdgqa=qualitative.Plotly[1])
    keys = sorted({(r['variant'], r['head_order'], r.get('init', 'mean')) for r in rows
                   if r['variant'] not in ('mha', 'native')})
    inits = {k[2] for k in keys}
    for variant, order, init in keys:
        same = [r for r in rows if r['variant'] == variant and r.get('init', 'mean') == init]
        line = sorted((r for r in same if r['head_order'] == order), key=lambda r: r['kv_bytes'])
        if order == 'output-error':  # G = 1 has one head order only: share its point
            line = sorted(line + [r for r in same if r['num_kv_heads'] == 1 and r['head_order'] == 'consecutive'],
                          key=lambda r: r['kv_bytes'])
        name = f'{variant.upper()} · {order}' + (f' · {init}' if len(inits) > 1 else '')
        fig.add_trace(go.Scatter(
            x=[r['kv_bytes'] for r in line], y=[r[metric] for r in line], mode='lines+markers',
            name=name, line=dict(dash=styles.get((order, init), 'dot'), color=colors.get(variant)),
            marker=dict(symbol='diamond' if init == 'calibrated' else 'circle'),
            text=[f"G={r['num_kv_heads']}" for r in line],
            hovertemplate='%{text}: %{x:,} B, %{y:.2%}<extra>%{fullData.name}</extra>'))
    fig.add_trace(go.Scatter(x=[mha['kv_bytes']], y=[mha[metric]], mode='markers', name='MHA',
                             marker=dict(symbol='star', size=12, color='black'),
                             hovertemplate='MHA: %{x:,} B, %{y:.2%}<extra></extra>'))
    for native in (r for r in rows if r['variant'] == 'native'):  # a model that shares K/V as it was built
        fig.add_trace(go.Scatter(x=[native['kv_bytes']], y=[native[metric]], mode='markers', name='as built',
                                 marker=dict(symbol='square', size=11, color='black'),
                                 hovertemplate=f"as built, G = {kv_heads_label(native['num_kv_heads'])}: "
                                               '%{x:,} B, %{y:.2%}<extra></extra>'))
    label = 'top-1 accuracy' if metric == 'top1' else 'agreement with MHA'
    fig.update_layout(title=f"{label} vs K/V cache per image ({result.get('model', '')}, "
                            f"{result.get('split', '')}, n={result.get('n', '?')}, training-free)",
                      xaxis_title='K/V cache bytes per image (fp16)', yaxis_title=label, yaxis_tickformat='.0%',
                      height=420)
    return fig


def _model_grid(names: Sequence[str], per_row: int = 4):
    """A subplot grid with at most ``per_row`` models a row, so eight models stay as legible as four."""
    cols = min(per_row, len(names))
    rows = -(-len(names) // cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(names), horizontal_spacing=0.04,
                        vertical_spacing=0.3 / rows)
    fig.update_layout(**LAYOUT)
    return fig, cols, rows


def stats_figures(result: dict) -> List[go.Figure]:
    """The dataset view: agreement between the models, idle rate per layer × KV head for each model, allocation
    entropy per layer, and each model's per-class mean allocation of its last layer. (Top-1 is in the table
    beside them: a title listing it for eight models would not fit.)"""
    names = list(result['models'])
    figs = []
    agree = np.array([[result['agreement'][a][b] for b in names] for a in names])
    fig = _figure(go.Heatmap(z=agree, x=names, y=names, zmin=0, zmax=1, colorscale='Viridis', text=agree,
                             texttemplate='%{text:.3f}', hovertemplate='%{y} vs %{x}: %{z:.4f}<extra></extra>'))
    fig.update_layout(title=f"top-1 agreement between the models ({result['split']}, n={result['n']:,})",
                      height=200 + 30 * len(names))
    fig.update_yaxes(autorange='reversed')
    figs.append(fig)
    keyed = [n for n in names if result['models'][n]['grouping']['variant'] != 'mha']
    if keyed:
        fig, cols, rows = _model_grid(keyed)
        for i, name in enumerate(keyed):
            idle = np.array(result['models'][name]['idle_rate'])  # (L, G)
            fig.add_trace(go.Heatmap(z=idle.T, zmin=0, zmax=1, colorscale='Reds', showscale=i == 0,
                                     x=[f'L{j}' for j in range(idle.shape[0])],
                                     y=[f'kv{g}' for g in range(idle.shape[1])],
                                     hovertemplate=f'{name} %{{x}} %{{y}}: idle %{{z:.1%}}<extra></extra>'),
                          row=i // cols + 1, col=i % cols + 1)
        fig.update_yaxes(autorange='reversed')
        fig.update_layout(title='rate at which each KV head serves no query (layers × KV heads)',
                          height=120 + 200 * rows)
        figs.append(fig)
        fig = _figure()
        for name in keyed:
            ent = result['models'][name]['allocation_entropy']
            fig.add_trace(go.Scatter(x=list(range(len(ent))), y=ent, mode='lines+markers', name=name))
        fig.update_layout(title='mean allocation entropy per layer (bits; log2 G = uniform)', xaxis_title='layer',
                          yaxis_title='bits')
        figs.append(fig)
        fig, cols, rows = _model_grid(keyed)
        for i, name in enumerate(keyed):
            s = result['models'][name]
            last = np.array(s['per_class_allocation'])[:, -1]  # (C, G)
            fig.add_trace(go.Heatmap(z=last, y=s['classes'], x=[f'kv{g}' for g in range(last.shape[1])],
                                     colorscale='Viridis', showscale=i == 0,
                                     hovertemplate=f'{name} %{{y}} %{{x}}: %{{z:.2f}} queries<extra></extra>'),
                          row=i // cols + 1, col=i % cols + 1)
        fig.update_yaxes(showticklabels=False)
        fig.update_yaxes(showticklabels=True, col=1)  # the class names once a row
        fig.update_layout(title='mean allocation per class, last layer (classes × KV heads)', height=100 + 290 * rows)
        figs.append(fig)
        fig = _figure()
        for name in keyed:
            hist = np.array(result['models'][name]['allocation_histogram'])  # (L, H+1)
            fig.add_trace(go.Bar(x=list(range(hist.shape[1])), y=hist.mean(0), name=name))
        fig.update_layout(title='allocation histogram, all layers (fraction of KV heads serving k query heads)',
                          xaxis_title='query heads served', yaxis_title='fraction', barmode='group')
        figs.append(fig)
    return figs


def _run_tick(label: str) -> str:
    """``kdgqa (output-error)`` -> ``KDGQA<br>advised``: seven run names side by side under one axis."""
    variant, _, grouping = label.partition(' (')
    return variant.upper() + ('<br>advised' if grouping else '')


def seeds_figure(result: dict, metric: str = 'test_top1') -> go.Figure:
    """Every run's seeds as dots and their mean ± std, coloured by the verdict against GQA of the same grouping
    (better / worse beyond seed noise, or within it), from ``python -m gqa_core.training.seeds``."""
    verdicts = {v['variant']: v for v in result['verdicts']}
    colors = {'better': '#2ca02c', 'worse': '#d62728', 'within': '#7f7f7f', 'reference': '#1f77b4'}
    fig = _figure()
    shown = set()
    for run in result['runs']:
        if f'{metric}_mean' not in run:
            continue
        said = verdicts.get(run['label'])
        kind = ('reference' if said is None else 'within' if not said['beyond_noise']
                else 'better' if said['difference'] > 0 else 'worse')
        name = {'reference': 'reference (GQA)', 'within': 'within seed noise of GQA',
                'better': 'better than GQA beyond noise', 'worse': 'worse than GQA beyond noise'}[kind]
        tick = _run_tick(run['label'])
        text = said['says'] if said else f"{run['label']}: the reference"
        fig.add_trace(go.Scatter(
            x=[tick], y=[run[f'{metric}_mean']], mode='markers', name=name, legendgroup=kind,
            showlegend=kind not in shown, marker=dict(symbol='line-ew-open', size=22, color=colors[kind],
                                                      line=dict(width=3, color=colors[kind])),
            error_y=dict(type='data', array=[run[f'{metric}_std']], color=colors[kind], thickness=1.5, width=0),
            text=[text], hovertemplate='mean %{y:.2%} ± ' + f"{run[f'{metric}_std']:.2%}" +
                                       '<br>%{text}<extra></extra>'))
        shown.add(kind)
        fig.add_trace(go.Scatter(
            x=[tick] * len(run[metric]), y=run[metric], mode='markers', showlegend=False, legendgroup=kind,
            marker=dict(size=8, color=colors[kind], opacity=0.7),
            text=[f'seed {s}' for s in run['seeds']], hovertemplate='%{text}: %{y:.2%}<extra></extra>'))
    label = metric.replace('_top1', ' top-1')
    fig.update_layout(title=f'{label} of each run over its seeds (dots) and their mean ± std', yaxis_title=label,
                      yaxis_tickformat='.1%', height=380, legend=dict(orientation='h', y=-0.25))
    return fig
