"""Training-step images/s (forward + backward + AdamW) of every variant next to timm's fused MHA.

    python bench/bench_train.py --device cpu --batch 32 --threads 2 --models vit_small_patch16_224
    python bench/bench_train.py --device cuda --batch 128 --amp bf16 --models vit_small_patch16_224 vit_base_patch16_224

Random weights and inputs; runs are interleaved round-robin, medians reported.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Dict, List

import timm
import torch
import torch.nn.functional as F

from gqa_core import convert

VARIANTS = [('GQA', 'gqa', {}), ('KDGQA', 'kdgqa', {}), ('DGQA-diff', 'dgqa', {'stat': 'diff'}),
            ('DGQA-EMA', 'dgqa', {'stat': 'ema'}), ('PGQA', 'pgqa', {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['vit_small_patch16_224'])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--amp', choices=['none', 'bf16', 'fp16'], default='none')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--num-kv-heads', type=int, default=None)
    parser.add_argument('--iters', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)
    print(f'device={args.device} amp={args.amp} batch={args.batch} threads={torch.get_num_threads()} '
          f'torch={torch.__version__} timm={timm.__version__}')
    print('| backbone | model | train images/s | vs timm fused MHA |')
    print('|---|---|---:|---:|')
    for name in args.models:
        torch.manual_seed(0)
        base = timm.create_model(name)
        G = args.num_kv_heads or base.blocks[0].attn.num_heads // 2
        models = {'timm fused MHA': base}
        for label, variant, options in VARIANTS:
            models[f'{label} (G={G})'] = convert(copy.deepcopy(base), variant, G, **options)
        x = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=device)
        y = torch.randint(0, base.num_classes, (args.batch,), device=device)
        steps = {}
        for key, model in models.items():
            model = model.to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, optimizer=optimizer) -> None:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = F.cross_entropy(model(x).float(), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step()
            steps[key] = step
        times: Dict[str, List[float]] = {k: [] for k in steps}
        for _ in range(args.repeats):
            for key, step in steps.items():
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(args.iters):
                    step()
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                times[key].append(time.perf_counter() - start)
        base_rate = args.batch * args.iters / statistics.median(times['timm fused MHA'])
        for key, samples in times.items():
            rate = args.batch * args.iters / statistics.median(samples)
            print(f'| {name} | {key} | {rate:.1f} | {rate / base_rate:.2f}x |', flush=True)


if __name__ == '__main__':
    main()
