"""How long the head-order advisor takes on random-weight ViTs, and whether it beats consecutive pooling.

    python bench/bench_head_order.py --threads 2 --images 8

For each model: seconds for ``advise_head_order`` at G = H/2 on N random images at 224 px, the search used per
layer, and the advised / consecutive output-error ratio per layer (≤ 1 everywhere by construction).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit_base_patch16_224', 'vit_large_patch16_224'])
    parser.add_argument('--images', type=int, default=8)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    import timm
    import torch
    from gqa_core.core.head_order import advise_head_order
    torch.set_num_threads(args.threads)
    for name in args.models:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        H = model.blocks[0].attn.num_heads
        x = torch.randn(args.images, 3, 224, 224)
        start = time.perf_counter()
        advice = advise_head_order(model, H // 2, x, batch=args.images)
        seconds = time.perf_counter() - start
        ratios = [a / c for a, c in zip(advice.error_advised, advice.error_consecutive)]
        print(f'{name}: H={H} G={H // 2} {args.images} images, {seconds:.1f} s, search {sorted(set(advice.search))}, '
              f'advised/consecutive error per layer min {min(ratios):.3f} mean {sum(ratios) / len(ratios):.3f} '
              f'max {max(ratios):.3f}')


if __name__ == '__main__':
    main()
