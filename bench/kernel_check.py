"""The routed-attention Triton kernel against index + SDPA: correctness and time, per dtype, head dim and length.

    python bench/kernel_check.py                     # on a CUDA machine (issue 18): fp16/bf16, d 64/16, T 65/197/257
    TRITON_INTERPRET=1 python bench/kernel_check.py --smoke   # the same code path in Triton's CPU interpreter

Per-image routing tables (B, H) drawn at random, one sample with every query on KV head 0 (the others idle).
Errors are max |. - fp32 reference| for the kernel and for index + SDPA in the same dtype, side by side, so the
kernel is judged against what the fallback already loses to rounding. Times are ``triton.testing.do_bench``
medians (ms). Prints one JSON line per case, then a Markdown table.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from gqa_core.core.attention import route_kv
from gqa_core.core.kernels import routed_attention

DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16, 'fp32': torch.float32}


def index_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, scale: float) -> torch.Tensor:
    """The fallback: K/V copied to H heads, then one fused SDPA call."""
    return F.scaled_dot_product_attention(q, route_kv(k, table), route_kv(v, table), scale=scale)


def check(B: int, H: int, G: int, T: int, d: int, dtype: torch.dtype, device: torch.device,
          time_it: bool) -> dict:
    g = torch.Generator(device='cpu').manual_seed(0)
    q, k, v = (torch.randn(B, n, T, d, generator=g).to(device) for n in (H, G, G))
    table = torch.randint(0, G, (B, H), generator=g).to(device)
    table[0] = 0
    scale = d ** -0.5
    reference = index_sdpa(q, k, v, table, scale)  # fp32
    qc, kc, vc = (t.to(dtype) for t in (q, k, v))
    kernel = routed_attention(qc, kc, vc, table, scale)
    fallback = index_sdpa(qc, kc, vc, table, scale)
    row = dict(B=B, H=H, G=G, T=T, d=d, dtype=str(dtype).removeprefix('torch.'),
               kernel_err=float((kernel.float() - reference).abs().max()),
               sdpa_err=float((fallback.float() - reference).abs().max()))
    if time_it:
        from triton.testing import do_bench
        row['kernel_ms'] = do_bench(lambda: routed_attention(qc, kc, vc, table, scale))
        row['sdpa_ms'] = do_bench(lambda: index_sdpa(qc, kc, vc, table, scale))
        row['speedup'] = row['sdpa_ms'] / row['kernel_ms']
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=256)
    parser.add_argument('--smoke', action='store_true', help='tiny cases, fp32, no timing (interpreter / CPU)')
    args = parser.parse_args()
    if args.smoke:
        device, dtypes, batch, lengths, time_it = torch.device('cpu'), ['fp32'], 2, [17, 65], False
    else:
        if not torch.cuda.is_available():
            raise SystemExit('no CUDA device here: use --smoke with TRITON_INTERPRET=1')
        device, dtypes, batch, lengths, time_it = torch.device('cuda'), ['fp16', 'bf16'], args.batch, [65, 197, 257], True
    rows = []
    for dtype in dtypes:
        for H, d in ((12, 64), (8, 16)):  # ViT-B's heads, and the embedded family's
            for T in lengths:
                row = check(batch, H, H // 2, T, d, DTYPES[dtype], device, time_it)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print('| dtype | H / G | d | T | max err kernel | max err index + SDPA | kernel ms | index + SDPA ms | speed-up |')
    print('|---|---|---:|---:|---:|---:|---:|---:|---:|')
    for r in rows:
        times = (f"{r['kernel_ms']:.3f} | {r['sdpa_ms']:.3f} | {r['speedup']:.2f}x" if 'kernel_ms' in r
                 else 'n/a | n/a | n/a')
        print(f"| {r['dtype']} | {r['H']} / {r['G']} | {r['d']} | {r['T']} | {r['kernel_err']:.2e} | "
              f"{r['sdpa_err']:.2e} | {times} |")


if __name__ == '__main__':
    main()
