"""Run under ``accelerate launch``: makes the tools' accelerator and, at exit, writes whether the process group
was already gone when the interpreter reached its last exit handler (``OUT/rank{R}.txt``).

The handler is registered before :func:`~gqa_core.training.parallel.make_accelerator`, so it runs after the
handlers that call registers (exit handlers run last-in, first-out): what it sees is what the interpreter's
finalisation would meet.
"""
import atexit
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from gqa_core.training.parallel import gather_samples, make_accelerator

out = Path(sys.argv[1])
rank = {}


def report() -> None:
    (out / f'rank{rank["r"]}.txt').write_text('left' if not dist.is_initialized() else 'still in the group')


atexit.register(report)
accelerator = make_accelerator('cpu')
rank['r'] = accelerator.process_index
gather_samples(accelerator, {'x': torch.full((2,), float(rank['r']))})  # a collective, as every tool makes
