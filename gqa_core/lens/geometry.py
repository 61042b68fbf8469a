"""The geometry behind a KV group: the queries of the heads sharing one key head and that head's keys, in one 2-D
projection (the first two principal components of all of them together), the picked token marked.

Where the query clouds of sibling heads sit apart, the shared key serves different questions; where they overlap,
sharing it cost little. Computed from the queries and keys a recording kept (no model runs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import plotly.graph_objects as go
import torch

from ..core.record import Recording
from .figures import Fit, fitted, kv_colors
from .pick import POOL_QUERY, Picked, Place, pick_places, prefix_names, token_places

__all__ = ['GroupGeometry', 'group_geometry', 'geometry_figure', 'geometry_caption']


@dataclass
class GroupGeometry:
    """One layer, one KV head: each query head's queries ``(T, 2)`` and the keys ``(T, 2)`` in the same plane."""
    layer: int
    kv_head: int
    heads: List[int]
    queries: List[np.ndarray]
    keys: np.ndarray
    explained: float  # share of the variance the two components hold
    picks: Tuple[Picked, ...]
    token_labels: List[str]
    token_places: List[str]  # the query text that picks each token


def _token_labels(recording: Recording) -> List[str]:
    prefix = prefix_names(recording)[:recording.num_prefix_tokens]
    rows, cols = int(recording.grid_size[0]), int(recording.grid_size[1])
    return prefix + [f'patch ({r}, {c})' for r in range(rows) for c in range(cols)]


def group_geometry(recording: Recording, layer: int, head: int, places: Sequence[Place]) -> GroupGeometry:
    """The KV group of query head ``head`` at ``layer`` (for this image: KDGQA routes per image), the picked
    tokens marked."""
    record = recording.layers[layer]
    if record.queries is None:
        raise ValueError('this recording kept no queries and keys (record(..., keep_qk=True))')
    picks = pick_places(recording, places)
    if picks[0].token is None:
        raise ValueError(f'the {POOL_QUERY} is not a token of the blocks: pick a token to see a layer\'s geometry')
    query_to_kv = record.query_to_kv[0]
    if not 0 <= head < len(query_to_kv):
        raise ValueError(f'head {head} does not exist: this model has {len(query_to_kv)} heads')
    g = int(query_to_kv[head])
    heads = torch.nonzero(query_to_kv == g).flatten().tolist()
    queries = record.queries[0, heads].float()  # (n, T, d), scaled as the attention scores use them
    keys = record.keys[0, g].float()  # (T, d)
    points = torch.cat([queries.reshape(-1, queries.shape[-1]), keys])
    centred = points - points.mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    plane = (centred @ v[:2].T).numpy()
    T = keys.shape[0]
    explained = float((s[:2] ** 2).sum() / (s ** 2).sum().clamp_min(1e-12))
    return GroupGeometry(layer, g, heads, [plane[i * T:(i + 1) * T] for i in range(len(heads))], plane[-T:],
                         explained, picks, _token_labels(recording),
                         token_places(recording))


def geometry_figure(geo: GroupGeometry, fit: Fit = Fit()) -> go.Figure:
    """Each sibling head's queries in its own colour, the shared keys in grey, the picked tokens ringed. Each
    point carries its token's place (``customdata``): a click on it picks that token (the page's script)."""
    colors = kv_colors(len(geo.heads))
    traces = [go.Scatter(x=geo.keys[:, 0], y=geo.keys[:, 1], mode='markers', name=f'K{geo.kv_head} keys',
                           text=geo.token_labels, customdata=geo.token_places,
                           hovertemplate='%{text}<extra>key</extra>',
                           marker=dict(size=5, color='#9aa0a6', symbol='x'))]
    for h, points, color in zip(geo.heads, geo.queries, colors):
        traces.append(go.Scatter(x=points[:, 0], y=points[:, 1], mode='markers', name=f'q{h}', text=geo.token_labels,
                                   customdata=geo.token_places,
                                   hovertemplate='%{text}<extra>q' + str(h) + '</extra>',
                                   marker=dict(size=5, color=color, opacity=0.7)))
    picked = np.stack([points[p.token] for p in geo.picks for points in geo.queries + [geo.keys]])
    traces.append(go.Scatter(x=picked[:, 0], y=picked[:, 1], mode='markers', name='picked', hoverinfo='skip',
                               marker=dict(size=13, color='rgba(0,0,0,0)', line=dict(color='#00b8d4', width=2))))
    fig = fitted(fit, 340, traces, legend=dict(orientation='h', x=0, y=1.0, yanchor='bottom'), top=40)
    fig.update_xaxes(title='component 1', zeroline=False)
    fig.update_yaxes(title='component 2', zeroline=False)
    return fig


def geometry_caption(geo: GroupGeometry) -> str:
    heads = ', '.join(f'q{h}' for h in geo.heads)
    return (f'layer {geo.layer}, KV head {geo.kv_head} and the query heads sharing it for this image ({heads}): '
            f'their queries and its keys in the plane of their first two principal components '
            f'({100 * geo.explained:.0f} % of the variance); ringed: the '
            + (geo.picks[0].label if len(geo.picks) == 1 else f'{len(geo.picks)} picked tokens')
            + '; click a point to pick its token')
