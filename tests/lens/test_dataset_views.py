"""The shipped dataset-level results are what their CLIs compute: the KV-budget explorer and the dataset view
of the embedded family on the full CIFAR-10 test split, re-run here (within 0.1 %)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from support import ROOT

SHIPPED = ROOT / 'assets' / 'analysis'
pytestmark = pytest.mark.slow  # each re-runs a CLI over the full 10,000-image test split


def run_cli(*args):
    proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_shipped_kv_budget_is_reproduced_by_its_cli(tmp_path, cifar10):
    shipped = json.loads((SHIPPED / 'kv-budget' / 'kv_budget.json').read_text())
    run_cli('gqa_core.kv_budget', 'assets/models/mha', '--data', str(cifar10), '--split', 'test',
            '--out', str(tmp_path))
    fresh = json.loads((tmp_path / 'kv_budget.json').read_text())
    assert fresh['n'] == shipped['n'] == 10_000
    key = lambda r: (r['num_kv_heads'], r['variant'], r['head_order'])  # noqa: E731
    rows = {key(r): r for r in fresh['rows']}
    assert set(rows) == {key(r) for r in shipped['rows']}
    for r in shipped['rows']:
        assert rows[key(r)]['kv_bytes'] == r['kv_bytes']
        assert rows[key(r)]['top1'] == pytest.approx(r['top1'], abs=1e-3), key(r)
        assert rows[key(r)]['agreement'] == pytest.approx(r['agreement'], abs=1e-3), key(r)
    assert (tmp_path / 'kv_budget.csv').is_file() and (tmp_path / 'kv_budget.html').stat().st_size > 100_000


def test_shipped_dataset_view_is_reproduced_by_its_cli(tmp_path, cifar10):
    shipped = json.loads((SHIPPED / 'dataset' / 'stats.json').read_text())
    models = [f'assets/models/{name}' for name in shipped['models']]
    run_cli('gqa_core.stats', *models, '--data', str(cifar10), '--split', 'test', '--out', str(tmp_path))
    fresh = json.loads((tmp_path / 'stats.json').read_text())
    assert fresh['n'] == 10_000 and list(fresh['models']) == list(shipped['models'])
    for name, s in shipped['models'].items():
        f = fresh['models'][name]
        assert f['top1'] == pytest.approx(s['top1'], abs=1e-3)
        for field in ('idle_rate', 'allocation_entropy', 'allocation_histogram'):
            assert np.allclose(f[field], s[field], atol=1e-3), (name, field)
    for a, row in shipped['agreement'].items():
        for b, value in row.items():
            assert fresh['agreement'][a][b] == pytest.approx(value, abs=1e-3)
    assert 'Plotly' in (tmp_path / 'stats.html').read_text()[:5_000_000]
