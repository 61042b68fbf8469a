"""``evaluate`` over the CIFAR-10 test split in one process and in N data-parallel processes: wall time, and
that both counted the same images with the same result.

    python bench/bench_parallel.py                       # the embedded KDGQA model, 1 and 2 processes
    python bench/bench_parallel.py --processes 1 2 4 --model assets/models/mha

Each run is the command a user types -- ``python -m gqa_core.evaluate`` for one process, ``accelerate launch
--multi_gpu --num_processes N`` with ``ACCELERATE_USE_CPU=1`` for N gloo processes on the CPU (``--cpu`` starts
one process whatever ``--num_processes`` says) -- timed from start to exit, model loading and process start
included. The CPU threads are split fairly: ``--threads`` in all (default: the machine's cores) shared by the
processes (``OMP_NUM_THREADS``). Prints one markdown row per run, in the order run (``--processes 2 1`` runs
two processes first: on a busy machine, run both orders).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def timed_evaluate(model: str, data: str, processes: int, threads: int, batch_size: int,
                   out: Path) -> Dict[str, Any]:
    """Run ``evaluate`` in ``processes`` processes; its ``--json`` result with ``wall_s`` added."""
    args = ['-m', 'gqa_core.evaluate', model, '--data', data, '--batch-size', str(batch_size), '--device', 'cpu',
            '--json', str(out)]
    if processes == 1:
        command = [sys.executable, *args]
    else:
        command = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes',
                   str(processes), '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                   '--main_process_port', str(free_port()), *args]
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS=str(max(1, threads // processes)),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), HF_HUB_OFFLINE='1')
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    result = json.loads(out.read_text())
    result['wall_s'] = time.perf_counter() - start
    return result


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=str(ROOT / 'assets' / 'models' / 'kdgqa'))
    parser.add_argument('--data', default=str(ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'))
    parser.add_argument('--processes', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--batch-size', type=int, default=256)
    args = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            runs.append(timed_evaluate(args.model, args.data, processes, args.threads, args.batch_size,
                                       Path(tmp) / f'{processes}.json'))
            first = runs[0]
            assert (runs[-1]['n'], runs[-1]['top1'], runs[-1]['mean_allocation']) == \
                (first['n'], first['top1'], first['mean_allocation']), 'every run counts the same'
    one = next((r['wall_s'] for r in runs if r['processes'] == 1), None)
    print('| processes | threads each | images | top-1 | wall time (s) | speed-up over 1 process |\n'
          '|---:|---:|---:|---:|---:|---:|')
    for r in runs:
        speedup = f"{one / r['wall_s']:.2f}x" if one else 'n/a'
        print(f"| {r['processes']} | {max(1, args.threads // r['processes'])} | {r['n']} | {r['top1'] * 100:.2f} % "
              f"| {r['wall_s']:.1f} | {speedup} |")

if __name__ == '__main__':
    main()
