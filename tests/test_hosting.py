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
    assert torch.get_num_threads() == settings.threads == cpu_cores()
    assert app.lens.demo._queue.max_size == settings.queue_size > 0
