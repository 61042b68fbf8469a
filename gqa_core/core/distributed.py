"""Splitting a calibration pass between processes: each scores its part of the images, the sums are added up.

The library's own passes over calibration images (the head-order advisor's scoring) are sums over images, so
they parallelise without changing what they compute: every process takes a contiguous part of the same
images (:func:`process_part`) and the per-process sums are all-reduced (:func:`sum_over_processes`). Only
``torch.distributed`` is used (whoever started the processes -- ``accelerate launch``, ``torchrun`` -- set it
up); with no process group, or one process, both are identities, so one process computes what it always did.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ['process_rank', 'process_part', 'sum_over_processes', 'share_over_processes']


def process_rank() -> Tuple[int, int]:
    """``(rank, world_size)`` of this process in the default process group; ``(0, 1)`` without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def process_part(images: Tensor) -> Tensor:
    """This process's contiguous part of ``images`` (the parts of the ranks, in rank order, are ``images``)."""
    rank, world = process_rank()
    if world == 1:
        return images
    if images.shape[0] < world:
        raise ValueError(f'{images.shape[0]} calibration images cannot be split between {world} processes')
    return torch.tensor_split(images, world)[rank]


def sum_over_processes(values: Tensor) -> Tensor:
    """``values`` summed over the processes (a new tensor on ``values``' device; NCCL reduces on the GPU)."""
    rank, world = process_rank()
    if world == 1:
        return values
    import torch.distributed as dist
    device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else values.device
    total = values.detach().to(device, copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def share_over_processes(hits: Tensor, parallel: bool = True) -> float:
    """The fraction of true ``hits`` over every process's images (``parallel``; this process's alone otherwise):
    integer counts, added up exactly."""
    counts = torch.tensor([int(hits.sum()), hits.numel()], dtype=torch.long)
    hit, total = (sum_over_processes(counts) if parallel else counts).tolist()
    return hit / max(total, 1)
