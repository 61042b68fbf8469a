"""The server fits the machine it runs on: cores from CPU_CORES (Spaces) or the cgroup quota."""
import os

from gqa_core.lens.hosting import cpu_cores


def test_cores_from_spaces_env_then_cgroup_quota(tmp_path):
    available = len(os.sched_getaffinity(0))
    assert cpu_cores({'CPU_CORES': '3'}, tmp_path) == 3
    (tmp_path / 'cpu.max').write_text('max 100000\n')
    assert cpu_cores({}, tmp_path) == available, 'no quota: the CPUs this process may use'
    (tmp_path / 'cpu.max').write_text('150000 100000\n')
    assert cpu_cores({}, tmp_path) == min(available, 2), 'a 1.5-CPU quota rounds up'
    (tmp_path / 'cpu.max').unlink()
    (tmp_path / 'cpu').mkdir()
    (tmp_path / 'cpu' / 'cpu.cfs_quota_us').write_text('100000')
    (tmp_path / 'cpu' / 'cpu.cfs_period_us').write_text('100000')
    assert cpu_cores({'CPU_CORES': 'lots'}, tmp_path) == 1, 'cgroup v1, and a malformed CPU_CORES ignored'


def test_the_app_fits_torch_threads_and_bounds_its_queue(app_server):
    import torch
    app = app_server[1]
    settings = app.lens.settings
    assert torch.get_num_threads() == cpu_cores()
    assert app.lens.demo._queue.max_size == settings.queue_limit == 32 * settings.concurrency > 0


def test_importing_the_app_starts_no_thread_writes_no_file_and_loads_no_model(tmp_path):
    """``import app`` (and building an app) only defines things: the side effects wait for ``start``/``main``."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    probe = f'''
import os, sys, tempfile, threading
tempfile.tempdir = {str(tmp_path)!r}
import torch
threads = torch.get_num_threads()
torch.set_num_threads(threads + 3)
before = set(threading.enumerate())
sys.path.insert(0, {str(root)!r})
import app
assert not set(threading.enumerate()) - before and os.listdir({str(tmp_path)!r}) == [], 'import: nothing at all'
assert app._served is None, 'nothing served'
lens = app.create_app()
started = [t.name for t in set(threading.enumerate()) - before]
assert not started, started
made = os.listdir({str(tmp_path)!r})
assert made in ([], ['gradio']), ('building the Blocks makes only gradio its own cache folder', made)
assert torch.get_num_threads() == threads + 3, 'torch threads untouched'
assert not lens.registry._cache, 'no model loaded'
assert lens.reaper is None and lens.files.count() == 0
lens.start()
assert lens.reaper is not None and torch.get_num_threads() <= threads + 3
print('ok')
'''
    env = dict(os.environ, HF_HUB_OFFLINE='1', GRADIO_ANALYTICS_ENABLED='False')
    out = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-2000:]
