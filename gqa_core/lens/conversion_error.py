"""The "where GQA hurts" view: per layer and per KV head, how far a converted model's tokens are from the MHA
model's, mean-pooled against calibrated -- from the :class:`~gqa_core.core.calibrate.CalibrationReport` a
calibrated conversion recorded (no model runs to draw it).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import TEMPLATE, Fit

__all__ = ['conversion_error_figure', 'conversion_error_caption']

LABELS = ('mean-pooled', 'calibrated')  # the two conversions the figure compares
COLORS = ('#d62728', '#1f77b4')


def conversion_error_caption(report: Dict[str, Any]) -> str:
    """What the figure shows, with the worst layer named."""
    mean, calibrated = report['error_mean_pooled'], report['error_calibrated']
    worst = int(np.argmax(mean))
    return (f'how far the converted model\'s tokens are from the MHA model\'s after each layer (relative squared '
            f'error on {min(report["images"], 32)} calibration images; top) and the error of the query heads each KV '
            f'head serves (bottom: mean-pooled left, calibrated right). Mean-pooling hurts most by layer {worst} '
            f'({mean[worst]:.3f}); calibrated: {calibrated[worst]:.3f} there, {max(calibrated):.3f} at most '
            f'({report["images"]} images, {report["steps_per_layer"]} steps a layer, {report["seconds"]:.0f} s)')


def conversion_error_figure(report: Dict[str, Any], fit: Fit = Fit()) -> go.Figure:
    """Top: per-layer error, mean-pooled vs calibrated (log scale: calibration removes orders of magnitude).
    Bottom: layers x KV heads heat maps of the per-KV-head error, both on one colour scale."""
    mean = np.asarray(report['error_mean_pooled'], dtype=float)
    calibrated = np.asarray(report['error_calibrated'], dtype=float)
    per_kv = [np.asarray(report['error_mean_pooled_per_kv_head'], dtype=float),
              np.asarray(report['error_calibrated_per_kv_head'], dtype=float)]
    L, G = per_kv[0].shape
    layers = [f'L{i}' for i in range(L)]
    heat_px = max(fit.plot_px(colorbar=True) / 2 - 20, 60)
    heat_height = int(np.clip(heat_px * L / max(G, 1), 120, 360))
    fig = make_subplots(rows=2, cols=2, specs=[[{'colspan': 2}, None], [{}, {}]], vertical_spacing=0.14,
                        horizontal_spacing=0.08, row_heights=[220, heat_height],
                        subplot_titles=('', *(f'{name}, per KV head' for name in LABELS)))
    fig.update_annotations(font_size=fit.font)
    for values, name, color in zip((mean, calibrated), LABELS, COLORS):
        fig.add_trace(go.Bar(x=layers, y=np.maximum(values, 1e-6), name=name, marker_color=color,
                             hovertemplate=f'{name}, %{{x}}: %{{y:.4f}}<extra></extra>'), row=1, col=1)
    top = float(max(per_kv[0].max(), per_kv[1].max(), 1e-12))
    for col, (z, name) in enumerate(zip(per_kv, LABELS), start=1):
        fig.add_trace(go.Heatmap(z=z, x=[f'kv{g}' for g in range(G)], y=layers, zmin=0, zmax=top,
                                 colorscale='Reds', showscale=col == 2,
                                 colorbar=dict(thickness=10, tickfont=dict(size=fit.font), len=0.5, y=0.25),
                                 hovertemplate=f'{name}, %{{y}} %{{x}}: %{{z:.4f}}<extra></extra>'), row=2, col=col)
        fig.update_yaxes(autorange='reversed', row=2, col=col, showticklabels=col == 1)
    fig.update_yaxes(type='log', dtick=1, title=dict(text='error', font=dict(size=fit.font)), row=1, col=1)
    fig.update_layout(template=TEMPLATE, height=220 + heat_height + 90, barmode='group',
                      font=dict(size=fit.font), margin=dict(l=6, r=6, t=30, b=6),
                      legend=dict(orientation='h', x=0, y=1.02, yanchor='bottom'))
    return fig
