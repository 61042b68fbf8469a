"""The calibration images the app's head-order advisor uses: 512 CIFAR-10 training images shipped as one
uint8 array (``assets/calibration/cifar10-train-512.npz``, 1.5 MB), so "convert with an advised head order" works
offline. Each model sees them through its own preprocessing.

    python -m gqa_core.lens.calibration ../shared/data/cifar10-jpeg.tar.gz    # regenerates the file
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch
from PIL import Image

from ..io.preprocessing import eval_geometry, normalisation
from ..training.data import build_datasets

__all__ = ['CALIBRATION_FILE', 'calibration_images', 'write_calibration_set']

CALIBRATION_FILE = Path(__file__).resolve().parents[2] / 'assets' / 'calibration' / 'cifar10-train-512.npz'


def calibration_images(preprocessing: Dict[str, Any], n: int, path: Path = CALIBRATION_FILE) -> torch.Tensor:
    """The first ``n`` shipped images, preprocessed for a model: ``(n, 3, H, W)``."""
    with np.load(path, allow_pickle=False) as data:
        images = data['images'][:n]
    geometry, norm = eval_geometry(preprocessing), normalisation(preprocessing)
    return torch.stack([norm(geometry(Image.fromarray(img))) for img in images])


def write_calibration_set(source: str, path: Path = CALIBRATION_FILE, n: int = 512, seed: int = 0) -> Path:
    """Draw ``n`` training images (never val or test) as :meth:`DataSplits.calibration` does, and save them raw."""
    identity = dict(input_size=[3, 32, 32], mean=[0.0] * 3, std=[1.0] * 3, crop_pct=1.0, interpolation='bicubic')
    splits = build_datasets(source, identity, val_fraction=0.1, seed=seed)
    order = torch.randperm(len(splits.train_eval), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    subset = splits.train_eval
    images = np.stack([np.asarray(subset.dataset.loader(subset.dataset.samples[subset.indices[i]][0]))
                       for i in order]).astype(np.uint8)
    labels = np.array([subset.dataset.samples[subset.indices[i]][1] for i in order], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, labels=labels, classes=np.array(splits.classes))
    return path


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('data', help='the CIFAR-10 ImageFolder archive or folder')
    print(write_calibration_set(parser.parse_args().data))
