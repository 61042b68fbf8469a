"""One attention layer of ViT-S/16 (batch 8, 197 tokens, H = 6, G = 3), KDGQA's routing before and after,
side by side with timm's fused MHA layer and the uniform GQA layer, many short interleaved rounds.

    python bench/bench_kdgqa_layer.py --threads 2 --rounds 40
    python bench/bench_kdgqa_layer.py --threads 2 --rounds 40 --clock cpu   # CPU time: steadier on a busy machine

A whole-model comparison (bench_attention.py) cannot resolve a few per cent on a shared 2-core machine; one
layer, timed in many short rounds, can. ``KDGQA (original routing)`` runs the same layer with the original
key norms (``linalg.vector_norm``) and K/V routing (advanced indexing). Prints min / median / max ms per call
and the per-round ratio timm / variant (> 1: faster than timm's layer).
"""
from __future__ import annotations

import argparse
import statistics
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gqa_core, not an installed one
import torch
from timm.layers import Attention

from gqa_core.core import attention as attention_module
from gqa_core.core.attention import GroupedQueryAttention, route_kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=40)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help='cpu: this process\'s CPU time (all threads), which waiting for a busy machine does not add to')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timm_layer = Attention(384, num_heads=6, qkv_bias=True).eval()
    gqa = GroupedQueryAttention.from_attention(timm_layer, 'gqa', 3).eval()
    kdgqa = GroupedQueryAttention.from_attention(timm_layer, 'kdgqa', 3).eval()
    x = torch.randn(8, 197, 384)
    fast_norms, fast_route = attention_module.key_head_norms, attention_module._route_pair

    def original(*a):
        attention_module.key_head_norms = lambda k: torch.linalg.vector_norm(k.float(), dim=(-2, -1))
        attention_module._route_pair = lambda k, v, t: (route_kv(k, t), route_kv(v, t))
        try:
            return kdgqa(*a)
        finally:
            attention_module.key_head_norms, attention_module._route_pair = fast_norms, fast_route

    fns = {'timm fused MHA layer': timm_layer, 'GQA layer': gqa, 'KDGQA (original routing)': original,
           'KDGQA (row gather)': kdgqa}
    clock = time.perf_counter if args.clock == 'wall' else time.process_time
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(x)
        for _ in range(args.rounds):
            for key, fn in fns.items():
                start = clock()
                for _ in range(args.iters):
                    fn(x)
                times[key].append((clock() - start) / args.iters * 1e3)
    print(f'clock={args.clock} threads={torch.get_num_threads()} rounds={args.rounds} iters={args.iters} torch={torch.__version__}')
    print('| layer | ms per call: min / median / max | timm / this, per round: median (min - max) |')
    print('|---|---:|---:|')
    base = times['timm fused MHA layer']
    for key, samples in times.items():
        ratios = sorted(b / s for b, s in zip(base, samples))
        print(f'| {key} | {min(samples):.2f} / {statistics.median(samples):.2f} / {max(samples):.2f} | '
              f'{statistics.median(ratios):.3f}x ({ratios[0]:.3f} - {ratios[-1]:.3f}) |')


if __name__ == '__main__':
    main()
