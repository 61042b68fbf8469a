"""Convert a multi-head ViT to a grouped-query variant from the command line, calibrated or mean-pooled, and
report what it cost: ``python -m gqa_core.convert SOURCE --variant gqa --kv-heads 4 --init calibrated``.

SOURCE: a GQA Lens model folder or Hub repo (multi-head), ``hf-hub:ORG/NAME`` (a timm-format Hub repo) or
``timm:NAME`` (a timm name with Hub weights). Calibration images (``--calibration``): the 512 shipped CIFAR-10
training images (default), or ``--images`` training images drawn from an ImageFolder, a ``.tar.gz`` of one or
a Hugging Face dataset name -- each through the model's own preprocessing; no label is read. The report: per
layer, how far the converted model's tokens are from the MHA model's (mean-pooled vs calibrated, on the
calibration images; ``--held-out N`` also on N test images); top-1 of MHA, mean-pooled and the result on
``--eval DATA``'s test split when given; the time. ``--out DIR`` saves the model (its card says how it was
calibrated, on what, with what budget) with ``calibration.json`` and ``calibration.html`` (the per-layer,
per-KV-head figure). Under ``accelerate launch --num_processes N`` the advisor's scoring, the calibration's
closed form and the top-1 are split between the processes (docs/scale.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.calibrate import CALIBRATED_PARAMS, CalibrationBudget, layer_errors
from ..core.vit import blocks_of
from ..core.convert import INITS, convert, grouping_config
from ..core.head_order import HEAD_ORDERS, advise_head_order
from ..core.policies import POLICIES
from ..io.hub import ModelLoadError, from_pretrained, from_timm, save_pretrained
from ..io.preprocessing import model_preprocessing
from ..core.distributed import share_over_processes, sum_over_processes
from ..training.data import build_datasets
from ..training.parallel import make_accelerator
from .calibration import calibration_images
from .kv_budget import predictions, process_tensors

__all__ = ['load_source', 'convert_and_report', 'format_report', 'main']

SHIPPED = 'the shipped CIFAR-10 training images'


def load_source(source: str) -> nn.Module:
    """The multi-head model ``source`` names (see the module doc), in eval mode."""
    if source.startswith(('hf-hub:', 'timm:')):
        model = from_timm(source.removeprefix('timm:'), 'mha')
    else:
        model = from_pretrained(source)
    if grouping_config(model)['variant'] != 'mha':
        raise ValueError(f'{source} is {grouping_config(model)["variant"]}; convert from a multi-head model')
    return model.float().eval()


def _top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, parallel: bool = False) -> float:
    """Top-1 on ``images`` (``parallel``: this process's part; the hits are added up over the processes)."""
    with torch.no_grad():
        return share_over_processes(predictions(model.eval(), images) == labels, parallel)


def convert_and_report(model: nn.Module, variant: str, num_kv_heads: int, calibration: torch.Tensor, *,
                       head_order: str = 'consecutive', init: str = 'calibrated',
                       budget: CalibrationBudget = CalibrationBudget(),
                       evaluation: Optional[tuple] = None, held_out: Optional[torch.Tensor] = None,
                       progress: bool = True, parallel: bool = False, **policy_options: Any) -> tuple:
    """``(converted model, report dict)``. The advisor (``head_order="output-error"``) runs once; the mean-pooled
    baseline of the report pools the same heads. ``evaluation``: ``(images, labels)`` for top-1. ``parallel``:
    every process of a ``torch.distributed`` group calls this with the same ``calibration`` and ``held_out``
    and its own part of ``evaluation``; the advisor's scoring and the calibration's closed form are split
    between them and the top-1 hits added up (:func:`~gqa_core.core.convert.convert`)."""
    mha = model
    start = time.perf_counter()
    order: Any = head_order
    if head_order != 'consecutive':
        order = advise_head_order(mha, num_kv_heads, calibration, parallel=parallel).permutations
    advised_s = time.perf_counter() - start
    mean_pooled = convert(copy.deepcopy(mha), variant, num_kv_heads, head_order=order, **policy_options)
    result = mean_pooled
    calibration_report = None
    if init == 'calibrated':
        bar = tqdm(total=len(blocks_of(mha)), desc='calibrating', unit='layer', disable=not progress)

        def step(fraction: float, what: str) -> None:
            bar.update(round(fraction * len(blocks_of(mha))) - bar.n)

        result = convert(copy.deepcopy(mha), variant, num_kv_heads, head_order=order, calibration=calibration,
                         init='calibrated', budget=budget, progress=step, parallel=parallel, **policy_options)
        bar.close()
        calibration_report = result.calibration_report.as_dict()
    report: Dict[str, Any] = dict(variant=variant, num_kv_heads=num_kv_heads, head_order=head_order, init=init,
                                  calibration_images=int(calibration.shape[0]), budget=vars(budget) if init ==
                                  'calibrated' else None, advise_seconds=round(advised_s, 1),
                                  seconds=round(time.perf_counter() - start, 1), calibration=calibration_report)
    if held_out is not None:
        report['held_out'] = dict(images=int(held_out.shape[0]),
                                  error_mean_pooled=layer_errors(mha, mean_pooled, held_out),
                                  error_result=layer_errors(mha, result, held_out))
    if evaluation is not None:
        images, labels = evaluation
        n = int(sum_over_processes(torch.tensor([len(labels)]))) if parallel else len(labels)
        report['top1'] = dict(n=n, mha=_top1(mha, images, labels, parallel),
                              mean_pooled=_top1(mean_pooled, images, labels, parallel),
                              result=_top1(result, images, labels, parallel))
    return result, report


def format_report(report: Dict[str, Any]) -> str:
    """The report as text: one line per layer (mean-pooled vs calibrated), then accuracy and time."""
    lines = [f"{report['variant'].upper()} G={report['num_kv_heads']} ({report['head_order']} head order, "
             f"{report['init']}), {report['calibration_images']} calibration images, {report['seconds']:.1f} s"
             + (f" (advisor {report['advise_seconds']:.1f} s)" if report['head_order'] != 'consecutive' else '')]
    cal = report.get('calibration')
    if cal:
        lines += ['', f"per layer, how far the tokens are from the MHA model's ({min(cal['images'], 32)} calibration "
                      f"images; {cal['steps_per_layer']} steps a layer):",
                  '  layer   mean-pooled   calibrated']
        top = max(cal['error_mean_pooled'], default=0.0) or 1.0  # 0 at G = H: nothing is shared
        lines += [f'  {i:5d}   {m:11.4f}   {c:10.4f}   ' + '#' * min(40, round(40 * m / top))
                  for i, (m, c) in enumerate(zip(cal['error_mean_pooled'], cal['error_calibrated']))]
    held = report.get('held_out')
    if held:
        lines += ['', f"the same on {held['images']} held-out test images:"]
        lines += [f'  {i:5d}   {m:11.4f}   {c:10.4f}'
                  for i, (m, c) in enumerate(zip(held['error_mean_pooled'], held['error_result']))]
    top1 = report.get('top1')
    if top1:
        lines += ['', f"test top-1 over {top1['n']:,} images: MHA {100 * top1['mha']:.2f} %, mean-pooled "
                      f"{100 * top1['mean_pooled']:.2f} %, {report['init']} {100 * top1['result']:.2f} %"]
    return '\n'.join(lines)


def _calibration_images(model: nn.Module, data: Optional[str], n: int, seed: int) -> tuple:
    preprocessing = model_preprocessing(model)
    if data is None:
        return calibration_images(preprocessing, min(n, 512)), SHIPPED
    splits = build_datasets(data, preprocessing, seed=seed)
    return splits.calibration(n, seed), f'{Path(data).name} (training split)'[:100]


def _count(low: int):
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f'must be an integer >= {low}, got {text}')
        return value
    return parse


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('source', help='a GQA Lens MHA folder or Hub repo, hf-hub:ORG/NAME or timm:NAME')
    parser.add_argument('--variant', choices=sorted(p for p in POLICIES if p != 'mha'), default='gqa')
    parser.add_argument('--kv-heads', type=_count(1), required=True, help='G, a divisor of the heads')
    parser.add_argument('--head-order', '--grouping', dest='head_order', choices=HEAD_ORDERS, default='consecutive',
                        help='which MHA heads share a KV head (--grouping: its deprecated spelling)')
    parser.add_argument('--init', choices=INITS, default='calibrated')
    parser.add_argument('--calibration', help='folder, .tar.gz or Hub dataset (default: the shipped 512 images)')
    parser.add_argument('--images', type=_count(2), default=512, help='calibration images')
    parser.add_argument('--steps', type=_count(0), default=CalibrationBudget().steps, help='optimisation steps a layer')
    parser.add_argument('--params', choices=CALIBRATED_PARAMS, default=CalibrationBudget().params)
    parser.add_argument('--max-flops', type=float, help='cap on the optimisation FLOPs of the whole conversion')
    parser.add_argument('--seed', type=_count(0), default=0)
    parser.add_argument('--eval', dest='eval_data', help='measure top-1 on this dataset\'s test split')
    parser.add_argument('--held-out', type=_count(0), default=0, help='also measure the layer errors on N test images')
    parser.add_argument('--limit', type=_count(1), help='at most this many evaluation images')
    parser.add_argument('--out', help='save the converted model here (with calibration.json / .html)')
    parser.add_argument('--json', help='also write the report here')
    parser.add_argument('--threads', type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = make_accelerator('cpu')  # one process, or one of accelerate launch's (gloo)
    try:
        model = load_source(args.source)
        calibration, data_name = _calibration_images(model, args.calibration, args.images, args.seed)
        evaluation = held_out = None
        if args.eval_data:
            splits = build_datasets(args.eval_data, model_preprocessing(model), seed=args.seed, limit=args.limit)
            test = splits.split('test' if splits.test is not None else 'val')
            evaluation = process_tensors(accelerator, test)  # this process's part
            if args.held_out:  # the split's first images, the same on every process
                held_out = torch.stack([test[i][0] for i in range(min(args.held_out, len(test)))])
        budget = CalibrationBudget(steps=args.steps, params=args.params, max_flops=args.max_flops, seed=args.seed)
        result, report = convert_and_report(model, args.variant, args.kv_heads, calibration, head_order=args.head_order,
                                            init=args.init, budget=budget, evaluation=evaluation, held_out=held_out,
                                            progress=accelerator.is_main_process, parallel=True)
    except (ValueError, ModelLoadError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None
    report['calibration_data'] = data_name
    report['processes'] = accelerator.num_processes
    if not accelerator.is_main_process:
        return
    print(format_report(report))
    if args.out:
        if result.gqa_conversion is not None:
            result.gqa_conversion['data'] = data_name
        metrics = {f'test_top1_{k}': round(v, 4) for k, v in report.get('top1', {}).items() if k != 'n'}
        folder = save_pretrained(result, args.out, metrics=metrics)
        (folder / 'calibration.json').write_text(json.dumps(report, indent=2))
        if report['calibration']:
            from .conversion_error import conversion_error_figure
            conversion_error_figure(report['calibration']).write_html(folder / 'calibration.html',
                                                                      include_plotlyjs='cdn')
        print(f'saved to {folder}')
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == '__main__':
    main()
