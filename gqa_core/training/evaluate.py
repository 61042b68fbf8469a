"""Evaluate a saved or Hub model on a dataset split: ``python -m gqa_core.evaluate MODEL --data SRC``.

Prints top-1 / top-5, per-class accuracy and, for the key-driven variants, the mean allocation (query heads
per KV head) of every layer over the split. ``--json FILE`` writes the same numbers.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.convert import grouping_config
from ..core.device import DEVICE_CHOICES, resolve_device
from ..core.record import record
from ..core.vit import gqa_layers
from ..io.hub import ModelLoadError, from_pretrained
from ..io.preprocessing import model_preprocessing
from .accuracy import Accuracy
from .data import build_datasets

__all__ = ['evaluate', 'main']


@torch.inference_mode()
def evaluate(model_source: str, data: str, split: str = 'test', batch_size: int = 256, workers: int = 0,
             device: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0,
             limit: Optional[int] = None) -> Dict[str, Any]:
    """``device``: see :func:`~gqa_core.core.device.resolve_device` (CUDA when there is one, unless told)."""
    device = resolve_device(device)
    model = from_pretrained(model_source).to(device).eval()
    splits = build_datasets(data, model_preprocessing(model), val_fraction=val_fraction, seed=seed, limit=limit)
    dataset = splits.split(split)
    labels = model.pretrained_cfg.get('label_names') or splits.classes
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    keyed = gqa_layers(model)[0].policy.uses_key_norms
    accuracy = Accuracy(len(labels))
    alloc_sum: Optional[torch.Tensor] = None
    with record(model, attention='none') as rec:
        for images, targets in tqdm(loader, desc=f'{split}', leave=False):
            accuracy.update(model(images.to(device)), targets)
            allocation = torch.stack([layer.allocation for layer in rec.result.layers]).float().sum(1)
            alloc_sum = allocation if alloc_sum is None else alloc_sum + allocation
    counted = accuracy.result()
    result: Dict[str, Any] = dict(
        model=model_source, data=data, split=split, n=counted['n'], top1=counted['top1'], top5=counted['top5'],
        per_class={label: counted['per_class'][i] for i, label in enumerate(labels)},
        grouping=grouping_config(model),
    )
    if alloc_sum is not None:
        result['mean_allocation'] = (alloc_sum / max(counted['n'], 1)).tolist()
    result['key_driven'] = keyed
    return result


def format_result(result: Dict[str, Any]) -> str:
    lines = [f"{result['model']} on {result['data']} [{result['split']}], {result['n']} images",
             f"top-1 {result['top1'] * 100:.2f} %   top-5 {result['top5'] * 100:.2f} %", '', 'per class:']
    lines += [f'  {label:<12} {acc * 100:6.2f} %' for label, acc in result['per_class'].items()]
    if result['key_driven'] and 'mean_allocation' in result:
        lines += ['', 'mean allocation per layer (query heads per KV head):']
        lines += [f'  layer {i:2d}: ' + ' '.join(f'{a:5.2f}' for a in row)
                  for i, row in enumerate(result['mean_allocation'])]
    return '\n'.join(lines)


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='a saved model folder or a Hub repo id')
    parser.add_argument('--data', required=True, help='folder, .tar.gz archive or Hub dataset name')
    parser.add_argument('--split', choices=['test', 'val'], default='test')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--workers', type=int, default=0)
    parser.add_argument('--device', help=f'{DEVICE_CHOICES} (default: GQA_LENS_DEVICE, else auto)')
    parser.add_argument('--limit', type=int, default=None)
    parser.add_argument('--json', help='also write the result here')
    args = parser.parse_args(argv)
    try:
        result = evaluate(args.model, args.data, args.split, args.batch_size, args.workers, args.device,
                          limit=args.limit)
    except (ValueError, ModelLoadError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None
    print(format_result(result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
