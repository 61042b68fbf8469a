"""KV-budget explorer: accuracy against K/V cache bytes for every number of KV heads, training-free.

    python -m gqa_core.kv_budget assets/models/mha --data ../shared/data/cifar10-jpeg.tar.gz --split test \
        --out runs/kv-budget

From one multi-head model: for every divisor G of its H heads, GQA and KDGQA with consecutive and advised
(``output-error``) head order, each evaluated on the split (top-1 against the labels, and agreement with the MHA
model's own top-1, which needs no labels). Writes ``kv_budget.json``, ``kv_budget.csv`` and a standalone
``kv_budget.html`` with the plotly figure.

``accelerate launch --num_processes N -m gqa_core.kv_budget ...`` splits the split's images between N
processes (each converts the same models and predicts its part; the hit counts are added up) and the head-order
advisor's scoring of the calibration images likewise (:func:`~gqa_core.core.head_order.advise_head_order`,
``parallel``): the rows are the one-process rows, counts exactly (docs/scale.md). Calibrated K/V heads
(``--inits calibrated``) split the closed form's sums between the processes (:mod:`gqa_core.core.calibrate`).
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
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from ..core.calibrate import CalibrationBudget
from ..core.vit import blocks_of
from ..core.convert import INITS, check_kv_as_built, convert, kv_cache_bytes, native_kv_heads
from ..core.device import DEVICE_CHOICES, model_device
from ..core.distributed import share_over_processes, sum_over_processes
from ..core.head_order import HEAD_ORDERS, advise_head_order
from ..io.hub import from_pretrained
from ..io.preprocessing import model_preprocessing
from ..training.data import DataSplits, build_datasets
from ..training.parallel import make_accelerator, node_of
from .figures import kv_budget_figure

__all__ = ['kv_budget', 'kv_budget_rows', 'conversions', 'predictions', 'split_tensors', 'process_tensors', 'main',
           'EXPLORED_VARIANTS', 'HEAD_ORDERS']

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


def process_tensors(accelerator: Any, dataset: Dataset, batch_size: int = 256) -> Tuple[Tensor, Tensor]:
    """This process's part of ``dataset`` as two tensors (images, labels): a contiguous part of a map-style
    split (accelerate's ``split_between_processes``, no padding: no image is counted twice), or all of a
    streamed split (already this process's part)."""
    if not isinstance(dataset, IterableDataset):
        with accelerator.split_between_processes(list(range(len(dataset)))) as mine:
            dataset = Subset(dataset, mine)
    xs, ys = [], []
    for x, y in tqdm(DataLoader(dataset, batch_size=batch_size), desc='loading', leave=False,
                     disable=not accelerator.is_main_process):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def kv_budget_rows(model: nn.Module, images: Tensor, labels: Optional[Tensor], calibration: Tensor, *,
                   variants: Sequence[str] = EXPLORED_VARIANTS, head_orders: Sequence[str] = HEAD_ORDERS,
                   batch_size: int = 256,
                   progress: Optional[Callable[[float, str], None]] = None,
                   max_refine_flops: Optional[float] = None, inits: Sequence[str] = ('mean',),
                   budget: Optional[CalibrationBudget] = None, parallel: bool = False) -> List[Dict[str, Any]]:
    """One row per (G, variant, head order, init), plus the MHA row; ``labels`` None: agreement only.
    ``model``: an MHA model, or one that shares the K/V heads it was built with (:func:`check_kv_as_built`: the
    rows then start from its multi-head expansion, and a ``native`` row is the model as it is).
    ``max_refine_flops`` bounds the head-order advisor's model-output comparison (live requests); ``inits``:
    mean-pooled and / or calibrated (on ``calibration``, with ``budget``) K/V heads. ``parallel``: every
    process of the ``torch.distributed`` group calls this with its own part of ``images`` and the same
    ``calibration``; the counts and the advisor's sums are added up over the processes."""
    model = model.eval()
    expanded = check_kv_as_built(model, type(model).__name__, 'the explorer')
    mha = convert(copy.deepcopy(model), 'mha').eval() if expanded else model  # exact: each KV head repeated
    device = model_device(mha)
    images, calibration = images.to(device), calibration.to(device)
    labels = labels.to(device) if labels is not None else None
    H = blocks_of(mha)[0].attn.num_heads
    reference = predictions(mha, images, batch_size)

    def top1(predicted: Tensor) -> Optional[float]:
        return share_over_processes(predicted == labels, parallel) if labels is not None else None
    rows = [dict(num_kv_heads=H, variant='mha', head_order='consecutive', init='mean', kv_bytes=kv_cache_bytes(mha),
                 top1=top1(reference), agreement=1.0)]
    if expanded:  # the model as it was built, beside the uniform groupings pooled from its expansion
        predicted = predictions(model, images, batch_size)
        per_block = native_kv_heads(model)
        g = per_block[0] if len(set(per_block)) == 1 else per_block  # as a config keeps it
        rows.append(dict(num_kv_heads=g, variant='native', head_order='as built',
                         init='as built', kv_bytes=kv_cache_bytes(model), top1=top1(predicted),
                         agreement=share_over_processes(predicted == reference, parallel)))
    jobs = conversions(H, variants, head_orders, inits)
    advice: Dict[int, List[List[int]]] = {}
    for i, (g, variant, order, init) in enumerate(jobs):
        if progress is not None:
            progress(i / len(jobs), f'G={g} {variant} {order} {init}')
        model = copy.deepcopy(mha)
        perms: Any = 'consecutive'
        if order == 'output-error':
            if g not in advice:
                advice[g] = advise_head_order(mha, g, calibration, max_refine_flops=max_refine_flops,
                                              parallel=parallel).permutations
            perms = advice[g]
        convert(model, variant, g, head_order=perms, init=init, calibration=calibration if init != 'mean' else None,
                budget=budget, parallel=parallel)
        predicted = predictions(model.eval(), images, batch_size)
        rows.append(dict(num_kv_heads=g, variant=variant, head_order=order, init=init,
                         kv_bytes=kv_cache_bytes(model),
                         top1=share_over_processes(predicted == labels, parallel) if labels is not None else None,
                         agreement=share_over_processes(predicted == reference, parallel)))
    if progress is not None:
        progress(1.0, 'done')
    return rows


def kv_budget(model_source: str, data: str, split: str = 'test', limit: Optional[int] = None,
              calibration_images: int = 512, seed: int = 0, batch_size: int = 256,
              device: Optional[str] = None, inits: Sequence[str] = ('mean',), streaming: bool = False,
              accelerator: Any = None) -> Dict[str, Any]:
    """The explorer's rows for ``model_source`` on a split (see the module doc), data-parallel under
    ``accelerate launch`` (every process gets the whole result; ``processes`` says how many computed it)."""
    accelerator = accelerator or make_accelerator(device)
    model = from_pretrained(model_source).float().eval().to(accelerator.device)
    check_kv_as_built(model, model_source, 'the explorer')  # before any data is read
    splits = build_datasets(data, model_preprocessing(model), seed=seed, limit=limit, streaming=streaming,
                            node=node_of(accelerator))
    images, labels = process_tensors(accelerator, splits.split(split), batch_size)
    n = int(sum_over_processes(torch.tensor([len(labels)])))
    bar = tqdm(total=100, desc='kv budget', disable=not accelerator.is_main_process)

    def progress(fraction: float, what: str) -> None:
        bar.n = int(fraction * 100)
        bar.set_postfix_str(what)
        bar.refresh()
    rows = kv_budget_rows(model, images, labels, splits.calibration(calibration_images, seed), progress=progress,
                          batch_size=batch_size, inits=inits, parallel=True)
    bar.close()
    return dict(model=model_source, data=Path(data).name, split=split, n=n, processes=accelerator.num_processes,
                seed=seed,
                calibration_images=calibration_images, num_heads=blocks_of(model)[0].attn.num_heads, rows=rows)


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
    parser.add_argument('--streaming', action='store_true', help='stream a Hub dataset (test split only)')
    args = parser.parse_args(argv)
    accelerator = make_accelerator(args.device)
    result = kv_budget(args.model, args.data, args.split, args.limit, args.calibration_images, args.seed,
                       device=args.device, inits=args.inits, streaming=args.streaming, accelerator=accelerator)
    if not accelerator.is_main_process:
        return
    write_outputs(result, Path(args.out))
    for row in result['rows']:
        top1 = f"{row['top1'] * 100:6.2f} %" if row['top1'] is not None else '   n/a'
        print(f"G={row['num_kv_heads']:<3} {row['variant']:<6} {row['head_order']:<12} {row.get('init', 'mean'):<10} "
              f"{row['kv_bytes']:>9,} B  "
              f"top-1 {top1}  agreement {row['agreement'] * 100:6.2f} %")


if __name__ == '__main__':
    main()
