"""Figures from recorded data. Pure functions: numbers in, plotly figures or RGB arrays out."""
from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Sequence

import numpy as np
import plotly.graph_objects as go
import torch
from PIL import Image
from plotly.colors import qualitative, sample_colorscale
from plotly.subplots import make_subplots

from ..core.apportion import largest_remainder, min_max_shares
from ..core.grouping import head_groups

__all__ = ['patch_grid', 'overlay', 'colorize', 'heads_layers_figure', 'key_norm_figure', 'assignment_figure',
           'allocation_history_figure', 'difference_figure', 'kv_colors', 'message_figure',
           'ablation_figure', 'diversity_figure', 'faithfulness_figure']

# A small white template built once: plotly deep-copies and validates the template of every new figure, and
# its built-in ones cost ~15 ms a figure -- most of a column's render time.
_GRID = dict(gridcolor='#EBF0F8', linecolor='#EBF0F8', zerolinecolor='#EBF0F8')
TEMPLATE = go.layout.Template(layout=dict(paper_bgcolor='white', plot_bgcolor='white', font=dict(color='#2a3f5f'),
                                          xaxis=_GRID, yaxis=_GRID, colorway=qualitative.Plotly))
LAYOUT = dict(margin=dict(l=40, r=10, t=40, b=40), height=300, template=TEMPLATE)


def _figure(data=None) -> go.Figure:
    return go.Figure(data, layout=LAYOUT)


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


def heads_layers_figure(prefix_maps: np.ndarray, grid_size: Sequence[int], title: str = '') -> go.Figure:
    """Class-token attention of every head (columns) in every layer (rows) as one mosaic heat map.

    prefix_maps: ``(L, H, patches)``. Each tile is min-max scaled on its own so every head's pattern shows.
    """
    L, H, _ = prefix_maps.shape
    rows, cols = int(grid_size[0]), int(grid_size[1])
    tiles = patch_grid(prefix_maps, grid_size).astype(np.float64)
    lo = tiles.min(axis=(-2, -1), keepdims=True)
    span = tiles.max(axis=(-2, -1), keepdims=True) - lo
    tiles = (tiles - lo) / np.where(span > 0, span, 1)
    mosaic = np.full((L * (rows + 1) - 1, H * (cols + 1) - 1), np.nan)
    for layer in range(L):
        for head in range(H):
            mosaic[layer * (rows + 1):layer * (rows + 1) + rows, head * (cols + 1):head * (cols + 1) + cols] = \
                tiles[layer, head]
    fig = _figure(go.Heatmap(z=mosaic, colorscale='Inferno', showscale=False, hoverinfo='skip'))
    fig.update_layout(title=title or 'class-token attention: heads × layers')
    fig.update_xaxes(tickvals=[h * (cols + 1) + cols / 2 - 0.5 for h in range(H)], ticktext=[f'h{h}' for h in range(H)])
    fig.update_yaxes(tickvals=[layer * (rows + 1) + rows / 2 - 0.5 for layer in range(L)],
                     ticktext=[f'L{layer}' for layer in range(L)], autorange='reversed')
    return fig


def kv_colors(num_kv_heads: int) -> List[str]:
    palette = qualitative.Plotly + qualitative.D3 + qualitative.Dark24
    return [palette[g % len(palette)] for g in range(num_kv_heads)]


def assignment_figure(query_to_kv: np.ndarray, allocation: np.ndarray, title: str = '',
                      source_heads: Optional[Sequence[Sequence[int]]] = None) -> go.Figure:
    """Which KV head serves each query head, layers (rows) × query heads (columns), coloured by KV head.

    query_to_kv: ``(L, H)``; allocation: ``(L, G)``. KV heads serving no query are listed per layer in the
    row label (e.g. ``L3 · idle kv0``), so zero-query groups stay visible. source_heads: ``(L, H)`` original
    MHA head at each position (an advised grouping); the hover then names the MHA heads each KV head pooled.
    """
    L, H = query_to_kv.shape
    G = allocation.shape[1]
    colors = kv_colors(G)
    scale = []
    for g in range(G):  # a discrete colour scale: band g -> colour g
        scale += [[g / G, colors[g]], [(g + 1) / G, colors[g]]]
    labels = []
    for layer in range(L):
        idle = [f'kv{g}' for g in range(G) if allocation[layer, g] == 0]
        labels.append(f'L{layer}' + (f' · idle {",".join(idle)}' if idle else ''))
    fig = _figure(go.Heatmap(
        z=query_to_kv, x=[f'q{h}' for h in range(H)], y=labels, zmin=-0.5, zmax=G - 0.5, colorscale=scale,
        text=[[f'kv{g}' for g in row] for row in query_to_kv], texttemplate='%{text}', xgap=1, ygap=1,
        customdata=[[_assignment_hover(allocation, source_heads, layer, h) for h in range(H)] for layer in range(L)],
        hovertemplate='%{y} %{x} → %{text}<br>%{customdata}<extra></extra>',
        colorbar=dict(title='KV head', tickvals=list(range(G)), ticktext=[f'kv{g}' for g in range(G)])))
    fig.update_layout(title=title or 'query-group assignment (layers × query heads)')
    fig.update_yaxes(autorange='reversed')
    return fig


def _assignment_hover(allocation: np.ndarray, source_heads: Optional[Sequence[Sequence[int]]], layer: int,
                      h: int) -> str:
    text = f'allocation {list(int(a) for a in allocation[layer])}'
    if source_heads is not None:
        src = list(source_heads[layer])
        pooled = ' '.join(f'kv{g}←{group}' for g, group in enumerate(head_groups(src, allocation.shape[1])))
        text += f'<br>query head = MHA head {src[h]}<br>pooled: {pooled}'
    return text


def allocation_history_figure(steps: Sequence[int], allocation: np.ndarray, layer: int, title: str = '') -> go.Figure:
    """DGQA: query heads per KV head at every recomputation during training, for one layer.

    steps: ``(N,)`` training step of each change; allocation: ``(N, G)``.
    """
    allocation = np.asarray(allocation)
    colors = kv_colors(allocation.shape[1])
    fig = _figure()
    for g in range(allocation.shape[1]):
        fig.add_trace(go.Scatter(x=list(steps), y=allocation[:, g], mode='lines+markers', name=f'kv{g}',
                                 line=dict(shape='hv', color=colors[g]), stackgroup='a'))
    fig.update_layout(title=title or f'DGQA allocation over training, layer {layer}', xaxis_title='training step',
                      yaxis_title='query heads')
    return fig


def difference_figure(variant_prefix: np.ndarray, reference_prefix: np.ndarray, grid_size: Sequence[int],
                      title: str = '') -> go.Figure:
    """Head-mean class-token attention of a variant minus the reference (MHA), one tile per layer.

    Inputs: ``(L, patches)`` each. Tile titles carry the total-variation distance of the two distributions.
    """
    if variant_prefix.shape != reference_prefix.shape:
        raise ValueError(f'cannot compare attention of shapes {variant_prefix.shape} and {reference_prefix.shape}: '
                         'the models must share backbone geometry')
    diff = patch_grid(variant_prefix - reference_prefix, grid_size)
    L, rows, cols = diff.shape
    mosaic = np.full((rows, L * (cols + 1) - 1), np.nan)
    for layer in range(L):
        mosaic[:, layer * (cols + 1):layer * (cols + 1) + cols] = diff[layer]
    tv = 0.5 * np.abs(variant_prefix - reference_prefix).sum(-1)
    bound = float(np.nanmax(np.abs(mosaic))) or 1.0
    fig = _figure(go.Heatmap(z=mosaic, colorscale='RdBu', zmid=0, zmin=-bound, zmax=bound, reversescale=True,
                               hovertemplate='Δ %{z:.4f}<extra></extra>'))
    fig.update_layout(title=title or 'attention difference vs MHA (class token, head mean)')
    fig.update_xaxes(tickvals=[layer * (cols + 1) + cols / 2 - 0.5 for layer in range(L)],
                     ticktext=[f'L{layer}<br>TV {tv[layer]:.2f}' for layer in range(L)])
    fig.update_yaxes(autorange='reversed', showticklabels=False)
    return fig


def message_figure(reason: str) -> go.Figure:
    fig = _figure()
    fig.add_annotation(text=reason, showarrow=False, x=0.5, y=0.5, xref='paper', yref='paper')
    fig.update_layout(xaxis_visible=False, yaxis_visible=False)
    return fig



def key_norm_figure(key_norms: np.ndarray, allocation: np.ndarray, title: str = '') -> go.Figure:
    """Left: each layer's normalised key norms -- the shares KDGQA would apportion from these keys (min-max
    scaled), with the query heads KDGQA would give each KV head as text. Right: the allocation the model's own
    policy used. Both KV heads (rows) × layers (columns); hover shows the raw norms.

    key_norms, allocation: ``(L, G)`` for one image.
    """
    L, G = key_norms.shape
    H = int(allocation[0].sum())
    shares = min_max_shares(torch.as_tensor(key_norms)).numpy()
    would = largest_remainder(torch.as_tensor(shares), H).numpy()
    x, y = [f'L{i}' for i in range(L)], [f'kv{g}' for g in range(G)]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=('normalised key norms (KDGQA shares)', 'allocation used'))
    fig.update_layout(**LAYOUT)
    fig.add_trace(go.Heatmap(z=shares.T, x=x, y=y, zmin=0, colorscale='Viridis', text=would.T,
                             texttemplate='%{text}', customdata=key_norms.T, showscale=False,
                             hovertemplate='%{x} %{y}<br>share %{z:.3f} → KDGQA would give %{text} queries'
                                           '<br>key norm %{customdata:.2f}<extra></extra>'), row=1, col=1)
    fig.add_trace(go.Heatmap(z=allocation.T, x=x, y=y, zmin=0, zmax=H, colorscale='Viridis', text=allocation.T,
                             texttemplate='%{text}', colorbar=dict(title='queries'),
                             hovertemplate='%{x} %{y}: %{z} query heads<extra></extra>'), row=1, col=2)
    fig.update_yaxes(autorange='reversed')
    fig.update_layout(title=title or 'key norms and allocation')
    return fig


def ablation_figure(kv_drop: np.ndarray, query_drop: np.ndarray, score: str, title: str = '') -> go.Figure:
    """Drop of the score when one KV head (left, layers × KV heads) or one query head (right, layers × query
    heads) is removed. kv_drop: ``(L, G)``; query_drop: ``(L, H)``."""
    L, G = kv_drop.shape
    H = query_drop.shape[1]
    bound = float(max(np.abs(kv_drop).max(), np.abs(query_drop).max())) or 1.0
    fig = make_subplots(rows=1, cols=2, column_widths=[max(G, 1), max(H, 1)], horizontal_spacing=0.08,
                        subplot_titles=('remove a KV head', 'remove a query head'))
    fig.update_layout(**LAYOUT)
    common = dict(colorscale='RdBu', reversescale=True, zmid=0, zmin=-bound, zmax=bound)
    fig.add_trace(go.Heatmap(z=kv_drop, x=[f'kv{g}' for g in range(G)], y=[f'L{i}' for i in range(L)],
                             showscale=False, hovertemplate='%{y} %{x}: Δ %{z:.4f}<extra></extra>', **common),
                  row=1, col=1)
    fig.add_trace(go.Heatmap(z=query_drop, x=[f'q{h}' for h in range(H)], y=[f'L{i}' for i in range(L)],
                             colorbar=dict(title='drop'), hovertemplate='%{y} %{x}: Δ %{z:.4f}<extra></extra>',
                             **common), row=1, col=2)
    fig.update_yaxes(autorange='reversed')
    fig.update_layout(title=title or f'drop of {score} when a head is removed')
    return fig


def diversity_figure(diversity: np.ndarray, title: str = '') -> go.Figure:
    """Mean pairwise Jensen-Shannon divergence (bits) among the query heads sharing each KV head,
    layers (rows) × KV heads (columns); blank where a KV head serves fewer than two query heads."""
    L, G = diversity.shape
    fig = _figure(go.Heatmap(z=diversity, x=[f'kv{g}' for g in range(G)], y=[f'L{i}' for i in range(L)], zmin=0,
                             colorscale='Magma', colorbar=dict(title='JSD (bits)'),
                             hovertemplate='%{y} %{x}: JSD %{z:.3f}<extra></extra>'))
    fig.update_yaxes(autorange='reversed')
    fig.update_layout(title=title or 'within-group diversity of the query heads')
    return fig


def faithfulness_figure(curves: dict, score: str, title: str = '') -> go.Figure:
    """Deletion (solid) and insertion (dashed) curves per map, AUCs in the legend."""
    fig = _figure()
    colors = qualitative.Plotly
    for i, (name, c) in enumerate(curves.items()):
        fig.add_trace(go.Scatter(x=c['fractions'], y=c['deletion'], mode='lines', line=dict(color=colors[i]),
                                 name=f'{name}: deletion AUC {c["deletion_auc"]:.3f}'))
        fig.add_trace(go.Scatter(x=c['fractions'], y=c['insertion'], mode='lines',
                                 line=dict(color=colors[i], dash='dash'),
                                 name=f'{name}: insertion AUC {c["insertion_auc"]:.3f}'))
    fig.update_layout(title=title or 'faithfulness: deletion / insertion', xaxis_title='fraction of patches',
                      yaxis_title=score, legend=dict(orientation='h', y=-0.3))
    return fig


def kv_budget_figure(result: dict, metric: str = 'auto') -> go.Figure:
    """Accuracy (or agreement with MHA) against K/V cache bytes per image, one line per variant × grouping."""
    rows = result['rows']
    if metric == 'auto':
        metric = 'top1' if all(r.get('top1') is not None for r in rows) else 'agreement'
    mha = next(r for r in rows if r['variant'] == 'mha')
    fig = _figure()
    styles = {'consecutive': 'dash', 'output-error': 'solid'}
    colors = dict(gqa=qualitative.Plotly[0], kdgqa=qualitative.Plotly[1])
    keys = sorted({(r['variant'], r['grouping']) for r in rows if r['variant'] != 'mha'})
    for variant, grouping in keys:
        line = sorted((r for r in rows if r['variant'] == variant and r['grouping'] == grouping),
                      key=lambda r: r['kv_bytes'])
        if grouping == 'output-error':  # G = 1 has one grouping only: share its point
            line = sorted(line + [r for r in rows if r['variant'] == variant and r['num_kv_heads'] == 1
                                  and r['grouping'] == 'consecutive'], key=lambda r: r['kv_bytes'])
        fig.add_trace(go.Scatter(
            x=[r['kv_bytes'] for r in line], y=[r[metric] for r in line], mode='lines+markers',
            name=f'{variant.upper()} · {grouping}', line=dict(dash=styles.get(grouping, 'dot'),
                                                              color=colors.get(variant)),
            text=[f"G={r['num_kv_heads']}" for r in line],
            hovertemplate='%{text}: %{x:,} B, %{y:.2%}<extra>%{fullData.name}</extra>'))
    fig.add_trace(go.Scatter(x=[mha['kv_bytes']], y=[mha[metric]], mode='markers', name='MHA',
                             marker=dict(symbol='star', size=12, color='black'),
                             hovertemplate='MHA: %{x:,} B, %{y:.2%}<extra></extra>'))
    label = 'top-1 accuracy' if metric == 'top1' else 'agreement with MHA'
    fig.update_layout(title=f"{label} vs K/V cache per image ({result.get('model', '')}, "
                            f"{result.get('split', '')}, n={result.get('n', '?')}, training-free)",
                      xaxis_title='K/V cache bytes per image (fp16)', yaxis_title=label, yaxis_tickformat='.0%',
                      height=420)
    return fig


def stats_figures(result: dict) -> List[go.Figure]:
    """The dataset view: top-1 and agreement, idle rate per layer × KV head for each model, allocation entropy
    per layer, and each model's per-class mean allocation of its last layer."""
    names = list(result['models'])
    figs = []
    agree = np.array([[result['agreement'][a][b] for b in names] for a in names])
    fig = _figure(go.Heatmap(z=agree, x=names, y=names, zmin=0, zmax=1, colorscale='Viridis', text=agree,
                             texttemplate='%{text:.3f}', hovertemplate='%{y} vs %{x}: %{z:.4f}<extra></extra>'))
    fig.update_layout(title=f"top-1 agreement ({result['split']}, n={result['n']}); top-1: "
                            + ', '.join(f"{n} {result['models'][n]['top1']:.2%}" for n in names), height=380)
    fig.update_yaxes(autorange='reversed')
    figs.append(fig)
    keyed = [n for n in names if result['models'][n]['grouping']['variant'] != 'mha']
    if keyed:
        fig = make_subplots(rows=1, cols=len(keyed), subplot_titles=keyed, horizontal_spacing=0.03)
        fig.update_layout(**LAYOUT)
        for i, name in enumerate(keyed):
            idle = np.array(result['models'][name]['idle_rate'])  # (L, G)
            fig.add_trace(go.Heatmap(z=idle.T, zmin=0, zmax=1, colorscale='Reds', showscale=i == len(keyed) - 1,
                                     x=[f'L{j}' for j in range(idle.shape[0])],
                                     y=[f'kv{g}' for g in range(idle.shape[1])],
                                     hovertemplate=f'{name} %{{x}} %{{y}}: idle %{{z:.1%}}<extra></extra>'),
                          row=1, col=i + 1)
        fig.update_yaxes(autorange='reversed')
        fig.update_layout(title='rate at which each KV head serves no query (layers × KV heads)', height=320)
        figs.append(fig)
        fig = _figure()
        for name in keyed:
            ent = result['models'][name]['allocation_entropy']
            fig.add_trace(go.Scatter(x=list(range(len(ent))), y=ent, mode='lines+markers', name=name))
        fig.update_layout(title='mean allocation entropy per layer (bits; log2 G = uniform)', xaxis_title='layer',
                          yaxis_title='bits')
        figs.append(fig)
        fig = make_subplots(rows=1, cols=len(keyed), subplot_titles=keyed, horizontal_spacing=0.03)
        fig.update_layout(**LAYOUT)
        for i, name in enumerate(keyed):
            s = result['models'][name]
            last = np.array(s['per_class_allocation'])[:, -1]  # (C, G)
            fig.add_trace(go.Heatmap(z=last, y=s['classes'], x=[f'kv{g}' for g in range(last.shape[1])],
                                     colorscale='Viridis', showscale=i == len(keyed) - 1,
                                     hovertemplate=f'{name} %{{y}} %{{x}}: %{{z:.2f}} queries<extra></extra>'),
                          row=1, col=i + 1)
        fig.update_layout(title='mean allocation per class, last layer (classes × KV heads)', height=380)
        figs.append(fig)
        fig = _figure()
        for name in keyed:
            hist = np.array(result['models'][name]['allocation_histogram'])  # (L, H+1)
            fig.add_trace(go.Bar(x=list(range(hist.shape[1])), y=hist.mean(0), name=name))
        fig.update_layout(title='allocation histogram, all layers (fraction of KV heads serving k query heads)',
                          xaxis_title='query heads served', yaxis_title='fraction', barmode='group')
        figs.append(fig)
    return figs
