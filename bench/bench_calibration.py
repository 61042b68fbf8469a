"""Calibrated conversion against mean-pooling, training-free: the conversion table in docs/calibration.md.

    python bench/bench_calibration.py --threads 2              # the embedded family + the large-model rows
    python bench/bench_calibration.py --only embedded --limit 2000

For the embedded MHA over the full CIFAR-10 test split, with the 512 shipped calibration images
(``assets/calibration``): test top-1 of GQA at G = 4 and 2 (mean-pooled, advised head order, calibrated,
advised + calibrated) and of KDGQA, DGQA and PGQA at G = 4 (mean-pooled, calibrated, advised + calibrated),
each with the conversion's wall time on this machine (advising included, with the app's bound on its
model-output comparison); and GQA calibrated with only the K/V projections moving (``calibrated-kv``), to
show what letting the Q and output projections move too adds. Then, with random weights,
``vit_small_patch16_224`` (224 px) and ``vit_small_patch14_reg4_dinov2`` (518 px) converted to GQA at G = H / 2
at the app's live budget (``gqa_core.lens.models.LIVE_CALIBRATION``, as many shipped images as its token
budget allows): calibration time, steps a layer and peak RSS increase. One JSON line per row, then a
markdown table.
"""
from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))
from bench_scale import PeakRSS  # noqa: E402  (also sets the offline environment)

import torch  # noqa: E402

from gqa_core.core.calibrate import CalibrationBudget  # noqa: E402
from gqa_core.core.convert import convert  # noqa: E402
from gqa_core.io.hub import from_pretrained  # noqa: E402
from gqa_core.io.preprocessing import model_preprocessing  # noqa: E402
from gqa_core.lens.calibration import calibration_images  # noqa: E402
from gqa_core.lens.kv_budget import predictions, split_tensors  # noqa: E402
from gqa_core.lens.models import LIVE_CALIBRATION, REFINE_FLOPS, live_fit_size  # noqa: E402
from gqa_core.training.data import build_datasets  # noqa: E402

# (variant, G, head order, init)
EMBEDDED_ROWS = [('mha', 8, 'consecutive', 'mean')] + [
    (v, G, order, init)
    for v, G in (('gqa', 4), ('gqa', 2), ('kdgqa', 4), ('dgqa', 4), ('pgqa', 4))
    for order, init in (('consecutive', 'mean'), ('output-error', 'mean'), ('consecutive', 'calibrated'),
                        ('output-error', 'calibrated'))
    if v == 'gqa' or (order, init) != ('output-error', 'mean')
] + [('gqa', 4, 'consecutive', 'calibrated-kv'), ('gqa', 2, 'consecutive', 'calibrated-kv')]  # only K/V move
LARGE = {'vit_small_patch16_224': 'ViT-S/16, 224 px, 197 tokens',
         'vit_small_patch14_reg4_dinov2': 'DINOv2-S + 4 registers, 518 px, 1,374 tokens'}


def embedded_rows(data: str, limit, budget: CalibrationBudget):
    mha = from_pretrained(str(ROOT / 'assets' / 'models' / 'mha')).float().eval()
    images, labels = split_tensors(build_datasets(data, model_preprocessing(mha), seed=0, limit=limit), 'test')
    calibration = calibration_images(model_preprocessing(mha), 512)
    for variant, G, order, init in EMBEDDED_ROWS:
        model = copy.deepcopy(mha)
        start = time.perf_counter()
        if variant != 'mha':
            kv_only = init == 'calibrated-kv'
            convert(model, variant, G, head_order=order, calibration=calibration, max_refine_flops=REFINE_FLOPS,
                    init='calibrated' if kv_only else init, budget=replace(budget, params='kv') if kv_only else budget)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            top1 = float((predictions(model.eval(), images) == labels).float().mean())
        yield dict(model='embedded/mha', variant=variant, G=G, head_order=order, init=init, n=len(labels),
                   top1=round(100 * top1, 2), seconds=round(seconds, 1),
                   steps_per_layer=(model.calibration_report.steps_per_layer if init != 'mean' else None))


def large_rows(names=tuple(LARGE)):
    import timm
    for name in names:
        what = LARGE[name]
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        H = model.blocks[0].attn.num_heads
        n = live_fit_size(model)
        calibration = calibration_images(model_preprocessing(model), n)
        with PeakRSS() as peak:
            start = time.perf_counter()
            convert(model, 'gqa', H // 2, calibration=calibration, init='calibrated', budget=LIVE_CALIBRATION)
            seconds = time.perf_counter() - start
        report = model.calibration_report
        yield dict(model=name, what=what, variant='gqa', G=H // 2, init='calibrated', images=n,
                   steps_per_layer=report.steps_per_layer, seconds=round(seconds, 1),
                   peak_rss_mb=round(peak.increase_mb, 1),
                   error_mean_pooled=round(sum(report.error_mean_pooled) / len(report.error_mean_pooled), 4),
                   error_calibrated=round(sum(report.error_calibrated) / len(report.error_calibrated), 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'))
    parser.add_argument('--only', nargs='+', choices=['embedded', 'large'], default=['embedded', 'large'])
    parser.add_argument('--limit', type=int, help='fewer test images (a quick check)')
    parser.add_argument('--steps', type=int, default=CalibrationBudget().steps, help='steps a layer (embedded rows)')
    parser.add_argument('--threads', type=int)
    parser.add_argument('--large', choices=sorted(LARGE), help='measure only this large model, in this process')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.large:
        print(json.dumps(next(large_rows([args.large]))), flush=True)
        return
    print(f'threads={torch.get_num_threads()} live budget={LIVE_CALIBRATION} advisor refine FLOPs={REFINE_FLOPS:g}')
    rows = []
    if 'embedded' in args.only:
        for row in embedded_rows(args.data, args.limit, CalibrationBudget(steps=args.steps)):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if 'large' in args.only:  # each in a fresh process: its peak memory is its own, not the allocator's history
        import subprocess
        for name in LARGE:
            out = subprocess.run([sys.executable, __file__, '--large', name] + (
                ['--threads', str(args.threads)] if args.threads else []), capture_output=True, text=True, check=True)
            print(out.stdout.strip().splitlines()[-1], flush=True)
    if rows:
        print('\n| variant | G | head order | init | test top-1 % | conversion s |\n|---|---:|---|---|---:|---:|')
        for r in rows:
            print(f"| {r['variant'].upper()} | {r['G']} | {r['head_order']} | {r['init']} | {r['top1']:.2f} | "
                  f"{r['seconds']:.1f} |")


if __name__ == '__main__':
    main()
