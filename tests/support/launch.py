"""Running a command-line tool as one process or as N real data-parallel processes (``accelerate launch``, gloo).

``accelerate launch --cpu`` starts a single process whatever ``--num_processes`` says (accelerate 1.x), so N
CPU processes are launched as on N GPUs (``--multi_gpu``, which starts them with torch's elastic launcher)
with ``ACCELERATE_USE_CPU=1``: accelerate then sets up a gloo process group. Each run gets a free port, so
tests of several engineers on one machine do not meet on accelerate's default 29500.
"""
import os
import subprocess
import sys
from typing import Dict, List, Optional

from . import ROOT, free_port

TESTS = ROOT / 'tests'


def tool_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a launched tool: this checkout first on the path, offline, one thread per process
    (two processes on a shared two-core machine must not oversubscribe it)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get('PYTHONPATH', '')]),
               HF_HUB_OFFLINE=os.environ.get('HF_HUB_OFFLINE', '1'), HF_HUB_DISABLE_TELEMETRY='1',
               GRADIO_ANALYTICS_ENABLED='False', OMP_NUM_THREADS='1', TOKENIZERS_PARALLELISM='false')
    env.update(extra or {})
    return env


def run_tool(args: List[str], processes: int = 1, env: Optional[Dict[str, str]] = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (``args[0]`` is the module) in one plain process, or under ``accelerate launch``
    in ``processes`` gloo processes; fails the test with the tool's output if it exits non-zero."""
    if processes == 1:
        command = [sys.executable, '-m', *args]
    else:
        command = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes',
                   str(processes), '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                   '--main_process_port', str(free_port()), '-m', *args]
    env = tool_env({**(env or {}), 'ACCELERATE_USE_CPU': '1'})
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f'{" ".join(command)} exited {done.returncode}:\n{done.stdout[-3000:]}\n' \
                                 f'{done.stderr[-6000:]}'
    return done
