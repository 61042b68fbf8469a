"""Uptrain (or train) grouped-query variants and compare them: ``python -m gqa_core.train ...``.

The paper's protocol: start from an MHA checkpoint, convert (K/V heads mean-pooled), train, evaluate.
One command can run several variants with the same budget and writes one comparison table. Runs on CPU,
one GPU, or many through ``accelerate launch -m gqa_core.train ...``.

    python -m gqa_core.train --data ../shared/data/cifar10-jpeg.tar.gz --init-from assets/mha \
        --variants gqa kdgqa dgqa-diff dgqa-ema pgqa --epochs 1 --out runs/uptrain

Model selection uses the validation split carved from train; test is evaluated once, at the end, for the
model chosen on validation.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..core.calibrate import CalibrationBudget
from ..core.vit import blocks_of
from ..core.convert import INITS, convert, grouping_config, kv_cache_bytes
from ..core.head_order import HEAD_ORDERS, advise_head_order
from ..core.policies import POLICIES, start_epoch
from ..io.hub import ModelLoadError, create_model, from_pretrained, save_pretrained
from ..io.preprocessing import model_preprocessing
from .accuracy import Accuracy
from .data import build_datasets
from .parallel import make_accelerator

__all__ = ['TrainConfig', 'PRESETS', 'RECIPES', 'train_variant', 'run', 'main', 'evaluate_loader']

# Training recipes (what --variants names) -> (variant, its options).
RECIPES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    'mha': ('mha', {}), 'gqa': ('gqa', {}), 'kdgqa': ('kdgqa', {}),
    'dgqa-diff': ('dgqa', {'stat': 'diff'}), 'dgqa-ema': ('dgqa', {'stat': 'ema'}), 'pgqa': ('pgqa', {}),
}


@dataclass
class TrainConfig:
    data: str = ''
    dataset: Optional[str] = None  # what saved models say they were trained on (default: the data source's name)
    out: str = 'runs/train'
    variants: List[str] = field(default_factory=lambda: ['gqa'])
    num_kv_heads: Optional[int] = None  # default H / 2
    head_order: str = 'consecutive'  # which MHA heads share a KV head; 'output-error': the advisor's (core/head_order)
    calibration_images: int = 512  # training images the advisor scores head orders on (and calibration fits on)
    init: str = 'mean'  # the shared K/V heads: 'mean' (the paper's pooling) or 'calibrated' (gqa_core.core.calibrate)
    calibration_steps: int = 300  # with init 'calibrated': optimisation steps a layer after the closed form
    compat: str = 'paper'
    window: int = 300
    beta: float = 0.9
    noise_scale: float = 0.1
    # where the weights come from: a GQA Lens folder / repo, a timm name (+ pretrained), or random init
    init_from: Optional[str] = None
    timm_model: Optional[str] = None
    pretrained: bool = False
    init_safetensors: Optional[str] = None
    model_args: Dict[str, Any] = field(default_factory=dict)
    preprocessing: Optional[Dict[str, Any]] = None
    mean_std: Optional[float] = None  # normalise with this mean and std on every channel (the authors' 0.5)
    # optimisation
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: str = 'randaugment'
    mixup: float = 0.0  # Beta(alpha, alpha) of timm's Mixup (0: off); batches mixed on the device
    cutmix: float = 0.0  # Beta(alpha, alpha) of timm's CutMix (0: off); with both, each batch takes one at random
    grad_clip: Optional[float] = None
    seed: int = 42
    seeds: Optional[List[int]] = None  # run everything once per seed (out/seed{S}/...) and summarise mean ± std
    split_seed: Optional[int] = None  # the val split and calibration draw (default: seed); fixed across --seeds
    val_fraction: float = 0.1
    limit: Optional[int] = None
    max_steps: Optional[int] = None  # stop early (smoke tests)
    stop_after: Optional[int] = None  # run at most this many epochs now; --resume continues the same schedule
    workers: int = 2
    predecode: bool = False  # decode the training split once into memory; crop + flip run batched (crop-flip, none)
    compile: bool = False  # torch.compile the model for training
    mixed_precision: str = 'auto'  # auto: bf16 on GPU, none on CPU
    device: Optional[str] = None  # auto (CUDA when there is one), cpu, cuda; default GQA_LENS_DEVICE
    save_dtype: Optional[str] = None  # e.g. float16 for shipping
    resume: bool = False
    keep_checkpoints: bool = True  # False: a finished variant keeps only model/, metrics and summary.json
    bench_batch: int = 32


PRESETS: Dict[str, Dict[str, Any]] = {
    # The authors' uptraining recipe (method.md).
    'authors': dict(lr=1e-5, weight_decay=0.01, batch_size=32, epochs=5, augment='randaugment', seed=42,
                    mean_std=0.5),
    # Training a small ViT from scratch on 32 px CIFAR.
    'scratch-cifar': dict(lr=2e-3, weight_decay=0.05, batch_size=256, epochs=30, augment='crop-flip',
                          label_smoothing=0.1, warmup_epochs=1.0, grad_clip=1.0, seed=0),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # timm's Mixup draws from numpy
    torch.manual_seed(seed)


def build_start_model(cfg: TrainConfig) -> Tuple[nn.Module, Dict[str, Any], Optional[List[str]]]:
    """The multi-head starting point, its preprocessing (``cfg.preprocessing``, else the model's own, with
    ``cfg.mean_std`` applied to either) and its labels, if it has them."""
    if cfg.init_from:
        model = from_pretrained(cfg.init_from)
        variant = grouping_config(model)['variant']
        if variant != 'mha':
            raise ValueError(f'{cfg.init_from} is {variant}; uptraining starts from MHA')
        labels = model.pretrained_cfg.get('label_names')
    elif cfg.timm_model:
        model = create_model(cfg.timm_model, cfg.model_args, 'mha', pretrained=cfg.pretrained)
        if cfg.init_safetensors:
            from safetensors.torch import load_file
            model.load_state_dict(load_file(cfg.init_safetensors), strict=True)
        labels = None
    else:
        raise ValueError('give --init-from (a GQA Lens MHA model) or --timm-model')
    preprocessing = dict(cfg.preprocessing or model_preprocessing(model))
    if cfg.mean_std is not None:
        preprocessing.update(mean=[cfg.mean_std] * 3, std=[cfg.mean_std] * 3)
    return model, preprocessing, list(labels) if labels is not None else None


def start_head_order(start: nn.Module, splits: Any, cfg: TrainConfig) -> Any:
    """Which MHA heads every variant of the run pools together: ``"consecutive"``, or the head-order advisor's
    orders on ``cfg.calibration_images`` training images (one advice for all variants: they share G)."""
    if cfg.head_order == 'consecutive' or all(RECIPES.get(v, ('',))[0] == 'mha' for v in cfg.variants):
        return 'consecutive'  # nothing to pool
    G = cfg.num_kv_heads or blocks_of(start)[0].attn.num_heads // 2
    # every process advises on the same draw, each scoring its part of it (parallel: one process's advice)
    return advise_head_order(start, G, calibration_draw(splits, cfg), parallel=True).permutations


def calibration_draw(splits: Any, cfg: TrainConfig) -> torch.Tensor:
    """The run's ``cfg.calibration_images`` training images (one draw per split seed, shared by every variant
    and every training seed): what the advisor scores and calibration fits on."""
    return splits.calibration(cfg.calibration_images, cfg.seed if cfg.split_seed is None else cfg.split_seed)


def make_variant(start: nn.Module, name: str, cfg: TrainConfig, head_order: Any = 'consecutive',
                 calibration: Optional[torch.Tensor] = None) -> nn.Module:
    """A copy of ``start`` converted to the variant ``name``; the run's policy settings (``window``, ``beta``,
    ``noise_scale``, ...) go to the policies that declare them. With ``cfg.init == "calibrated"`` the shared K/V
    heads are calibrated on ``calibration`` (unlabeled training images) before training."""
    if name not in RECIPES:
        raise ValueError(f'unknown variant {name!r}; choose from {sorted(RECIPES)}')
    import copy
    policy, options = RECIPES[name]
    declared = POLICIES[policy].OPTIONS
    run_settings = dict(compat=cfg.compat, seed=cfg.seed, window=cfg.window, beta=cfg.beta,
                        noise_scale=cfg.noise_scale)
    options = {**{k: v for k, v in run_settings.items() if k in declared}, **options}
    heads = blocks_of(start)[0].attn.num_heads
    multi_head = policy == 'mha'
    G = None if multi_head else (cfg.num_kv_heads or heads // 2)
    model = copy.deepcopy(start)
    init = 'mean' if multi_head else cfg.init
    budget = CalibrationBudget(steps=cfg.calibration_steps, seed=cfg.seed) if init == 'calibrated' else None
    convert(model, policy, G, head_order='consecutive' if multi_head else head_order, calibration=calibration,
            init=init, budget=budget, parallel=True, **options)
    if model.gqa_conversion is not None:
        model.gqa_conversion['data'] = f'{dataset_name(cfg)} (training split)'[:100]
    return model


@torch.no_grad()
def evaluate_loader(model: nn.Module, loader: DataLoader, num_classes: int, accelerator: Any = None,
                    desc: str = 'eval') -> Dict[str, Any]:
    """top-1, top-5 and per-class accuracy over a loader."""
    model.eval()
    accuracy = Accuracy(num_classes)
    for images, labels in tqdm(loader, desc=desc, leave=False):
        logits = model(images)
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        accuracy.update(logits, labels)
    return accuracy.result()


@torch.no_grad()
def images_per_second(model: nn.Module, input_size: List[int], batch: int, device: torch.device,
                      repeats: int = 3) -> float:
    model.eval()
    x = torch.randn(batch, *input_size, device=device)
    model(x)
    best = math.inf
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.type == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return batch / best


def _append_metrics(out: Path, row: Dict[str, Any]) -> None:
    history_path = out / 'metrics.json'
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    history = [h for h in history if h['epoch'] != row['epoch']] + [row]
    history_path.write_text(json.dumps(history, indent=2))
    with open(out / 'metrics.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerows(history)


@dataclass
class _Run:
    """One variant's training: what is prepared once and what a checkpoint restores."""
    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: DataLoader
    val_loader: DataLoader
    loader_rng: torch.Generator
    total_steps: int
    out: Path
    mixer: Optional[Any] = None  # timm's Mixup / CutMix, when the config asks for either
    state: Dict[str, Any] = field(default_factory=lambda: dict(epoch=0, step=0, best_val=-1.0))

    @property
    def checkpoint(self) -> Path:
        return self.out / 'checkpoint'


def _prepare(name: str, model: nn.Module, splits: Any, cfg: TrainConfig) -> _Run:
    """Loaders, AdamW (no weight decay on biases, norms, embeddings and tokens), warmup + cosine schedule,
    all through accelerate (CPU, one GPU or data parallel)."""
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision)
    g = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(splits.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                              num_workers=cfg.workers, generator=g, persistent_workers=cfg.workers > 0,
                              collate_fn=getattr(splits.train, 'collate', None))
    val_loader = DataLoader(splits.val, batch_size=cfg.batch_size * 2, num_workers=cfg.workers)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim > 1 and 'pos_embed' not in n and 'token' not in n else no_decay).append(p)
    optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.weight_decay},
                                   {'params': no_decay, 'weight_decay': 0.0}], lr=cfg.lr)
    steps_per_epoch = len(train_loader)
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_epochs * steps_per_epoch)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if cfg.compile:
        model.compile()  # in place: parameter names and the saved state dict stay timm's
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)
    out = Path(cfg.out) / name
    out.mkdir(parents=True, exist_ok=True)
    mixer = None
    if cfg.mixup or cfg.cutmix:
        from timm.data import Mixup
        mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                      num_classes=accelerator.unwrap_model(model).num_classes)
    return _Run(accelerator, model, optimizer, scheduler, train_loader, val_loader, g, total, out, mixer)


def save_training_state(folder: Path, optimizer: Any, scheduler: Any, loader_rng: torch.Generator) -> None:
    """Optimiser moments, schedule and RNG states as ``training_state.safetensors`` (tensors) and
    ``training_state.json`` (the rest): a checkpoint that can travel (a commit, a Hub repo) and never needs
    unpickling to resume."""
    from safetensors.torch import save_file
    saved = optimizer.state_dict()
    tensors = {f'optimizer.{index}.{key}': value.detach().cpu().contiguous()
               for index, state in saved['state'].items() for key, value in state.items()}
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    tensors.update(rng=torch.get_rng_state(), loader_rng=loader_rng.get_state(),
                   numpy_rng=torch.from_numpy(keys.astype(np.int64)))
    save_file(tensors, folder / 'training_state.safetensors')
    (folder / 'training_state.json').write_text(json.dumps(dict(
        param_groups=saved['param_groups'], scheduler=scheduler.state_dict(),
        numpy_rng=dict(kind=kind, position=int(position), has_gauss=int(has_gauss), gauss=float(gauss)))))


def load_training_state(folder: Path, optimizer: Any, scheduler: Any, loader_rng: torch.Generator) -> None:
    """What :func:`save_training_state` wrote, back into ``optimizer``, ``scheduler`` and the RNGs."""
    from safetensors.torch import load_file
    tensors = load_file(folder / 'training_state.safetensors')
    meta = json.loads((folder / 'training_state.json').read_text())
    state: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith('optimizer.'):
            _, index, key = name.split('.', 2)
            state.setdefault(int(index), {})[key] = value
    groups = [dict(g, betas=tuple(g['betas'])) if 'betas' in g else g for g in meta['param_groups']]
    optimizer.load_state_dict(dict(state=state, param_groups=groups))
    scheduler.load_state_dict(meta['scheduler'])
    torch.set_rng_state(tensors['rng'])
    loader_rng.set_state(tensors['loader_rng'])
    if 'numpy_rng' in tensors:  # checkpoints written before numpy's state was kept have none
        n = meta['numpy_rng']
        np.random.set_state((n['kind'], tensors['numpy_rng'].numpy().astype(np.uint32), n['position'],
                             n['has_gauss'], n['gauss']))


def _resume(run: _Run, name: str) -> None:
    from safetensors.torch import load_file
    ckpt = run.checkpoint
    run.accelerator.unwrap_model(run.model).load_state_dict(load_file(ckpt / 'model.safetensors'), strict=True)
    load_training_state(ckpt, run.optimizer, run.scheduler, run.loader_rng)
    run.state = json.loads((ckpt / 'state.json').read_text())
    run.accelerator.print(f'[{name}] resumed at epoch {run.state["epoch"]}, step {run.state["step"]}')


def _train_epoch(run: _Run, name: str, epoch: int, cfg: TrainConfig) -> Dict[str, float]:
    """One pass over the training loader (or up to the step budget); the epoch's loss and accuracy."""
    model, accelerator = run.model, run.accelerator
    model.train()
    start_epoch(model)
    seen = hits = 0
    loss_sum = 0.0
    bar = tqdm(run.train_loader, desc=f'{name} epoch {epoch + 1}/{cfg.epochs}',
               disable=not accelerator.is_main_process)
    for images, targets in bar:
        if run.mixer is not None:  # soft targets (label smoothing inside); accuracy stays against the labels
            images, soft = run.mixer(images, targets)
        with accelerator.autocast():
            logits = model(images)
            if run.mixer is not None:
                loss = SoftTargetCrossEntropy()(logits.float(), soft)
            else:
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=cfg.label_smoothing)
        accelerator.backward(loss)
        if cfg.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.state['step'] += 1
        seen += len(targets)
        hits += int((logits.argmax(-1) == targets).sum())
        loss_sum += float(loss.detach()) * len(targets)
        bar.set_postfix(loss=f'{loss_sum / seen:.3f}', acc=f'{hits / seen:.3f}')
        if run.state['step'] >= run.total_steps:
            break
    return dict(train_loss=loss_sum / max(seen, 1), train_top1=hits / max(seen, 1))


def dataset_name(cfg: TrainConfig) -> str:
    """``cfg.dataset``, else the data source's name without its archive suffix (``cifar10``, ``food101``)."""
    name = Path(cfg.data).name
    for suffix in ('.tar.gz', '.tgz', '.tar'):
        name = name.removesuffix(suffix)
    return cfg.dataset or name


def _save_checkpoint(run: _Run, val_top1: float, epoch: int, preprocessing: Dict[str, Any],
                     labels: List[str], dataset: str) -> None:
    """The per-epoch checkpoint (weights, optimiser, schedule, RNGs) and the best-on-validation model."""
    from safetensors.torch import save_file
    unwrapped = run.accelerator.unwrap_model(run.model)
    ckpt = run.checkpoint
    ckpt.mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in unwrapped.state_dict().items()},
              ckpt / 'model.safetensors')
    save_training_state(ckpt, run.optimizer, run.scheduler, run.loader_rng)
    if val_top1 > run.state['best_val']:
        run.state['best_val'] = val_top1
        save_pretrained(unwrapped, run.out / 'best', labels=labels, preprocessing=preprocessing,
                        metrics=dict(val_top1=round(val_top1, 4), epoch=epoch + 1), dataset=dataset)
    (ckpt / 'state.json').write_text(json.dumps(run.state))


def _finish(run: _Run, name: str, splits: Any, preprocessing: Dict[str, Any], labels: List[str],
            cfg: TrainConfig) -> Dict[str, Any]:
    """Test the best-on-validation model once, measure it, and save it as the variant's model."""
    accelerator = run.accelerator
    best = from_pretrained(str(run.out / 'best')).to(accelerator.device).eval()
    summary = dict(variant=name, val_top1=run.state['best_val'])
    if splits.test is not None:
        test_loader = accelerator.prepare(DataLoader(splits.test, batch_size=cfg.batch_size * 2,
                                                     num_workers=cfg.workers))
        test = evaluate_loader(best, test_loader, len(labels), accelerator, desc='test')
        summary.update(test_top1=test['top1'], test_top5=test['top5'])
    summary.update(
        params=sum(p.numel() for p in best.parameters()),
        kv_cache_bytes=kv_cache_bytes(best),
        images_per_s=images_per_second(best, preprocessing['input_size'], cfg.bench_batch, accelerator.device),
        steps=run.state['step'],
        epochs=run.state['epoch'],
        complete=run.state['step'] >= run.total_steps,
    )
    if accelerator.is_main_process:
        metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items() if k != 'variant'}
        save_dtype = getattr(torch, cfg.save_dtype) if cfg.save_dtype else None
        save_pretrained(best.cpu(), run.out / 'model', labels=labels, preprocessing=preprocessing, metrics=metrics,
                        dtype=save_dtype, dataset=dataset_name(cfg))
        (run.out / 'summary.json').write_text(json.dumps(summary, indent=2))
        if summary['complete'] and not cfg.keep_checkpoints:
            shutil.rmtree(run.checkpoint)
            shutil.rmtree(run.out / 'best')
    return summary


def finished_summary(out: Path) -> Optional[Dict[str, Any]]:
    """The summary of a variant whose whole schedule ran and whose model was saved, else None: a resumed
    multi-variant (or multi-seed) :func:`run` skips what an earlier sitting finished instead of re-testing it."""
    path = out / 'summary.json'
    if not (path.is_file() and (out / 'model' / 'config.json').is_file()):
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get('complete') else None


def train_variant(name: str, start: nn.Module, splits: Any, preprocessing: Dict[str, Any], labels: List[str],
                  cfg: TrainConfig, head_order: Any = None) -> Dict[str, Any]:
    """Convert, train, keep the best-on-validation model, evaluate it on test. Returns its summary row.
    ``head_order``: from :func:`start_head_order` (computed here when None)."""
    seed_everything(cfg.seed)
    if head_order is None:
        head_order = start_head_order(start, splits, cfg)
    calibration = calibration_draw(splits, cfg) if cfg.init == 'calibrated' else None
    run = _prepare(name, make_variant(start, name, cfg, head_order, calibration), splits, cfg)
    if cfg.resume and (run.checkpoint / 'model.safetensors').exists():
        _resume(run, name)
    start_time = time.perf_counter()
    last_epoch = cfg.epochs if cfg.stop_after is None else min(cfg.epochs, run.state['epoch'] + cfg.stop_after)
    for epoch in range(run.state['epoch'], last_epoch):
        if run.state['step'] >= run.total_steps:
            break
        train = _train_epoch(run, name, epoch, cfg)
        val = evaluate_loader(run.model, run.val_loader, len(labels), run.accelerator, desc='val')
        run.state['epoch'] = epoch + 1
        row = dict(epoch=epoch + 1, step=run.state['step'], **train, val_top1=val['top1'], val_top5=val['top5'],
                   lr=run.scheduler.get_last_lr()[0], seconds=time.perf_counter() - start_time)
        if run.accelerator.is_main_process:
            _append_metrics(run.out, row)
            _save_checkpoint(run, val['top1'], epoch, preprocessing, labels, dataset_name(cfg))
        run.accelerator.print(f'[{name}] epoch {epoch + 1}: ' + ', '.join(
            f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))
    run.accelerator.wait_for_everyone()
    return _finish(run, name, splits, preprocessing, labels, cfg)


def comparison_table(rows: List[Dict[str, Any]]) -> str:
    lines = ['| variant | val top-1 | test top-1 | test top-5 | params | KV cache / image (fp16) | images/s |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        lines.append(f"| {r['variant']} | {r['val_top1'] * 100:.2f} % | {r.get('test_top1', float('nan')) * 100:.2f} % "
                     f"| {r.get('test_top5', float('nan')) * 100:.2f} % | {r['params']:,} | "
                     f"{r['kv_cache_bytes']:,} B | {r['images_per_s']:.0f} |")
    return '\n'.join(lines) + '\n'


def run_seeds(cfg: TrainConfig) -> List[Dict[str, Any]]:
    """The same runs once per seed of ``cfg.seeds`` (each in ``out/seed{S}``, resumable like any run), with the
    validation split and the advisor's calibration draw fixed by ``split_seed`` (default: ``seed``) so only
    training randomness varies; writes ``out/comparison_seeds.json`` and a mean ± std table."""
    from dataclasses import replace
    from .seeds import SEEDS_FILE, seed_table, summarise
    rows = []
    for seed in cfg.seeds:
        sub = replace(cfg, seed=seed, seeds=None, split_seed=cfg.split_seed if cfg.split_seed is not None else cfg.seed,
                      out=str(Path(cfg.out) / f'seed{seed}'))
        rows += [dict(row, seed=seed) for row in run(sub)]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = summarise(rows)
    (out / SEEDS_FILE).write_text(json.dumps(dict(head_order=cfg.head_order, seeds=list(cfg.seeds), rows=rows,
                                                  summary=summaries), indent=2))
    (out / 'comparison_seeds.md').write_text(seed_table(summaries, []))
    return rows


def run(cfg: TrainConfig) -> List[Dict[str, Any]]:
    if cfg.seeds:
        return run_seeds(cfg)
    out = Path(cfg.out)
    # with --resume, variants an earlier sitting (or a parallel process) finished are not trained or tested again
    finished = [finished_summary(out / name) if cfg.resume else None for name in cfg.variants]
    if all(finished):  # an earlier sitting (or a parallel process) ran everything: only the tables are written
        rows = finished
    else:
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        seed_everything(cfg.seed)
        start, preprocessing, labels = build_start_model(cfg)
        splits = build_datasets(cfg.data, preprocessing, augment=cfg.augment, val_fraction=cfg.val_fraction,
                                seed=split_seed, limit=cfg.limit, predecode=cfg.predecode)
        labels = labels or splits.classes
        if start.num_classes != len(labels):
            start.reset_classifier(len(labels))
        head_order = start_head_order(start, splits, cfg)
        rows = [done or train_variant(name, start, splits, preprocessing, labels, cfg, head_order)
                for name, done in zip(cfg.variants, finished)]
    (out / 'comparison.md').write_text(comparison_table(rows))
    (out / 'comparison.json').write_text(json.dumps(rows, indent=2))
    with open(out / 'comparison.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    print(comparison_table(rows))
    return rows


def parse_args(argv: Optional[List[str]] = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='YAML file with TrainConfig fields (flags override it)')
    parser.add_argument('--preset', choices=sorted(PRESETS), help='named recipe (flags and --config override it)')
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = '--' + f.name.replace('_', '-')
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == 'variants':
            parser.add_argument(flag, nargs='+', default=None, choices=sorted(RECIPES))
        elif f.name == 'init':
            parser.add_argument(flag, choices=INITS, default=None)
        elif f.name == 'head_order':
            parser.add_argument(flag, '--grouping', dest='head_order', choices=HEAD_ORDERS, default=None,
                                help='which MHA heads share a KV head (--grouping: its deprecated spelling)')
        elif f.name == 'seeds':
            parser.add_argument(flag, nargs='+', type=int, default=None)
        elif f.name in ('model_args', 'preprocessing'):
            parser.add_argument(flag, type=json.loads, default=None, help='JSON object')
        else:
            kind = {'num_kv_heads': int, 'grad_clip': float, 'limit': int, 'max_steps': int, 'stop_after': int,
                    'mean_std': float, 'split_seed': int}.get(
                f.name, type(value) if value is not None else str)
            parser.add_argument(flag, type=kind, default=None)
    args = parser.parse_args(argv)
    merged: Dict[str, Any] = {}
    if args.preset:
        merged.update(PRESETS[args.preset])
    if args.config:
        merged.update(yaml.safe_load(Path(args.config).read_text()) or {})
    if 'grouping' in merged:  # a config written before 0.3
        print('warning: the config key "grouping" is deprecated; call it "head_order"', file=sys.stderr)
        merged['head_order'] = merged.pop('grouping')
    merged.update({k: v for k, v in vars(args).items() if v is not None and k not in ('config', 'preset')})
    unknown = set(merged) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise SystemExit(f'unknown config keys: {sorted(unknown)}')
    cfg = TrainConfig(**merged)
    if not cfg.data:
        raise SystemExit('--data is required (a folder, a .tar.gz archive or a Hub dataset name)')
    return cfg


def main(argv: Optional[List[str]] = None) -> None:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except (ValueError, ModelLoadError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
    main()
