"""What the app does, without the app: run several models on one image and turn the results into views.

Kept apart from ``app.py`` (layout and wiring only) so it can be called and tested directly.
"""
from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from . import figures
from .analysis import Analysis, analyse, attention_rollout, prefix_attention
from .images import load_image
from .models import ModelRegistry

__all__ = ['MAX_MODELS', 'NO_MODEL', 'ColumnView', 'run_models', 'column_view', 'export_zip', 'reference_for']

MAX_MODELS = 4
NO_MODEL = '(none)'  # the choice that leaves a column empty


def _is_empty(spec: Optional[str]) -> bool:
    return not spec or not spec.strip() or spec.strip() == NO_MODEL


@dataclass
class ColumnView:
    """Everything one result column shows."""
    summary: str
    top5: Dict[str, float]
    overlay: Optional[np.ndarray]
    rollout: Optional[np.ndarray]
    grid: Any
    key_norms: Any
    assignment: Any
    history: Any
    difference: Any


def run_models(registry: ModelRegistry, image_path: Optional[str], specs: Sequence[Optional[str]],
               progress: Any = None) -> tuple:
    """Load the image once (safely) and run each chosen model on it.

    Returns ``(analyses, errors, notes)``: ``analyses[i]`` is None where slot ``i`` is empty or failed, and
    ``errors[i]`` then says why. A bad image raises :class:`ImageInputError` before any model runs.
    """
    loaded_image = load_image(image_path)
    analyses: List[Optional[Analysis]] = []
    errors: List[Optional[str]] = []
    chosen = [s for s in specs if not _is_empty(s)]
    if not chosen:
        raise ValueError('choose at least one model')
    for i, spec in enumerate(specs[:MAX_MODELS]):
        if _is_empty(spec):
            analyses.append(None)
            errors.append(None)
            continue
        try:
            if progress is not None:
                progress((i + 0.5) / len(specs), desc=f'{spec}: loading and running')
            loaded = registry.get(spec)
            analyses.append(analyse(loaded, loaded_image.image))
            errors.append(None)
        except (ValueError, OSError, RuntimeError) as e:  # ModelLoadError is a ValueError
            analyses.append(None)
            errors.append(f'{spec}: {e}')
    return analyses, errors, loaded_image.notes


def reference_for(analyses: Sequence[Optional[Analysis]]) -> Optional[Analysis]:
    """The MHA analysis the difference views compare against: the first MHA among the chosen models."""
    return next((a for a in analyses if a is not None and a.grouping['variant'] == 'mha'), None)


def _head_rows(analysis: Analysis, layer: int, head: str) -> np.ndarray:
    rec = analysis.recording
    rows = prefix_attention(analysis.maps[layer], rec.num_prefix_tokens)  # (H, patches)
    if head in ('mean', '', None):
        return rows.mean(0)
    h = int(head)
    if not 0 <= h < rows.shape[0]:
        raise ValueError(f'head {h} does not exist: this model has {rows.shape[0]} heads')
    return rows[h]


def column_view(analysis: Analysis, layer: int, head: str, fusion: str, reference: Optional[Analysis]) -> ColumnView:
    rec = analysis.recording
    L = len(rec.layers)
    layer = min(max(int(layer), 0), L - 1)
    grid = rec.grid_size
    head_label = 'mean' if head in ('mean', '', None) or int(head) >= analysis.maps.shape[1] else head
    overlay = figures.overlay(analysis.view, figures.patch_grid(_head_rows(analysis, layer, head_label), grid))
    rollout = figures.overlay(analysis.view,
                              figures.patch_grid(attention_rollout(analysis.maps, rec.num_prefix_tokens, fusion), grid))
    all_rows = prefix_attention(analysis.maps, rec.num_prefix_tokens)  # (L, H, patches)
    g = analysis.grouping
    title = f"{g['variant'].upper()} G={g['num_kv_heads']}"
    if analysis.history is not None:
        hist = analysis.history[layer]
        history = figures.allocation_history_figure(hist['steps'], np.array(hist['allocation']), layer,
                                                    title=f'{title}: allocation over training, layer {layer}')
    else:
        history = figures.message_figure('no allocation history (DGQA only)')
    if reference is None:
        difference = figures.message_figure('add an MHA model to compare')
    elif reference is analysis:
        difference = figures.message_figure('this is the MHA reference')
    else:
        ref_rows = prefix_attention(reference.maps, reference.recording.num_prefix_tokens).mean(1)
        try:
            difference = figures.difference_figure(all_rows.mean(1), ref_rows, grid,
                                                   title=f'{title} − {reference.spec}: class-token attention')
        except ValueError as e:
            difference = figures.message_figure(str(e))
    return ColumnView(
        summary=analysis.summary or analysis.spec,
        top5={label: p for label, p in analysis.top5},
        overlay=overlay,
        rollout=rollout,
        grid=figures.heads_layers_figure(all_rows, grid, title=f'{title}: heads × layers'),
        key_norms=figures.key_norm_figure(rec.stacked('shares')[:, 0], rec.stacked('key_norms')[:, 0],
                                          title=f'{title}: key-norm ratios'),
        assignment=figures.assignment_figure(rec.stacked('query_to_kv')[:, 0], rec.stacked('allocation')[:, 0],
                                             title=f'{title}: query → KV head'),
        history=history,
        difference=difference,
    )


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


def export_zip(analyses: Sequence[Optional[Analysis]], layer: int, head: str, fusion: str, path: Path) -> Path:
    """One zip with, per model: recorded numbers (JSON), allocations / ratios / norms (CSV), the overlay and
    rollout images (PNG) and every plotly figure (JSON and standalone HTML)."""
    reference = reference_for(analyses)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED) as zf:
        for i, analysis in enumerate(analyses):
            if analysis is None:
                continue
            folder = f'{i}_{re.sub(r"[^A-Za-z0-9_.-]+", "_", analysis.spec)}'
            rec = analysis.recording
            data = json.loads(rec.to_json())
            data.update(spec=analysis.spec, top5=analysis.top5, history=analysis.history)
            zf.writestr(f'{folder}/recording.json', json.dumps(data))
            rows = io.StringIO()
            writer = csv.writer(rows)
            writer.writerow(['layer', 'kv_head', 'allocation', 'share', 'key_norm'])
            alloc, shares, norms = (rec.stacked(n)[:, 0] for n in ('allocation', 'shares', 'key_norms'))
            for layer_i in range(alloc.shape[0]):
                for g in range(alloc.shape[1]):
                    writer.writerow([layer_i, g, int(alloc[layer_i, g]), float(shares[layer_i, g]),
                                     float(norms[layer_i, g])])
            zf.writestr(f'{folder}/allocations.csv', rows.getvalue())
            view = column_view(analysis, layer, head, fusion, reference)
            zf.writestr(f'{folder}/attention_layer{layer}_head-{head}.png', _png(view.overlay))
            zf.writestr(f'{folder}/rollout_{fusion}.png', _png(view.rollout))
            for name in ('grid', 'key_norms', 'assignment', 'history', 'difference'):
                fig = getattr(view, name)
                zf.writestr(f'{folder}/{name}.json', fig.to_json())
                zf.writestr(f'{folder}/{name}.html', fig.to_html(include_plotlyjs='cdn', full_html=True))
    return path

