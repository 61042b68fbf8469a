"""What the ZeroGPU path costs besides the forwards: making an analysis's job (model config + weights as data),
pickling it across the process boundary and rebuilding the model on the other side, per analysis.

    python bench/bench_zerogpu_job.py --specs embedded/kdgqa convert:embedded/mha:gqa:4 --repeat 20

Prints min / median / max seconds per step over ``--repeat`` analyses of one image, runs interleaved.
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import time
from typing import Dict, List

import torch

from gqa_core.lens import gpu
from gqa_core.lens.models import ModelRegistry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--specs', nargs='+', default=['embedded/kdgqa', 'convert:embedded/mha:gqa:4'])
    parser.add_argument('--repeat', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    registry = ModelRegistry()
    loaded = {spec: registry.get(spec) for spec in args.specs}
    times: Dict[str, Dict[str, List[float]]] = {s: {'job': [], 'pickle': [], 'rebuild': []} for s in args.specs}
    for _ in range(args.repeat):
        for spec, one in loaded.items():
            size = one.preprocessing['input_size']
            x = torch.zeros(1, *size)
            t0 = time.perf_counter()
            job = gpu.ForwardJob.of(one.config, one.model, x, False, one.labels)
            t1 = time.perf_counter()
            job = pickle.loads(pickle.dumps(job))
            t2 = time.perf_counter()
            gpu.job_model(job)
            t3 = time.perf_counter()
            for step, seconds in zip(('job', 'pickle', 'rebuild'), (t1 - t0, t2 - t1, t3 - t2)):
                times[spec][step].append(seconds)
    print(f'{"spec":32s} {"step":8s} {"min ms":>8s} {"median":>8s} {"max":>8s}')
    for spec, steps in times.items():
        for step, values in steps.items():
            print(f'{spec:32s} {step:8s} {min(values) * 1e3:8.1f} {statistics.median(values) * 1e3:8.1f} '
                  f'{max(values) * 1e3:8.1f}')


if __name__ == '__main__':
    main()
