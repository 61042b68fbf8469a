"""How many CPU cores this server really has, so torch's threads and the request queue fit the machine it
runs on (a Hugging Face Space says ``CPU_CORES``; a container's cgroup quota may be far below ``os.cpu_count()``,
and oversubscribed threads make every request slower)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

__all__ = ['cpu_cores', 'fit_torch_threads']


def _cgroup_quota(root: Path = Path('/sys/fs/cgroup')) -> Optional[float]:
    """CPUs the cgroup allows (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), None when unlimited or unknown."""
    try:
        quota, period = (root / 'cpu.max').read_text().split()[:2]
        return None if quota == 'max' else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / 'cpu' / 'cpu.cfs_quota_us').read_text())
        period = int((root / 'cpu' / 'cpu.cfs_period_us').read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def cpu_cores(environ: Optional[dict] = None, cgroup_root: Path = Path('/sys/fs/cgroup')) -> int:
    """``CPU_CORES`` when set (Spaces), else the cgroup quota, else the CPUs this process may run on."""
    env = os.environ if environ is None else environ
    try:
        declared = int(float(env.get('CPU_CORES', '')))
        if declared >= 1:
            return declared
    except ValueError:
        pass
    available = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup_root)
    return max(1, min(available, math.ceil(quota))) if quota else max(1, available)


def fit_torch_threads(cores: int) -> int:
    """Give torch one intra-op thread per core (never more) and return that count."""
    import torch
    threads = max(1, min(cores, torch.get_num_threads()))
    torch.set_num_threads(threads)
    return threads
