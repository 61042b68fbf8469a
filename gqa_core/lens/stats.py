"""Dataset view: how a family of models allocates queries over a whole split, and how often they agree.

    python -m gqa_core.stats assets/models/mha assets/models/kdgqa ... --data ../shared/data/cifar10-jpeg.tar.gz \
        --split test --out runs/stats

Per model: top-1; per layer the allocation histogram (how often a KV head served 0, 1, ..., H query heads),
the rate at which each KV head was idle, the mean entropy of the allocation (bits; 0 = every query head on one
KV head, log2 G = uniform) and the mean allocation per class. Between models: pairwise agreement of top-1.
Writes ``stats.json``, ``stats.csv`` (one row per model, layer and KV head) and a standalone ``stats.html``.
``accelerate launch --num_processes N -m gqa_core.stats ...`` splits the images between N processes and
writes the one-process figures (docs/scale.md).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..core.record import record
from ..core.convert import grouping_config
from ..core.device import DEVICE_CHOICES, model_device
from ..io.hub import from_pretrained
from ..io.preprocessing import model_preprocessing
from ..training.data import build_datasets
from ..training.parallel import gathered_batches, make_accelerator, node_of
from .figures import stats_figures

__all__ = ['dataset_stats', 'model_stats', 'main']


@torch.inference_mode()
def model_stats(model: torch.nn.Module, dataset: Dataset, num_classes: int, accelerator: Any = None,
                batch_size: int = 256, desc: str = '') -> Dict[str, Any]:
    """Allocation statistics and predictions of one model over ``dataset``, data-parallel under ``accelerate
    launch`` (:mod:`~gqa_core.training.parallel`). Every figure is built from integer counts (the entropy too:
    a sum over the allocation histogram), so N processes give the one-process figures exactly."""
    accelerator = accelerator or make_accelerator(str(model_device(model)))
    model = model.eval()
    predictions: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    hist = idle = per_class = counts = None
    H = 0
    with record(model, attention='none') as rec:
        def step(images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
            predicted = model(images).argmax(-1)
            alloc = torch.stack([layer.allocation for layer in rec.result.layers], 1)  # (B, L, G)
            return dict(predicted=predicted, targets=targets, allocation=alloc.expand(len(targets), -1, -1).contiguous())
        for batch in gathered_batches(accelerator, dataset, step, batch_size, desc=desc):
            alloc, targets = batch['allocation'].long(), batch['targets']
            predictions.append(batch['predicted'])
            labels.append(targets)
            B, L, G = alloc.shape
            if hist is None:
                H = int(alloc[0, 0].sum())
                hist = torch.zeros(L, H + 1, dtype=torch.long)
                idle = torch.zeros(L, G, dtype=torch.long)
                per_class = torch.zeros(num_classes, L, G, dtype=torch.long)
                counts = torch.zeros(num_classes, dtype=torch.long)
            hist += torch.nn.functional.one_hot(alloc, H + 1).sum((0, 2))
            idle += (alloc == 0).sum(0)
            per_class.index_add_(0, targets, alloc)
            counts += torch.bincount(targets, minlength=num_classes)
    pred, lab = torch.cat(predictions), torch.cat(labels)
    n = len(lab)
    p = torch.arange(H + 1, dtype=torch.float64) / H  # an allocation of a heads is a share a / H of them
    bits = torch.where(p > 0, -p * torch.log2(p.clamp_min(1e-12)), torch.zeros_like(p))
    return dict(n=n, top1=int((pred == lab).sum()) / n, predictions=pred.tolist(),
                allocation_histogram=(hist.double() / (n * idle.shape[1])).tolist(),
                idle_rate=(idle.double() / n).tolist(),
                allocation_entropy=((hist.double() @ bits) / n).tolist(),
                per_class_allocation=(per_class.double() / counts.clamp_min(1).double()[:, None, None]).tolist())


def dataset_stats(models: Sequence[str], data: str, split: str = 'test', limit: Optional[int] = None,
                  batch_size: int = 256, seed: int = 0, device: Optional[str] = None, streaming: bool = False,
                  accelerator: Any = None) -> Dict[str, Any]:
    """Statistics of each model and their pairwise top-1 agreement on one split, on ``device`` (see
    :func:`~gqa_core.core.device.resolve_device`), data-parallel under ``accelerate launch`` (every process
    gets the whole result; ``processes`` says how many computed it). ``streaming``: a Hub dataset's test split,
    streamed."""
    accelerator = accelerator or make_accelerator(device)
    result: Dict[str, Any] = dict(data=Path(data).name, split=split, processes=accelerator.num_processes,
                                  models={})
    predictions = {}
    for source in tqdm(models, desc='models', disable=not accelerator.is_main_process):
        model = from_pretrained(source).float().to(accelerator.device)
        splits = build_datasets(data, model_preprocessing(model), seed=seed, limit=limit, streaming=streaming,
                                node=node_of(accelerator))
        dataset = splits.split(split)
        name = Path(source).name if Path(source).is_dir() else source
        stats = model_stats(model, dataset, len(splits.classes), accelerator, batch_size, desc=name)
        predictions[name] = torch.tensor(stats.pop('predictions'))
        stats.update(grouping=grouping_config(model), classes=splits.classes)
        result['models'][name] = stats
        result['n'] = stats['n']
    names = list(predictions)
    result['agreement'] = {a: {b: int((predictions[a] == predictions[b]).sum()) / len(predictions[a])
                               for b in names} for a in names}
    return result


def write_outputs(result: Dict[str, Any], out: Path, html: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / 'stats.json').write_text(json.dumps(result) + '\n')
    with open(out / 'stats.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['model', 'top1', 'layer', 'kv_head', 'idle_rate', 'mean_allocation', 'layer_entropy_bits'])
        for name, s in result['models'].items():
            for layer, rates in enumerate(s['idle_rate']):
                for g, rate in enumerate(rates):
                    mean = sum(c[layer][g] for c in s['per_class_allocation']) / len(s['per_class_allocation'])
                    writer.writerow([name, s['top1'], layer, g, rate, mean, s['allocation_entropy'][layer]])
    if html:
        parts = [fig.to_html(include_plotlyjs=(i == 0), full_html=False) for i, fig in enumerate(stats_figures(result))]
        (out / 'stats.html').write_text('<html><head><meta charset="utf-8"><title>GQA Lens dataset view</title>'
                                        '</head><body>' + '\n'.join(parts) + '</body></html>')


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('models', nargs='+', help='saved GQA Lens models (folders or Hub repos)')
    parser.add_argument('--data', required=True)
    parser.add_argument('--split', default='test', choices=('test', 'val'))
    parser.add_argument('--limit', type=int)
    parser.add_argument('--out', default='runs/stats')
    parser.add_argument('--no-html', action='store_true', help='JSON and CSV only')
    parser.add_argument('--device', help=f'{DEVICE_CHOICES} (default: GQA_LENS_DEVICE, else auto)')
    parser.add_argument('--streaming', action='store_true', help='stream a Hub dataset (test split only)')
    args = parser.parse_args(argv)
    accelerator = make_accelerator(args.device)
    result = dataset_stats(args.models, args.data, args.split, args.limit, device=args.device,
                           streaming=args.streaming, accelerator=accelerator)
    if not accelerator.is_main_process:
        return
    write_outputs(result, Path(args.out), html=not args.no_html)
    for name, s in result['models'].items():
        print(f"{name:<12} top-1 {s['top1'] * 100:6.2f} %   idle rate per layer "
              + ' '.join(f'{sum(r) / len(r):.2f}' for r in s['idle_rate']))


if __name__ == '__main__':
    main()
