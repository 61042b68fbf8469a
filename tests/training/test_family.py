"""The embedded family: real trained models (MHA and every variant), and the accuracies of docs/training.md's family
table reproduced by the eval CLI."""
import json
import re

import pytest

from gqa_core.training.evaluate import evaluate
from gqa_core.io.hub import from_pretrained

from support import ROOT

MODELS = ROOT / 'assets' / 'models'
# every shipped model, MHA first (consecutive-grouping variants, then any advised ones: `gqa-advised`, ...)
FAMILY = sorted((p.name for p in MODELS.iterdir() if (p / 'config.json').is_file()),
                key=lambda name: (name != 'mha', name.endswith('-advised'), name))


TRAINING_DOC = ROOT / 'docs' / 'training.md'  # holds the family table between its markers


def family_table():
    """The family table of docs/training.md: test top-1 (%) by shipped model name."""
    text = TRAINING_DOC.read_text()
    block = text.split('<!-- family-table:start -->')[1].split('<!-- family-table:end -->')[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0].strip('`')] = float(cells[1].rstrip(' %'))
    return rows


def test_the_family_ships_as_fp16_safetensors_within_budget():
    assert {'mha', 'gqa', 'kdgqa', 'dgqa-diff', 'dgqa-ema', 'pgqa'} <= set(FAMILY), FAMILY
    sizes = 0
    for name in FAMILY:
        folder = MODELS / name
        config = json.loads((folder / 'config.json').read_text())
        assert config['weights_dtype'] == 'float16' and (folder / 'README.md').is_file()
        assert config['grouping']['num_kv_heads'] == (8 if name == 'mha' else 4)
        sizes += sum(p.stat().st_size for p in folder.iterdir())
        from_pretrained(str(folder))  # strict load
    assert sizes <= 36_000_000, f'{sizes:,} bytes: over the 36 MB the family may take'


@pytest.mark.slow
@pytest.mark.parametrize('name', FAMILY)
def test_readme_accuracy_is_reproduced_by_the_eval_cli(name, cifar10):
    table = family_table()  # (the test keeps its name: tests/training/test_cifar10.py runs it by node id)
    assert set(table) == set(FAMILY)
    result = evaluate(str(MODELS / name), str(cifar10), 'test')
    assert result['n'] == 10_000
    assert abs(result['top1'] * 100 - table[name]) <= 0.1, (name, result['top1'], table[name])
