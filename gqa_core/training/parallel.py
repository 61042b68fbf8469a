"""Data-parallel dataset passes: every process reads its part of a split, all of them get every sample's
result once.

Under ``accelerate launch --num_processes N`` (gloo on CPUs, NCCL on GPUs; one process without it) the
command-line tools (evaluate, stats, kv_budget, convert) share one :class:`~accelerate.Accelerator`, made as
the trainer makes its own (:func:`make_accelerator`). A map-style split goes through accelerate's sharded
loader, whose last batch is padded so every process runs the same number of batches; ``gather_for_metrics``
drops those padded samples again, so no image is counted twice. A streamed split is already divided between
the processes (``split_dataset_by_node``, no padding): its per-sample results are gathered once, at the end.
Either way the figures computed from the gathered samples (counts, sums) are the one-process figures.
"""
from __future__ import annotations

import atexit
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..core.device import resolve_device

__all__ = ['make_accelerator', 'leave_process_group', 'gathered_batches', 'node_of', 'gather_samples']

BatchStep = Callable[[Tensor, Tensor], Dict[str, Tensor]]  # (images, labels) -> per-sample tensors (first dim B)


def make_accelerator(device: Optional[str] = None, mixed_precision: Optional[str] = None) -> Any:
    """The run's :class:`~accelerate.Accelerator`: on ``device`` (see :func:`~gqa_core.core.device.resolve_device`),
    ``mixed_precision`` ``auto`` meaning bf16 on a GPU and none on the CPU; ``None`` (the evaluation tools, which
    never autocast) leaves it as accelerate has it, so they can follow a bf16 training run in one process. One process, or one of the processes
    ``accelerate launch`` started (it reads their rank and world size from the environment). The trainer's
    model is wrapped in DDP without buffer broadcasts (see below)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    on_cpu = resolve_device(device).type == 'cpu'
    if mixed_precision == 'auto':  # the trainer's default
        mixed_precision = 'no' if on_cpu else 'bf16'
    # A ViT's only changing buffers are DGQA's: every process computes them itself from statistics all-reduced
    # over the processes (DGQAPolicy), so DDP's per-forward broadcast of rank 0's buffers is not needed -- and
    # would hide a process that computed something else (tests/training/test_dgqa_ranks.py).
    keep_own_buffers = DistributedDataParallelKwargs(broadcast_buffers=False)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=on_cpu, kwargs_handlers=[keep_own_buffers])
    if accelerator.num_processes > 1 and dist.is_initialized() and dist.get_backend() == 'gloo':
        atexit.unregister(leave_process_group)  # registered once, however many runs this process makes
        atexit.register(leave_process_group)
    return accelerator


def leave_process_group() -> None:
    """Destroy the default process group, if there is one, while the interpreter is still whole.

    A gloo process that exits without it can abort in interpreter finalisation ("terminate called without an
    active exception", SIGABRT; pytorch/pytorch#190489): a worker thread's pending work still holds tensors
    when Python is torn down. Every tool's non-main processes return as soon as their last collective is done,
    so each leaves the group here, at exit, whatever path it took. Registered for gloo only: with NCCL a
    process whose peer died could hang in it at exit."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def node_of(accelerator: Any) -> Tuple[int, int]:
    """``(rank, world_size)`` of this process: which part of a streamed split it reads."""
    return accelerator.process_index, accelerator.num_processes


def gather_samples(accelerator: Any, local: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Every process's per-sample tensors, concatenated in rank order on every process (no padding is added:
    processes may hold different numbers of samples, none at all too). A collective: every process calls it."""
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object
    parts = gather_object([{k: v.cpu() for k, v in local.items()}])
    names = dict.fromkeys(k for part in parts for k in part)  # a process with no samples returned none
    return {k: torch.cat([part[k] for part in parts if k in part]) for k in names}


def gathered_batches(accelerator: Any, dataset: Dataset, step: BatchStep, batch_size: int = 256,
                     workers: int = 0, desc: str = '') -> Iterator[Dict[str, Tensor]]:
    """Run ``step`` on this process's batches of ``dataset`` and yield what every process's ``step`` returned,
    each sample once (on every process, on the CPU). A map-style dataset is sharded by accelerate's loader
    (one gathered batch per step); a :class:`~torch.utils.data.IterableDataset` must already be this process's
    part (:class:`~gqa_core.training.data.StreamedImages`) and is gathered in one piece at the end."""
    streamed = isinstance(dataset, IterableDataset)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    if not streamed:
        loader = accelerator.prepare_data_loader(loader)
    kept: Dict[str, list] = {}
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_main_process):
        out = step(images.to(accelerator.device), labels.to(accelerator.device))
        if streamed:
            for k, v in out.items():
                kept.setdefault(k, []).append(v.cpu())
        else:
            yield {k: v.cpu() for k, v in accelerator.gather_for_metrics(out).items()}
    if streamed:  # every process takes part in the gather, one whose part was empty too
        merged = gather_samples(accelerator, {k: torch.cat(v) for k, v in kept.items()})
        if merged:
            yield merged
