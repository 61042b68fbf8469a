"""The app's dataset-level tabs: the KV-budget explorer and the dataset view, from shipped JSON (the embedded
family on the full CIFAR-10 test split, written by ``python -m gqa_core.kv_budget`` / ``python -m gqa_core.stats``)
or, for the KV budget, computed live on the shipped calibration images for any multi-head model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch

from ..core.convert import check_kv_as_built, kv_heads_label
from ..core.vit import blocks_of
from ..training.seeds import seed_rows
from .kv_budget import kv_budget_rows
from .calibration import CALIBRATION_FILE, calibration_images
from .gpu import KVBudgetJob, kv_budget_in_a_gpu_call, on_zerogpu
from .models import REFINE_FLOPS, ModelRegistry, live_calibration_size

__all__ = ['ANALYSIS_DIR', 'shipped_kv_budget', 'shipped_dataset_stats', 'shipped_seeds', 'live_kv_budget',
           'LIVE_MAX_IMAGES', 'kv_budget_table', 'seeds_table']

ANALYSIS_DIR = Path(__file__).resolve().parents[2] / 'assets' / 'analysis'
LIVE_MAX_IMAGES = 256  # evaluation images of a live run (the first 128 shipped images calibrate the advisor)
LIVE_CALIBRATION = 128


def shipped_kv_budget() -> Dict[str, Any]:
    return json.loads((ANALYSIS_DIR / 'kv-budget' / 'kv_budget.json').read_text())


def shipped_dataset_stats() -> Dict[str, Any]:
    return json.loads((ANALYSIS_DIR / 'dataset' / 'stats.json').read_text())


def shipped_seeds() -> Dict[str, Any]:
    """Three seeds of every uptrained run and the verdicts against GQA (``python -m gqa_core.training.seeds``)."""
    return json.loads((ANALYSIS_DIR / 'seeds' / 'seeds.json').read_text())


def seeds_table(result: Dict[str, Any]) -> list:
    """Rows for a table: run, seeds, val and test top-1 as mean ± std (%), and the verdict against GQA."""
    return seed_rows(result['runs'], result['verdicts'], reference='reference')


def kv_budget_table(result: Dict[str, Any]) -> list:
    """Rows for a table: G, variant, head order, K/V init, K/V bytes, top-1 (or blank), agreement with MHA."""
    return [[kv_heads_label(r['num_kv_heads']), r['variant'], r['head_order'], r.get('init', 'mean'), r['kv_bytes'],
             '' if r['top1'] is None else round(100 * r['top1'], 2), round(100 * r['agreement'], 2)]
            for r in result['rows']]


def live_kv_budget(registry: ModelRegistry, spec: str, n: int,
                   progress: Optional[Callable[[float, str], None]] = None) -> Dict[str, Any]:
    """The explorer for any multi-head model the registry can load, or one that shares K/V heads as it was built
    (:func:`~gqa_core.core.convert.check_kv_as_built`), on ``n`` of the shipped images (after the
    first 128, which calibrate the advisor; fewer of them for models of many tokens). Top-1 where the model's
    labels are the images' CIFAR-10 classes, agreement with the MHA model always."""
    n = int(n)
    if not 1 <= n <= LIVE_MAX_IMAGES:
        raise ValueError(f'number of images must be 1..{LIVE_MAX_IMAGES}, got {n}')
    loaded = registry.get(spec)
    check_kv_as_built(loaded.model, loaded.spec, 'the explorer')  # refused before any work
    images = calibration_images(loaded.preprocessing, LIVE_CALIBRATION + n)
    with np.load(CALIBRATION_FILE, allow_pickle=False) as data:
        labels = torch.as_tensor(data['labels'][LIVE_CALIBRATION:LIVE_CALIBRATION + n])
        classes = [str(c) for c in data['classes']]
    same_classes = list(loaded.labels) == classes
    with loaded.lock:
        calibration = images[:live_calibration_size(loaded.model, most=LIVE_CALIBRATION)]  # bounded work
        labels = labels if same_classes else None
        if on_zerogpu():  # one GPU call; progress cannot cross the process boundary
            job = KVBudgetJob.of(loaded.config, loaded.model, images[LIVE_CALIBRATION:], labels, calibration,
                                 REFINE_FLOPS)
            rows = kv_budget_in_a_gpu_call(job)
        else:
            rows = kv_budget_rows(loaded.model, images[LIVE_CALIBRATION:], labels, calibration, progress=progress,
                                  batch_size=64, max_refine_flops=REFINE_FLOPS)
    return dict(model=loaded.spec, data='shipped CIFAR-10 training images', split='live', n=n,
                num_heads=blocks_of(loaded.model)[0].attn.num_heads, rows=rows)
