""""Which heads matter" (head ablation + faithfulness) at a large token count: time, peak memory, progress.

    python bench/bench_deep.py                      # DINOv2-reg ViT-S/14 at 518 px (1,374 tokens), all 12 blocks
    python bench/bench_deep.py --depth 2            # the same width and tokens, 2 blocks: a quick measurement

In a fresh process: the model (random weights, converted to KDGQA at G = H / 2) is built and runs once, the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``), then the app's deep forwards run (ablation of
every KV head and query head in both modes, deletion / insertion curves of two maps), printing their progress.
Prints the seconds, the peak RSS increase (VmHWM minus the RSS before), and the work in block forwards (one
block on one image), which is what the time scales with.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gqa_core, not an installed one

from proc_memory import reset_peak, status_kb  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_small_patch14_reg4_dinov2')
    parser.add_argument('--depth', type=int, default=None, help='blocks (default: the model\'s)')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    import gc
    import timm
    import torch
    from gqa_core import convert
    from gqa_core.core.vit import num_tokens
    from gqa_core.lens.gpu import run_forwards
    from gqa_core.lens.heads import CURVE_STEPS
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    extra = {} if args.depth is None else {'depth': args.depth}
    model = timm.create_model(args.model, **extra).eval()
    H = model.blocks[0].attn.num_heads
    model = convert(model, 'kdgqa', H // 2).eval()
    L, G, T = len(model.blocks), H // 2, num_tokens(model)
    x = torch.randn(1, 3, *model.patch_embed.img_size)
    with torch.inference_mode():
        start = time.perf_counter()
        model(x)
        forward_s = time.perf_counter() - start
    last = [0.0]

    def progress(fraction: float, what: str) -> None:
        if fraction - last[0] >= 0.05 or fraction >= 1:
            last[0] = fraction
            print(f'  {fraction:6.1%}  {time.perf_counter() - start:7.1f} s  {what}', file=sys.stderr, flush=True)

    gc.collect()
    reset_peak()
    before = status_kb('VmRSS')
    start = time.perf_counter()
    out = run_forwards(model, x, True, [f'class {i}' for i in range(1000)], progress=progress)
    seconds = time.perf_counter() - start
    peak = (status_kb('VmHWM') - before) / 1024
    P = model.patch_embed.num_patches
    points = len({round(i * P / min(CURVE_STEPS, P)) for i in range(min(CURVE_STEPS, P) + 1)})
    ablation_blocks = sum(L - layer for layer in range(L)) * (G + H) * 2 + L
    faithfulness_blocks = (2 * 2 * points + 1) * L
    print(json.dumps(dict(
        model=args.model, depth=L, tokens=T, heads=H, kv_heads=G, threads=torch.get_num_threads(),
        deep_s=round(seconds, 1), peak_rss_increase_mb=round(peak, 1), plain_forward_s=round(forward_s, 2),
        ablation_block_forwards=ablation_blocks, faithfulness_block_forwards=faithfulness_blocks,
        ablation_block_forwards_before=(L * (G + H) * 2 + 1) * L,
        kv_drop_zero_layer0=[round(float(v), 5) for v in out.ablation.kv['zero'][0]])))


if __name__ == '__main__':
    main()
