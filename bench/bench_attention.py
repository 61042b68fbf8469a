"""Inference images/s of every variant next to timm's own fused multi-head attention, plus recording cost.

    python bench/bench_attention.py --device cpu --dtype fp32 --batch 8 --threads 2 --models vit_small_patch16_224
    python bench/bench_attention.py --device cuda --dtype bf16 --batch 256 --models vit_small_patch16_224 \
        vit_base_patch16_224 vit_large_patch16_224

On CUDA with Triton, KDGQA runs twice: through index + SDPA (K/V copied to H heads) and through the routed
kernel (:mod:`gqa_core.core.kernels`), which reads K/V through the per-image table.

All models use random weights (speed does not depend on them). Runs are interleaved round-robin and the
median per model is reported with the median, min and max of the per-round ratio to timm (each
round times every model once, back to back), so slow drift of a shared machine hits every row alike.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict, List

import timm
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gqa_core, not an installed one
import torch

from gqa_core import convert, record
from gqa_core.core.kernels import triton, use_triton

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
VARIANTS = [('GQA', 'gqa', {}), ('KDGQA', 'kdgqa', {}), ('DGQA-diff', 'dgqa', {'stat': 'diff'}),
            ('DGQA-EMA', 'dgqa', {'stat': 'ema'}), ('PGQA', 'pgqa', {})]


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def bench_backbone(name: str, args: argparse.Namespace) -> List[Dict[str, object]]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    base = timm.create_model(name).eval()
    heads = base.blocks[0].attn.num_heads
    G = args.num_kv_heads or heads // 2
    models = {'timm fused MHA': base}
    for label, variant, options in VARIANTS:
        models[f'{label} (G={G})'] = convert(copy.deepcopy(base), variant, G, **options).eval()
    models = {k: m.to(device, dtype) for k, m in models.items()}
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=device, dtype=dtype)
    recorded = models[f'KDGQA (G={G})']

    def run_recorded() -> None:
        use_triton(False)
        with record(recorded, attention='prefix'):
            recorded(x)

    def through(enabled: bool, model: torch.nn.Module) -> Callable[[], object]:
        def call() -> object:
            use_triton(enabled)
            return model(x)
        return call

    # per-image routing: K/V copied to H heads + SDPA (the fallback), and, where Triton runs, the routed kernel
    fns = {k: through(False, m) for k, m in models.items()}
    if device.type == 'cuda' and triton is not None:
        fns[f'KDGQA (G={G}), routed kernel'] = through(True, recorded)
    fns['KDGQA + recording class-token maps'] = run_recorded
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            time_once(fn, device, args.warmup)
        for _ in range(args.repeats):
            for key, fn in fns.items():
                times[key].append(time_once(fn, device, args.iters))
    base = times['timm fused MHA']
    rows = []
    for key, samples in times.items():
        rate = args.batch * args.iters / statistics.median(samples)
        # per round: timm's time / this model's time in the same round (interleaved, so drift cancels)
        ratios = sorted(b / s for b, s in zip(base, samples))
        rows.append(dict(backbone=name, model=key, images_per_s=rate, vs_timm=statistics.median(ratios),
                         vs_timm_min=ratios[0], vs_timm_max=ratios[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit_small_patch16_224'])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--num-kv-heads', type=int, default=None, help='G; default H/2')
    parser.add_argument('--iters', type=int, default=3, help='forwards per timed run')
    parser.add_argument('--repeats', type=int, default=5, help='timed runs per model, interleaved')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f'device={args.device} dtype={args.dtype} batch={args.batch} threads={torch.get_num_threads()} '
          f'torch={torch.__version__} timm={timm.__version__}')
    print('| backbone | model | images/s (median) | vs timm fused MHA: median (min - max) of rounds |')
    print('|---|---|---:|---:|')
    for name in args.models:
        for row in bench_backbone(name, args):
            print(f"| {row['backbone']} | {row['model']} | {row['images_per_s']:.1f} | {row['vs_timm']:.3f}x "
                  f"({row['vs_timm_min']:.3f} - {row['vs_timm_max']:.3f}) |", flush=True)


if __name__ == '__main__':
    main()
