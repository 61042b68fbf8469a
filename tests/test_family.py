"""The embedded family: six real trained models, and the README's accuracies reproduced by the eval CLI."""
import json
import re

import pytest

from gqa_core.training.evaluate import evaluate
from gqa_core.io.hub import from_pretrained

from conftest import ROOT

FAMILY = ['mha', 'gqa', 'kdgqa', 'dgqa-diff', 'dgqa-ema', 'pgqa']
MODELS = ROOT / 'assets' / 'models'


def readme_table():
    text = (ROOT / 'README.md').read_text()
    block = text.split('<!-- family-table:start -->')[1].split('<!-- family-table:end -->')[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0].strip('`')] = float(cells[1].rstrip(' %'))
    return rows


def test_six_models_ship_as_fp16_safetensors_within_budget():
    sizes = 0
    for name in FAMILY:
        folder = MODELS / name
        config = json.loads((folder / 'config.json').read_text())
        assert config['weights_dtype'] == 'float16' and (folder / 'README.md').is_file()
        assert config['grouping']['num_kv_heads'] == (8 if name == 'mha' else 4)
        sizes += sum(p.stat().st_size for p in folder.iterdir())
        from_pretrained(str(folder))  # strict load
    assert sizes <= 40 * 2**20


@pytest.mark.parametrize('name', FAMILY)
def test_readme_accuracy_is_reproduced_by_the_eval_cli(name, cifar10):
    table = readme_table()
    assert set(table) == set(FAMILY)
    result = evaluate(str(MODELS / name), str(cifar10), 'test')
    assert result['n'] == 10_000
    assert abs(result['top1'] * 100 - table[name]) <= 0.1, (name, result['top1'], table[name])
