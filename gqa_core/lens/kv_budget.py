"""KV-budget explorer: accuracy against K/V cache bytes for every number of KV heads, training-free.

    python -m gqa_core.kv_budget assets/models/mha --data ../shared/data/cifar10-jpeg.tar.gz --split test \
        --out runs/kv-budget

From one multi-head model: for every divisor G of its H heads, GQA and KDGQA with consecutive and advised
(``output-error``) head order, each evaluated on the split (top-1 against the labels, and agreement with the MHA
model's own top-1, which needs no labels). Writes ``kv_budget.json``, ``kv_budget.csv`` and a standalone
``kv_budget.html`` with the plotly figure.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.calibrate import CalibrationBudget
from ..core.convert import INITS, convert, grouping_config, kv_cache_bytes
from ..core.device import DEVICE_CHOICES, model_device, resolve_device
from ..core.head_order import HEAD_ORDERS, advise_head_order
from ..io.hub import from_pretrained
from ..io.preprocessing import model_preprocessing
from ..training.data import DataSplits, build_datasets
from .figures import kv_budget_figure

__all__ = ['kv_budget', 'kv_budget_rows', 'conversions', 'predictions', 'split_tensors', 'main', 'EXPLORED_VARIANTS',
           'HEAD_ORDERS']

EXPLORED_VARIANTS = ('gqa', 'kdgqa')  # the explorer's variants at each G (the static and the key-driven one)


@torch.inference_mode()
def predictions(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Top-1 class per image, in batches (the explorer compares these between models)."""
    return torch.cat([model(images[i:i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def split_tensors(splits: DataSplits, split: str, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """One split's images and labels as two tensors: every model of the explorer sees the same decoded batch."""
    dataset = splits.split(split)
    xs, ys = [], []
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size), desc=f'loading {split}', leave=False):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def conversions(num_heads: int, variants: Sequence[str] = EXPLORED_VARIANTS,
                head_orders: Sequence[str] = HEAD_ORDERS, inits: Sequence[str] = ('mean',)) -> List[tuple]:
    """``(G, variant, head order, init)`` of every model the explorer converts from an MHA of ``num_heads`` heads:
    every divisor G below it (the advisor only where there is a choice, G > 1). Also what a ZeroGPU call of
    the explorer reserves time for (:mod:`gqa_core.lens.gpu_duration`).

    Args:
        num_heads: H, the MHA model's heads.
        variants: the grouped variants at each G.
        head_orders: consecutive and / or output-error.
        inits: mean-pooled and / or calibrated K/V heads.
    """
    divisors = [g for g in range(1, num_heads) if num_heads % g == 0]
    return [(g, v, order, init) for g in divisors for v in variants for order in head_orders for init in inits
            if not (order != 'consecutive' and g == 1)]  # one group: nothing to choose


def kv_budget_rows(mha: nn.Module, images: Tensor, labels: Optional[Tensor], calibration: Tensor, *,
                   variants: Sequence[str] = EXPLORED_VARIANTS, head_orders: Sequence[str] = HEAD_ORDERS,
                   batch_size: int = 256,
                   progress: Optional[Callable[[float, str], None]] = None,
                   max_refine_flops: Optional[float] = None, inits: Sequence[str] = ('mean',),
                   budget: Optional[CalibrationBudget] = None) -> List[Dict[str, Any]]:
    """One row per (G, variant, head order, init), plus the MHA row; ``labels`` None: agreement only.
    ``max_refine_flops`` bounds the head-order advisor's model-output comparison (live requests); ``inits``:
    mean-pooled and / or calibrated (on ``calibration``, with ``budget``) K/V heads."""
    mha = mha.eval()
    device = model_device(mha)
    images, calibration = images.to(device), calibration.to(device)
    labels = labels.to(device) if labels is not None else None
    H = mha.blocks[0].attn.num_heads
    reference = predictions(mha, images, batch_size)
    rows = [dict(num_kv_heads=H, variant='mha', head_order='consecutive', init='mean', kv_bytes=kv_cache_bytes(mha),
                 top1=float((reference == labels).float().mean()) if labels is not None else None, agreement=1.0)]
    jobs = conversions(H, variants, head_orders, inits)
    advice: Dict[int, List[List[int]]] = {}
    for i, (g, variant, order, init) in enumerate(jobs):
        if progress is not None:
            progress(i / len(jobs), f'G={g} {variant} {order} {init}')
        model = copy.deepcopy(mha)
        perms: Any = 'consecutive'
        if order == 'output-error':
            if g not in advice:
                advice[g] = advise_head_order(mha, g, calibration, max_refine_flops=max_refine_flops).permutations
            perms = advice[g]
        convert(model, variant, g, head_order=perms, init=init, calibration=calibration if init != 'mean' else None,
                budget=budget)
        predicted = predictions(model.eval(), images, batch_size)
        rows.append(dict(num_kv_heads=g, variant=variant, head_order=order, init=init,
                         kv_bytes=kv_cache_bytes(model),
                         top1=float((predicted == labels).float().mean()) if labels is not None else None,
                         agreement=float((predicted == reference).float().mean())))
    if progress is not None:
        progress(1.0, 'done')
    return rows


def kv_budget(model_source: str, data: str, split: str = 'test', limit: Optional[int] = None,
              calibration_images: int = 512, seed: int = 0, batch_size: int = 256,
              device: Optional[str] = None, inits: Sequence[str] = ('mean',)) -> Dict[str, Any]:
    model = from_pretrained(model_source).float().eval().to(resolve_device(device))
    variant = grouping_config(model)['variant']
    if variant != 'mha':
        raise ValueError(f'{model_source} is {variant}; the explorer starts from MHA')
    splits = build_datasets(data, model_preprocessing(model), seed=seed, limit=limit)
    images, labels = split_tensors(splits, split, batch_size)
    bar = tqdm(total=100, desc='kv budget')

    def progress(fraction: float, what: str) -> None:
        bar.n = int(fraction * 100)
        bar.set_postfix_str(what)
        bar.refresh()
    rows = kv_budget_rows(model, images, labels, splits.calibration(calibration_images, seed), progress=progress,
                          batch_size=batch_size, inits=inits)
    bar.close()
    return dict(model=model_source, data=Path(data).name, split=split, n=len(labels), seed=seed,
                calibration_images=calibration_images, num_heads=model.blocks[0].attn.num_heads, rows=rows)


def write_outputs(result: Dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / 'kv_budget.json').write_text(json.dumps(result, indent=1) + '\n')
    with open(out / 'kv_budget.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(result['rows'][0]))
        writer.writeheader()
        writer.writerows(result['rows'])
    kv_budget_figure(result).write_html(out / 'kv_budget.html', include_plotlyjs=True, full_html=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='a saved multi-head GQA Lens model (folder or Hub repo)')
    parser.add_argument('--data', required=True)
    parser.add_argument('--split', default='test', choices=('test', 'val'))
    parser.add_argument('--limit', type=int)
    parser.add_argument('--calibration-images', type=int, default=512)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', default='runs/kv-budget')
    parser.add_argument('--device', help=f'{DEVICE_CHOICES} (default: GQA_LENS_DEVICE, else auto)')
    parser.add_argument('--inits', nargs='+', choices=INITS, default=['mean'],
                        help='K/V heads mean-pooled and / or calibrated on the calibration images (about a minute '
                             'each on 2 CPU cores for the embedded model)')
    args = parser.parse_args(argv)
    result = kv_budget(args.model, args.data, args.split, args.limit, args.calibration_images, args.seed,
                       device=args.device, inits=args.inits)
    write_outputs(result, Path(args.out))
    for row in result['rows']:
        top1 = f"{row['top1'] * 100:6.2f} %" if row['top1'] is not None else '   n/a'
        print(f"G={row['num_kv_heads']:<3} {row['variant']:<6} {row['head_order']:<12} {row.get('init', 'mean'):<10} "
              f"{row['kv_bytes']:>9,} B  "
              f"top-1 {top1}  agreement {row['agreement'] * 100:6.2f} %")


if __name__ == '__main__':
    main()
