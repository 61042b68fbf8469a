"""The seed study that ships with the app (``assets/analysis/seeds``): every uptrained run with three seeds, its
verdicts recomputed from the seeds' values, docs/training.md's table the same file, and each shipped variant the seed-0
run of its row."""
import json

import pytest

from gqa_core.training.seeds import seed_table, summarise, verdict
from gqa_core.training.train import RECIPES

from support import ROOT
from test_family import FAMILY, MODELS, TRAINING_DOC, family_table

SEEDS = ROOT / 'assets' / 'analysis' / 'seeds'
RUNS = ['gqa', 'kdgqa', 'dgqa-diff', 'dgqa-ema', 'pgqa', 'gqa (output-error)', 'kdgqa (output-error)']


@pytest.fixture(scope='module')
def study():
    return json.loads((SEEDS / 'seeds.json').read_text())


def _label(folder_name: str) -> str:
    """A shipped folder's row in the study: ``kdgqa-advised`` is ``kdgqa (output-error)``."""
    return folder_name.replace('-advised', ' (output-error)')


def test_every_run_has_three_seeds(study):
    assert [run['label'] for run in study['runs']] == RUNS
    for run in study['runs']:
        assert run['n'] == 3 and sorted(run['seeds']) == [0, 1, 2], run['label']
        assert len(run['test_top1']) == len(run['val_top1']) == 3, run['label']


def test_means_and_verdicts_follow_from_the_seeds_values(study):
    by_label = {run['label']: run for run in study['runs']}
    for run in study['runs']:  # the summary recomputed from its own per-seed values
        rows = [dict(variant=run['variant'], seed=seed, val_top1=v, test_top1=t)
                for seed, v, t in zip(run['seeds'], run['val_top1'], run['test_top1'])]
        again = summarise(rows, run['label'].removeprefix(run['variant']))[0]
        for key in ('test_top1_mean', 'test_top1_std', 'val_top1_mean', 'val_top1_std'):
            assert again[key] == pytest.approx(run[key], abs=1e-12), (run['label'], key)
    judged = {v['variant'] for v in study['verdicts']}
    assert judged == set(RUNS) - {'gqa', 'gqa (output-error)'}
    for stored in study['verdicts']:
        assert stored['reference'] in ('gqa', 'gqa (output-error)')
        again = verdict(by_label[stored['variant']], by_label[stored['reference']])
        assert again['says'] == stored['says'] and again['beyond_noise'] == stored['beyond_noise']


def test_training_doc_seed_table_is_the_shipped_one(study):
    text = TRAINING_DOC.read_text()
    block = text.split('<!-- seed-table:start -->')[1].split('<!-- seed-table:end -->')[0]
    assert block.strip() == (SEEDS / 'seeds.md').read_text().strip()
    assert (SEEDS / 'seeds.md').read_text() == seed_table(study['runs'], study['verdicts'])


@pytest.mark.parametrize('name', [name for name in FAMILY if name != 'mha'])
def test_each_shipped_variant_is_seed_0_of_its_row(name, study):
    run = next(r for r in study['runs'] if r['label'] == _label(name))
    config = json.loads((MODELS / name / 'config.json').read_text())
    policy, options = RECIPES[run['variant']]  # dgqa-diff is the dgqa policy with stat 'diff'
    assert config['grouping']['variant'] == policy
    assert all(config['grouping'][k] == v for k, v in options.items()), config['grouping']
    # the advised runs pooled the advisor's head groups (recorded per layer); the others consecutive heads
    assert (config['source_heads'] is not None) == name.endswith('-advised'), config['source_heads']
    assert config['grouping']['seed'] == 0, config['grouping']  # the run's seed, recorded with its grouping
    seed0 = run['test_top1'][run['seeds'].index(0)]
    assert abs(seed0 * 100 - family_table()[name]) <= 0.1, (name, seed0, family_table()[name])
