"""Training-step images/s (forward + backward + AdamW) of every variant next to timm's fused MHA.

    python bench/bench_train.py --device cpu --batch 32 --threads 2 --models vit_small_patch16_224
    python bench/bench_train.py --device cuda --batch 128 --amp bf16 --models vit_small_patch16_224 vit_base_patch16_224

Random weights and inputs; runs are interleaved round-robin, medians reported.

    python bench/bench_train.py --loop configs/family-mha-long.yaml --steps 120 --threads 2

``--loop CONFIG``: the project's own training loop on the config's real data and model, with today's settings
(every image decoded and augmented by PIL / torchvision each step) next to predecoded data (decoded once, crop +
flip batched) with and without ``torch.compile``: images/s over the same steps in interleaved chunks, and the
loss after those steps from the same initial weights, so speed is not bought with divergence.
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

LOOP_SETTINGS = {'per-image (today)': dict(predecode=False, compile=False),
                 'predecoded': dict(predecode=True, compile=False),
                 'predecoded + compile': dict(predecode=True, compile=True)}


def loop_main(args: argparse.Namespace) -> None:
    """Today's loop vs the faster settings, on the config's data and model (see the module docstring)."""
    from gqa_core.training.data import build_datasets
    from gqa_core.training.train import build_start_model, parse_args, seed_everything
    cfg = parse_args(['--config', args.loop])
    print(f'config={args.loop} batch={cfg.batch_size} steps={args.steps} threads={torch.get_num_threads()} '
          f'torch={torch.__version__}')
    runs = {}
    for label, setting in LOOP_SETTINGS.items():
        seed_everything(cfg.seed)
        model, preprocessing, _ = build_start_model(cfg)
        start = time.perf_counter()
        splits = build_datasets(cfg.data, preprocessing, augment=cfg.augment, seed=cfg.seed,
                                predecode=setting['predecode'])
        prepare_s = time.perf_counter() - start
        loader = torch.utils.data.DataLoader(splits.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                             generator=torch.Generator().manual_seed(cfg.seed),
                                             collate_fn=getattr(splits.train, 'collate', None))
        model.train()
        if setting['compile']:
            model.compile()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        runs[label] = dict(model=model, optimizer=optimizer, batches=iter(loader), seconds=0.0, losses=[],
                           prepare_s=prepare_s)

    def chunk(run: dict, n: int) -> None:
        start = time.perf_counter()
        for _ in range(n):
            images, targets = next(run['batches'])
            loss = F.cross_entropy(run['model'](images), targets, label_smoothing=cfg.label_smoothing)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(run['model'].parameters(), cfg.grad_clip)
            run['optimizer'].step()
            run['optimizer'].zero_grad(set_to_none=True)
            run['losses'].append(float(loss))
        run['seconds'] += time.perf_counter() - start

    for run in runs.values():
        chunk(run, 2)  # warm-up (and compilation) outside the timing
        run['seconds'], run['losses'] = 0.0, []
    per_chunk = max(1, args.steps // 6)
    for _ in range(0, args.steps, per_chunk):
        for run in runs.values():
            chunk(run, per_chunk)
    base = None
    print('| setting | data preparation s | train images/s | vs today | mean loss, last 20 steps |')
    print('|---|---:|---:|---:|---:|')
    for label, run in runs.items():
        rate = cfg.batch_size * len(run['losses']) / run['seconds']
        base = base or rate
        print(f"| {label} | {run['prepare_s']:.1f} | {rate:.1f} | {rate / base:.2f}x | "
              f"{statistics.mean(run['losses'][-20:]):.4f} |", flush=True)

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
    parser.add_argument('--loop', metavar='CONFIG', help='compare training-loop settings on this training config')
    parser.add_argument('--steps', type=int, default=120, help='--loop: timed steps per setting')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.loop:
        return loop_main(args)
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
