"""Instant hover: one layer's patch-to-patch maps for every head, sent to the browser once, so that the page draws
where the patch under the pointer looks -- per query head, arranged by KV group -- with no server round trip.

Only where it is cheap: the maps are ``H x P x P`` bytes (uint8, each row scaled by its own maximum), about
32 KB for the embedded family (8 heads, 64 patches) and 230 KB for a 224-px ViT-S (6 heads, 196 patches). Above
:data:`HOVER_MAX_BYTES` (1 MiB: a 224-px ViT-B's 12 heads fit; a 384-px ViT-S or DINOv2 at 518 px do not) a
model is picked by clicking only. The drawing is the page's script (``hover.js``), which also wires the arrow keys
and the geometry view's clicks to the pick.
"""
from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..core.record import Recording
from .figures import _lut

__all__ = ['HoverMaps', 'hover_maps', 'hover_html', 'HOVER_MAX_BYTES', 'HOVER_SCRIPT', 'HOVER_PANEL_SCRIPT']

HOVER_MAX_BYTES = 1 << 20  # per model and layer; 4 models at most send 4 MiB once per layer
HOVER_SCRIPT = (Path(__file__).with_name('hover.js')).read_text()
# a hover panel's own js_on_load: the page script (installed once), then its first drawing after each new value
HOVER_PANEL_SCRIPT = HOVER_SCRIPT + '''
const drawFirst = () => requestAnimationFrame(() =>
  element.querySelectorAll('.gqa-hover').forEach((root) => window.gqaLens.first(root)));
drawFirst();
watch('value', drawFirst);
'''


@dataclass
class HoverMaps:
    """One layer's maps from every patch to every patch: ``maps`` ``(H, P, P)`` uint8 (row p: where patch p looks,
    scaled by the row's maximum), the patch grid, and the query heads of each KV head for this image."""
    layer: int
    grid_size: tuple
    maps: np.ndarray
    groups: List[List[int]]

    @property
    def nbytes(self) -> int:
        return int(self.maps.nbytes)


def hover_maps(recording: Recording, layer: int, limit: int = HOVER_MAX_BYTES) -> Optional[HoverMaps]:
    """The patch-to-patch maps of ``layer`` from the recording's kept queries and keys, or None when they would
    exceed ``limit`` bytes (or nothing was kept). One batched matmul: no loop over heads or patches."""
    record = recording.layers[layer]
    rows, cols = int(recording.grid_size[0]), int(recording.grid_size[1])
    P, H = rows * cols, int(record.query_to_kv.shape[1])
    if record.queries is None or H * P * P > limit:
        return None
    first = recording.num_prefix_tokens
    route = record.query_to_kv[0]
    q = record.queries[0, :, first:].float()  # (H, P, d), scaled
    k = record.keys[0, route].float()  # (H, T, d): each head's KV head
    scores = q @ k.transpose(-2, -1)  # (H, P, T)
    if record.bias is not None:
        scores = scores + record.bias[:, first:].float()
    # (H, P, P): patch keys only; a talking-heads layer's weights can be negative: drawn from 0
    probs = record.weights(scores, record.normalisers()[0, :, first:, None])[..., first:].clamp_min(0)
    scaled = probs / probs.amax(-1, keepdim=True).clamp_min(1e-12)
    maps = (scaled * 255).round().to(torch.uint8).numpy()
    groups = [np.flatnonzero(route.numpy() == g).tolist() for g in range(int(record.keys.shape[1]))]
    return HoverMaps(layer, (rows, cols), maps, [g for g in groups if g])


def _png_data_url(picture: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()


def hover_html(maps: HoverMaps, picture: np.ndarray, width: int, start: Tuple[int, int] = (-1, -1)) -> str:
    """The hover panel: the picture the model saw (hover it) beside a canvas the page's script draws each query
    head's map on, the heads sharing a KV head side by side. ``width``: CSS pixels the panel may take; ``start``:
    the cell drawn before any hover (the picked patch; the centre when negative)."""
    rows, cols = maps.grid_size
    row, col = start if min(start) >= 0 else (rows // 2, cols // 2)
    data = dict(grid=f'{rows},{cols}', layout=json.dumps(maps.groups), start=f'{row},{col}',
                picked='1' if min(start) >= 0 else '0',
                lut=base64.b64encode(_lut('Inferno').tobytes()).decode(),
                maps=base64.b64encode(maps.maps.tobytes()).decode(), width=str(int(width)), layer=str(maps.layer))
    attributes = ' '.join(f'data-{k}="{html.escape(v, quote=True)}"' for k, v in data.items())
    side = max(96, min(144, int(width) // 4))
    return (f'<div class="gqa-hover" {attributes}>'
            f'<div class="gqa-hover-note" style="font-size:var(--text-sm)">hover the picture: where the patch under '
            f'the pointer looks in layer {maps.layer}, each query head, the heads sharing a KV head side by side '
            f'(drawn in your browser); click to pick it</div>'
            f'<div class="gqa-hover-body" style="display:flex;gap:10px;align-items:flex-start;margin-top:4px">'
            f'<div class="gqa-hover-frame" style="position:relative;flex:none;width:{side}px">'
            f'<img class="gqa-hover-picture" alt="hover to see a patch\'s maps" draggable="false" '
            f'src="{_png_data_url(picture)}" style="display:block;width:{side}px;image-rendering:pixelated;'
            f'cursor:crosshair">'
            f'<div class="gqa-hover-cell" style="position:absolute;pointer-events:none;box-sizing:border-box;'
            f'border:2px solid #00e5ff"></div></div>'
            f'<canvas class="gqa-hover-tiles" style="flex:none"></canvas></div>'
            f'<div class="gqa-hover-readout" style="font-size:var(--text-sm)">—</div></div>')
