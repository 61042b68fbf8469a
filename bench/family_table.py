"""The embedded family's comparison table, measured on the shipped files with the evaluation CLI's code.

    python bench/family_table.py --data ../shared/data/cifar10-jpeg.tar.gz --threads 2

Test top-1 / top-5 on the full CIFAR-10 test split (``gqa_core.evaluate.evaluate``), parameters, K/V cache
bytes per image and CPU inference images/s (batch 64, median of interleaved runs).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from gqa_core.training.evaluate import evaluate
from gqa_core import kv_cache_bytes
from gqa_core.io.hub import from_pretrained
from gqa_core.io.preprocessing import model_preprocessing

ROOT = Path(__file__).resolve().parents[1]
FAMILY_ORDER = ['mha', 'gqa', 'kdgqa', 'dgqa-diff', 'dgqa-ema', 'pgqa', 'gqa-advised', 'kdgqa-advised']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'))
    parser.add_argument('--models', default=str(ROOT / 'assets' / 'models'))
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    family = [name for name in FAMILY_ORDER if (Path(args.models) / name / 'config.json').is_file()]
    rows, speed = {}, {name: [] for name in family}
    models = {name: from_pretrained(str(Path(args.models) / name)).eval() for name in family}
    for name in family:
        rows[name] = evaluate(str(Path(args.models) / name), args.data, 'test')
    x = torch.randn(args.batch, *model_preprocessing(models['mha'])['input_size'])
    with torch.inference_mode():
        for model in models.values():
            model(x)
        for _ in range(args.repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                speed[name].append(args.batch / (time.perf_counter() - start))
    print(f'threads={torch.get_num_threads()} batch={args.batch}')
    print('| model | test top-1 | test top-5 | params | K/V cache / image (fp16) | CPU images/s |')
    print('|---|---:|---:|---:|---:|---:|')
    for name in family:
        model = models[name]
        params = sum(p.numel() for p in model.parameters())
        print(f"| `{name}` | {rows[name]['top1'] * 100:.2f} % | {rows[name]['top5'] * 100:.2f} % | "
              f"{params:,} | {kv_cache_bytes(model):,} B | {statistics.median(speed[name]):.0f} |")


if __name__ == '__main__':
    main()
