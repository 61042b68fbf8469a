"""Instant hover: the maps sent to the browser are the model's maps (patch to patch, every head, rows scaled to
uint8), arranged by this image's KV groups, and only where they are small."""
import base64
import json
import re

import numpy as np
import pytest
import torch

from gqa_core import convert, record
from gqa_core.lens.hover import HOVER_MAX_BYTES, hover_html, hover_maps
from support import tiny_vit


@pytest.fixture(scope='module')
def kdgqa_recording():
    model = convert(tiny_vit(num_heads=6, depth=2), 'kdgqa', 3)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), record(model, attention='full', keep_qk=True) as rec:
        model(x)
    return rec.result


def test_hover_maps_are_the_recorded_patch_to_patch_maps(kdgqa_recording):
    rec = kdgqa_recording
    hover = hover_maps(rec, 1)
    full = rec.layers[1].attention[0, :, 1:, 1:].numpy()  # (H, P, P): patch queries over patch keys
    expected = full / full.max(-1, keepdims=True) * 255
    assert hover.maps.dtype == np.uint8 and hover.maps.shape == (6, 16, 16) and hover.nbytes == 6 * 16 * 16
    assert np.abs(hover.maps.astype(float) - expected).max() <= 1.0, 'within one step of uint8 rounding'
    route = rec.layers[1].query_to_kv[0].tolist()
    assert sorted(h for g in hover.groups for h in g) == list(range(6))
    assert all(len({route[h] for h in g}) == 1 for g in hover.groups), 'a group is the heads of one KV head'


def test_hover_stops_at_the_limit(kdgqa_recording):
    assert hover_maps(kdgqa_recording, 0, limit=6 * 16 * 16) is not None
    assert hover_maps(kdgqa_recording, 0, limit=6 * 16 * 16 - 1) is None
    # DINOv2 at 518 px: 6 heads x 1,369 patches² is 11 MB, click only; a 224-px ViT-S's 230 KB hovers
    assert 6 * 1369 ** 2 > HOVER_MAX_BYTES > 6 * 196 ** 2


def test_the_panel_carries_the_maps_and_the_groups(kdgqa_recording):
    hover = hover_maps(kdgqa_recording, 1)
    panel = hover_html(hover, np.zeros((32, 32, 3), np.uint8), 570, (0, 3))
    data = dict(re.findall(r'data-(\w+)="([^"]*)"', panel))
    assert data['grid'] == '4,4' and data['start'] == '0,3' and data['picked'] == '1' and data['layer'] == '1'
    assert np.array_equal(np.frombuffer(base64.b64decode(data['maps']), np.uint8).reshape(6, 16, 16), hover.maps)
    assert json.loads(data['layout'].replace('&quot;', '"')) == hover.groups
    assert len(base64.b64decode(data['lut'])) == 256 * 3
    centre = hover_html(hover, np.zeros((32, 32, 3), np.uint8), 570)
    assert 'data-start="2,2"' in centre and 'data-picked="0"' in centre
