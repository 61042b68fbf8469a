"""Evaluate a saved or Hub model on a dataset split: ``python -m gqa_core.evaluate MODEL --data SRC``.

Prints top-1 / top-5, per-class accuracy and, for the key-driven variants, the mean allocation (query heads
per KV head) of every layer over the split. ``--json FILE`` writes the same numbers, with ``n`` (images
counted) and ``processes``. ``accelerate launch --num_processes N -m gqa_core.evaluate ...`` splits the images
between N processes and gives the one-process numbers (docs/scale.md).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

import torch

from ..core.convert import grouping_config
from ..core.device import DEVICE_CHOICES
from ..core.record import record
from ..core.vit import gqa_layers
from ..io.hub import ModelLoadError, from_pretrained
from ..io.preprocessing import model_preprocessing
from .accuracy import Accuracy
from .data import build_datasets
from .parallel import gathered_batches, make_accelerator, node_of

__all__ = ['evaluate', 'main']


@torch.inference_mode()
def evaluate(model_source: str, data: str, split: str = 'test', batch_size: int = 256, workers: int = 0,
             device: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0,
             limit: Optional[int] = None, streaming: bool = False, accelerator: Any = None) -> Dict[str, Any]:
    """Accuracy and mean allocation of ``model_source`` on a split, data-parallel under ``accelerate launch``
    (:mod:`~gqa_core.training.parallel`): every process gets the one-process result. ``device``: see
    :func:`~gqa_core.core.device.resolve_device` (CUDA when there is one, unless told); ``streaming``: stream a
    Hub dataset's test split; ``accelerator``: the run's (default: :func:`make_accelerator` on ``device``)."""
    accelerator = accelerator or make_accelerator(device)
    model = from_pretrained(model_source).to(accelerator.device).eval()
    splits = build_datasets(data, model_preprocessing(model), val_fraction=val_fraction, seed=seed, limit=limit,
                            streaming=streaming, node=node_of(accelerator))
    dataset = splits.split(split)
    labels = model.pretrained_cfg.get('label_names') or splits.classes
    keyed = gqa_layers(model)[0].policy.uses_key_norms
    accuracy = Accuracy(len(labels))
    alloc_sum: Optional[torch.Tensor] = None
    with record(model, attention='none') as rec:
        def step(images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
            logits = model(images)
            allocation = torch.stack([layer.allocation for layer in rec.result.layers], 1)  # (B, L, G)
            return dict(logits=logits.float(), targets=targets,
                        allocation=allocation.expand(len(targets), -1, -1).contiguous())
        for batch in gathered_batches(accelerator, dataset, step, batch_size, workers, desc=split):
            accuracy.update(batch['logits'], batch['targets'])
            allocation = batch['allocation'].long().sum(0)  # integers: exact in any order
            alloc_sum = allocation if alloc_sum is None else alloc_sum + allocation
    counted = accuracy.result()
    result: Dict[str, Any] = dict(
        model=model_source, data=data, split=split, n=counted['n'], processes=accelerator.num_processes,
        top1=counted['top1'], top5=counted['top5'],
        per_class={label: counted['per_class'][i] for i, label in enumerate(labels)},
        grouping=grouping_config(model),
    )
    if alloc_sum is not None:
        result['mean_allocation'] = (alloc_sum.double() / max(counted['n'], 1)).tolist()
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
    parser.add_argument('--streaming', action='store_true', help='stream a Hub dataset (test split only)')
    parser.add_argument('--json', help='also write the result here (with processes: how many computed it)')
    args = parser.parse_args(argv)
    accelerator = make_accelerator(args.device)
    try:
        result = evaluate(args.model, args.data, args.split, args.batch_size, args.workers, args.device,
                          limit=args.limit, streaming=args.streaming, accelerator=accelerator)
    except (ValueError, ModelLoadError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None
    if not accelerator.is_main_process:
        return
    print(format_result(result))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)


if __name__ == '__main__':
    main()
