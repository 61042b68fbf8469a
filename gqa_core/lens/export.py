"""The "Download everything" zip: one per analysis, written as a stream with bounded memory.

Per model: ``arrays.npz`` (every recorded array, plus the full ``(H, T, T)`` maps of the chosen layer,
recomputed on demand), ``meta.json`` (spec, top-5, grouping, row labels, grid, history), ``allocations.csv``,
the overlay and rollout PNGs, and every plotly figure as JSON and HTML. The HTML figures load the one copy of
plotly.js at the zip's root (``plotly.min.js``), never a CDN, so they open offline. Arrays are written one at
a time straight into the archive (``.npy`` inside ``.npz`` inside the zip), never as JSON lists of floats,
so peak memory is one array, not the whole recording.
"""
from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .analysis import Analysis, layer_maps
from .pick import parse_query, picked_maps
from .views import VIEWS, Choice, head_label, layer_index, reference_for, render
from .models import ModelRegistry

__all__ = ['export_zip', 'analysis_arrays', 'PLOTLY_JS']

PLOTLY_JS = 'plotly.min.js'  # one copy at the zip's root, shared by every HTML figure

def analysis_arrays(analysis: Analysis) -> Iterator[Tuple[str, np.ndarray]]:
    """``(name, array)`` for everything an analysis holds, layer-first (batch of one dropped)."""
    rec = analysis.recording
    yield 'view', analysis.view
    yield 'attention_rows', rec.stacked('attention')[:, 0]  # (L, H, rows, T): see meta.json row_labels
    for name in ('key_norms', 'shares', 'allocation', 'query_to_kv'):
        yield name, rec.stacked(name)[:, 0]
    for fusion, joint in rec.rollout.items():
        yield f'rollout_{fusion}', joint[0].numpy()  # (T,)
    if rec.pool_attention is not None:
        yield 'pool_attention', rec.pool_attention[0].numpy()  # (pool heads, T): the pooling query's attention
    if analysis.ablation is not None:
        for mode in analysis.ablation.kv:
            yield f'ablation_kv_{mode}', analysis.ablation.kv[mode]  # (L, G) drop of the score
            yield f'ablation_query_{mode}', analysis.ablation.query[mode]  # (L, H)
    for i, (name, curves) in enumerate((analysis.faithfulness or {}).items()):
        for key in ('fractions', 'deletion', 'insertion'):
            yield f'faithfulness{i}_{key}', curves[key]
    yield ('features' if rec.headless else 'logits'), rec.logits[0].numpy()


def _write_npz(zf: zipfile.ZipFile, name: str, arrays: Iterator[Tuple[str, np.ndarray]]) -> None:
    with zf.open(name, 'w', force_zip64=True) as stream, \
            zipfile.ZipFile(stream, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as npz:
        for key, array in arrays:
            with npz.open(f'{key}.npy', 'w', force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.ascontiguousarray(array), allow_pickle=False)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format='PNG')
    return buf.getvalue()


def _meta(analysis: Analysis, layer: int, head: str, fusion: str) -> Dict:
    rec = analysis.recording
    return dict(spec=analysis.spec, top5=analysis.top5, grouping=analysis.grouping, notes=analysis.notes,
                row_labels=rec.row_labels, summary_row=rec.summary_row, rollout_of=rec.rollout_label,
                grid_size=list(rec.grid_size),
                num_prefix_tokens=rec.num_prefix_tokens, headless=rec.headless, history=analysis.history,
                chosen=dict(layer=layer, head=head, fusion=fusion), deep_note=analysis.deep_note,
                faithfulness={name: dict(index=i, deletion_auc=c['deletion_auc'], insertion_auc=c['insertion_auc'])
                              for i, (name, c) in enumerate((analysis.faithfulness or {}).items())},
                source_heads=analysis.source_heads)


def export_zip(analyses: Sequence[Optional[Analysis]], layer: int, head: str, fusion: str, path: Path,
               registry: Optional[ModelRegistry] = None, query: str = '') -> Path:
    """Write the zip to ``path``. With ``registry``, each model's full maps of ``layer`` are recomputed and
    included as ``full_layer{layer}``; ``picked_maps.json`` holds the picked ``query``'s maps at ``layer``
    (its row and column per head, by KV head)."""
    reference = reference_for(analyses)
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        from plotly.offline import get_plotlyjs
        zf.writestr(PLOTLY_JS, get_plotlyjs())
        for i, analysis in enumerate(analyses):
            if analysis is None:
                continue
            folder = f'{i}_{re.sub(r"[^A-Za-z0-9_.-]+", "_", analysis.spec)[:80]}'
            layer_i = layer_index(analysis, layer)

            def arrays() -> Iterator[Tuple[str, np.ndarray]]:
                yield from analysis_arrays(analysis)
                if registry is not None:
                    yield f'full_layer{layer_i}', layer_maps(registry.get(analysis.spec), analysis, layer_i)

            zf.writestr(f'{folder}/meta.json', json.dumps(_meta(analysis, layer_i, head, fusion)))
            zf.compression = zipfile.ZIP_STORED
            _write_npz(zf, f'{folder}/arrays.npz', arrays())
            zf.compression = zipfile.ZIP_DEFLATED
            rows = io.StringIO()
            writer = csv.writer(rows)
            writer.writerow(['layer', 'kv_head', 'allocation', 'share', 'key_norm'])
            rec = analysis.recording
            alloc, shares, norms = (rec.stacked(n)[:, 0] for n in ('allocation', 'shares', 'key_norms'))
            for li in range(alloc.shape[0]):
                for g in range(alloc.shape[1]):
                    if np.isnan(alloc[li, g]):  # a KV head this layer does not have (G differs by block)
                        continue
                    writer.writerow([li, g, int(alloc[li, g]), float(shares[li, g]), float(norms[li, g])])
            zf.writestr(f'{folder}/allocations.csv', rows.getvalue())
            try:
                picked = picked_maps(rec, layer_i, parse_query(query, rec)).as_dict()
            except ValueError as e:
                picked = dict(error=str(e))
            zf.writestr(f'{folder}/picked_maps.json', json.dumps(picked))  # (pick.json: the view's figure)
            _write_views(zf, folder, analysis, Choice(layer=layer_i, head=head, fusion=fusion, query=query),
                         reference)
    return path


def _write_views(zf: zipfile.ZipFile, folder: str, analysis: Analysis, choice: Choice,
                 reference: Optional[Analysis]) -> None:
    """Every view that applies to ``analysis``: pictures as PNG, figures as JSON and HTML titled with the
    model and the view's caption (a wide page, unlike the app's columns)."""
    names = dict(overlay=f'attention_layer{choice.layer}_head-{head_label(analysis, choice.head)}',
                 rollout=f'rollout_{choice.fusion}')
    for name in VIEWS:
        shown = render(analysis, replace(choice, view=name), reference)
        if shown.picture is not None:
            zf.writestr(f'{folder}/{names.get(name, name)}.png', _png(shown.picture))
        elif shown.figure is not None:
            fig = shown.figure
            fig.update_layout(title=dict(text=f'{analysis.spec}: {VIEWS[name].label}'), margin_t=60)
            zf.writestr(f'{folder}/{name}.json', fig.to_json())
            zf.writestr(f'{folder}/{name}.html', fig.to_html(include_plotlyjs=f'../{PLOTLY_JS}', full_html=True))
