"""The rollout the recorder takes vector by matrix from the last layer down (maps recomputed in tiles of
rows) equals Abnar & Zuidema's product of all layers' full maps, for a class token, the mean over queries and
an attention-pooling query; and the recorded prefix rows are exactly the full maps' rows."""
import copy

import numpy as np
import pytest
import torch

from gqa_core import convert, record
from gqa_core.core import record as record_module
from support.reference import attention_rollout
from test_families import family_model, images


def _reference(full: np.ndarray, fusion: str, summary: np.ndarray) -> np.ndarray:
    """``summary @ A_L ... A_1`` from every layer's full maps ``(L, H, T, T)`` (one image)."""
    T = full.shape[-1]
    joint = np.eye(T)
    for layer in getattr(full, fusion)(axis=1):
        a = 0.5 * layer.astype(np.float64) + 0.5 * np.eye(T)
        joint = (a / a.sum(-1, keepdims=True)) @ joint
    return summary @ joint


@pytest.mark.parametrize('key', ['dinov3', 'beit', 'siglip', 'pe', 'eva02'])
@pytest.mark.parametrize('tile_rows', [None, 3])
def test_vector_rollout_equals_the_product_of_full_maps(key, tile_rows, monkeypatch):
    model = convert(family_model(key), 'kdgqa', 2).eval()
    x = images(model, n=2)
    if tile_rows:  # force several tiles of rows per layer
        monkeypatch.setattr(record_module, '_row_step', lambda B, H, T, budget=0: tile_rows)
    with torch.no_grad(), record(model, attention='prefix', rollout=('mean', 'max', 'min'), keep_qk=True) as rec:
        model(x)
    with torch.no_grad(), record(model, attention='full') as full_rec:
        model(x)
    got, full = rec.result, full_rec.result.stacked('attention')  # (L, B, H, T, T)
    T = full.shape[-1]
    for b in range(x.shape[0]):
        if got.pool_attention is not None:
            summary = got.pool_attention[b].mean(0).double().numpy()
        elif got.row_labels[got.summary_row] == 'class token':
            summary = np.eye(T)[0]
        else:
            summary = np.full(T, 1.0 / T)
        for fusion in ('mean', 'max', 'min'):
            want = _reference(full[:, b], fusion, summary)
            np.testing.assert_allclose(got.rollout[fusion][b].numpy(), want, atol=2e-6, rtol=1e-4)
    prefix = got.num_prefix_tokens
    attention = got.stacked('attention')
    if prefix:
        assert np.array_equal(attention[:, :, :, :prefix], full[:, :, :, :prefix]), "prefix rows differ from the full maps"


def test_class_token_rollout_matches_the_repo_reference():
    model = convert(family_model('dinov3'), 'gqa', 2).eval()
    x = images(model, n=1)
    with torch.no_grad(), record(model, attention='full', rollout=('mean',)) as rec:
        model(x)
    maps = rec.result.stacked('attention')[:, 0]
    want = attention_rollout(maps.astype(np.float64), rec.result.num_prefix_tokens, 'mean')
    np.testing.assert_allclose(rec.result.rollout_patches('mean'), want, atol=2e-6, rtol=1e-4)
