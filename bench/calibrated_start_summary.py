"""Issue 25, item 4: join the calibrated-start study's seeds and judge each calibrated arm against the mean-pooled
arm of the same G (Welch's t-test on the three seeds' test top-1, as every seed study here).

    python bench/calibrated_start_summary.py      # after bash bench/calibrated_start.sh

Arms: G = 4 calibrated (checkpoints/calibrated-start/g4-calibrated) against G = 4 mean-pooled (the seed study's
own runs, checkpoints/uptrain-seeds: same config, data and seeds); G = 2 calibrated against G = 2 mean-pooled
(both under checkpoints/calibrated-start). Writes study.json and study.md there.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gqa_core.training.seeds import seed_table, summarise, verdict  # noqa: E402

STUDY = ROOT / 'checkpoints' / 'calibrated-start'
ARMS = {'G=4 calibrated': STUDY / 'g4-calibrated', 'G=4 mean-pooled': ROOT / 'checkpoints' / 'uptrain-seeds',
        'G=2 calibrated': STUDY / 'g2-calibrated', 'G=2 mean-pooled': STUDY / 'g2-mean'}
PAIRS = (('G=4 calibrated', 'G=4 mean-pooled'), ('G=2 calibrated', 'G=2 mean-pooled'))
VARIANTS = ('gqa', 'kdgqa')


def arm_rows(folder: Path) -> list:
    """Every finished seed's rows of ``folder`` (``seed{S}/comparison.json``), each with its seed."""
    rows = []
    for seed_dir in sorted(folder.glob('seed*')):
        if not (seed_dir / 'comparison.json').is_file():  # a seed still running
            continue
        for row in json.loads((seed_dir / 'comparison.json').read_text()):
            if row['variant'] in VARIANTS and row.get('complete', True):
                rows.append(dict(row, seed=int(seed_dir.name.removeprefix('seed'))))
    return rows


def main() -> None:
    summaries = {arm: summarise(arm_rows(folder), f' ({arm})') for arm, folder in ARMS.items()}
    verdicts = []
    for arm, reference in PAIRS:
        for s in summaries[arm]:
            ref = next(r for r in summaries[reference] if r['variant'] == s['variant'])
            verdicts.append(verdict(s, ref))
    runs = [s for arm in ARMS for s in summaries[arm]]
    (STUDY / 'study.json').write_text(json.dumps(dict(runs=runs, verdicts=verdicts), indent=2) + '\n')
    table = seed_table(runs, verdicts)
    (STUDY / 'study.md').write_text(table)
    print(table)


if __name__ == '__main__':
    main()
