"""Which device models run on: CUDA when the machine has it, else the CPU, unless the operator says otherwise
(``--device`` on the command line, ``GQA_LENS_DEVICE`` in the environment). Analyses stay in float32 on every
device, so a GPU gives the CPU's results within float error (checked on a GPU by ``bench/device_check.py``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ['resolve_device', 'model_device', 'full_fp32', 'DEVICE_ENV', 'DEVICE_CHOICES']

from .settings import Settings

DEVICE_ENV = Settings.variable('device')
DEVICE_CHOICES = 'auto, cpu, cuda or cuda:N'


def resolve_device(choice: Optional[str] = None) -> torch.device:
    """``choice`` (else ``GQA_LENS_DEVICE``, else ``auto``) as a device: ``auto`` is CUDA when there is one and
    the CPU otherwise. A CUDA device this machine does not have is a ValueError saying so, never a silent CPU."""
    text = str(choice or Settings.from_env().device or 'auto').strip().lower()
    if text == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f'device must be {DEVICE_CHOICES}, got {text[:40]!r}') from None
    if device.type not in ('cpu', 'cuda'):
        raise ValueError(f'device must be {DEVICE_CHOICES}, got {text[:40]!r}')
    if device.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f'device {text!r} was asked for, but this machine has no CUDA device')
        if device.index is not None and device.index >= count:
            raise ValueError(f'device {text!r} was asked for, but this machine has {count} CUDA device(s)')
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device('cpu'))


def full_fp32(device: torch.device) -> None:
    """On CUDA, matrix products and convolutions in true float32 (no TF32, which rounds inputs to 10 bits of
    mantissa): what an analysis shows must not depend on the device it ran on."""
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
