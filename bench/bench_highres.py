"""Extra peak memory of one app analysis at high resolution: Sapiens2's geometry at 1024 x 768 (3,072 tokens).

    GQA_LENS_MAX_TOKENS=4096 python bench/bench_highres.py            # depth 2, Sapiens2-base width

A depth-reduced, random-weight ``vit_base_patch16_sapiens2`` (width 768, 12 heads, patch 16, 1024 x 768) is
converted to KDGQA (G = H / 2); when this checkout's conversion refuses it (native-GQA ``AttentionRope``
layers), a timm ViT-B/16 with the same width, heads and token count stands in, and the line says so. In a
fresh process: the model is built, one plain forward runs, the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) before each step: two plain forwards, then twice the app's forwards of an analysis
(recorded forward, prefix rows, three rollouts, kept q/k). ``extra_peak_mb`` is the second analysis's peak RSS
(VmHWM) minus the RSS before it; ``first_analysis_peak_mb`` the first's (lazy set-up included); the plain
forward's own peak growth is printed beside them for scale. Repeats give min / median / max.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gqa_core, not an installed one

from proc_memory import reset_peak, status_kb  # noqa: E402


def build(depth: int):
    import timm
    from gqa_core import convert
    try:
        # Sapiens2-base keeps full multi-head attention in its first and last 8 blocks, i.e. in all 12: a
        # depth-reduced one is all MHA (num_kv_heads=12: its per-block tuple would need one entry per block)
        model = timm.create_model('vit_base_patch16_sapiens2', pretrained=False, depth=depth, num_kv_heads=12,
                                  img_size=(1024, 768)).eval()
        H = model.blocks[0].attn.num_heads
        return convert(model, 'kdgqa', H // 2).eval(), 'vit_base_patch16_sapiens2'
    except Exception as error:  # noqa: BLE001 -- report what stood in, and why
        model = timm.create_model('vit_base_patch16_224', pretrained=False, depth=depth, img_size=(1024, 768)).eval()
        H = model.blocks[0].attn.num_heads
        why = f'{type(error).__name__}: {str(error)[:120]}'
        return convert(model, 'kdgqa', H // 2).eval(), f'vit_base_patch16_224 (sapiens2 refused: {why})'


def measure(depth: int, threads: int) -> dict:
    import gc
    import torch
    from gqa_core.core.settings import Settings
    from gqa_core.core.vit import num_tokens
    from gqa_core.lens.gpu import run_forwards
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, name = build(depth)
    tokens = num_tokens(model)
    budget = Settings.from_env().max_tokens
    if tokens > budget:
        raise SystemExit(f'{tokens} tokens exceed GQA_LENS_MAX_TOKENS={budget}: set it to admit the model')
    x = torch.randn(1, 3, 1024, 768)
    def peak_of(fn) -> tuple:
        gc.collect()
        reset_peak()
        before = status_kb('VmRSS')
        start = time.perf_counter()
        out = fn()
        return out, (status_kb('VmHWM') - before) / 1024, time.perf_counter() - start

    with torch.inference_mode():
        _, first_plain, _ = peak_of(lambda: model(x))  # lazy kernel and library set-up included
        _, plain, _ = peak_of(lambda: model(x))
        _, first, _ = peak_of(lambda: run_forwards(model, x, False, []))
        out, extra, seconds = peak_of(lambda: run_forwards(model, x, False, []))
    assert out.recording.rollout['mean'].shape[-1] == tokens
    return dict(model=name, depth=depth, tokens=tokens, width=model.embed_dim,
                heads=model.blocks[0].attn.num_heads, first_plain_forward_peak_mb=round(first_plain, 1),
                plain_forward_peak_mb=round(plain, 1), first_analysis_peak_mb=round(first, 1),
                extra_peak_mb=round(extra, 1), analysis_s=round(seconds, 2), threads=threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depth', type=int, default=2)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3, help='fresh processes')
    parser.add_argument('--in-process', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.in_process:
        print(json.dumps(measure(args.depth, args.threads)), flush=True)
        return
    rows = []
    for _ in range(args.repeats):  # a fresh process each: no allocator pool from the run before
        done = subprocess.run([sys.executable, __file__, '--in-process', '--depth', str(args.depth),
                               '--threads', str(args.threads)], check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    for key in ('extra_peak_mb', 'first_analysis_peak_mb', 'plain_forward_peak_mb', 'analysis_s'):
        values = [r[key] for r in rows]
        print(f'{key}: min {min(values)} median {statistics.median(values)} max {max(values)}')


if __name__ == '__main__':
    main()
