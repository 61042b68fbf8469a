"""Several training seeds of the same runs, summarised: mean ± std per variant and whether a variant differs
from a reference (GQA) beyond seed noise.

"Beyond noise" is Welch's t-test (``scipy.stats.ttest_ind``, unequal variances, two-sided) on the seeds' values:
a variant beats (or trails) the reference when ``p < 0.05``. With three seeds a side the test has 2 to 4
degrees of freedom, so a difference must reach 2.8 to 4.3 standard errors to count; it is said so wherever it is
printed.

    python -m gqa_core.training.seeds runs/uptrain runs/uptrain-advised --reference gqa --out runs/seeds
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ['summarise', 'verdict', 'mean_std', 'seed_rows', 'seed_table', 'SEEDS_FILE', 'main']

SEEDS_FILE = 'comparison_seeds.json'
METRICS = ('val_top1', 'test_top1')


def summarise(rows: Sequence[Dict[str, Any]], label: str = '') -> List[Dict[str, Any]]:
    """Rows of several seeds (each with ``variant``, ``seed`` and the metrics) -> one row per variant with
    ``n``, the seeds, and mean / std (sample, n - 1) of every metric."""
    by_variant: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row['variant'], []).append(row)
    out = []
    for variant, runs in by_variant.items():
        summary: Dict[str, Any] = dict(variant=variant, label=f'{variant}{label}', n=len(runs),
                                       seeds=[r['seed'] for r in runs])
        for metric in METRICS:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            if values:
                summary[metric] = values
                summary[f'{metric}_mean'] = statistics.fmean(values)
                summary[f'{metric}_std'] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(summary)
    return out


def verdict(a: Dict[str, Any], b: Dict[str, Any], metric: str = 'test_top1', alpha: float = 0.05) -> Dict[str, Any]:
    """``a`` against ``b`` on ``metric``: the difference of the means, its standard error, Welch's two-sided
    p-value and whether it is beyond seed noise (``p < alpha``). Runs that agree to the last digit (a variant
    that made the reference's decisions) have p = 1."""
    from scipy.stats import ttest_ind
    difference = a[f'{metric}_mean'] - b[f'{metric}_mean']
    error = math.sqrt(a[f'{metric}_std'] ** 2 / a['n'] + b[f'{metric}_std'] ** 2 / b['n'])
    if error > 0:
        with warnings.catch_warnings():  # scipy warns when one side's seeds agree exactly; the test still holds
            warnings.simplefilter('ignore', RuntimeWarning)
            p = float(ttest_ind(a[metric], b[metric], equal_var=False).pvalue)
    else:  # no spread on either side: any difference is exact
        p = 1.0 if difference == 0 else 0.0
    beyond = p < alpha
    word = ('better than' if difference > 0 else 'worse than') if beyond else 'within noise of'
    return dict(variant=a['label'], reference=b['label'], metric=metric, difference=difference, standard_error=error,
                p_value=p, beyond_noise=beyond,
                says=f'{a["label"]} is {word} {b["label"]} ({difference * 100:+.2f} points, Welch p = {p:.3f})')


def mean_std(summary: Dict[str, Any], metric: str, unit: str = '') -> str:
    """``80.17 ± 0.29`` (percent points, then ``unit``) for one summarised run's metric; ``n/a`` without it."""
    if f'{metric}_mean' not in summary:
        return 'n/a'
    return f"{summary[f'{metric}_mean'] * 100:.2f} ± {summary[f'{metric}_std'] * 100:.2f}{unit}"


def seed_rows(summaries: Sequence[Dict[str, Any]], verdicts: Sequence[Dict[str, Any]], unit: str = '',
              reference: str = '—') -> List[List[Any]]:
    """One row per run: label, seeds, val and test top-1 as mean ± std, and its verdict (``reference`` for the
    runs the others were judged against). The CLI's markdown table and the app's table are both these rows."""
    said = {v['variant']: v['says'] for v in verdicts}
    return [[s['label'], s['n'], *(mean_std(s, m, unit) for m in METRICS), said.get(s['label'], reference)]
            for s in summaries]


def seed_table(summaries: Sequence[Dict[str, Any]], verdicts: Sequence[Dict[str, Any]]) -> str:
    lines = ['| run | seeds | val top-1 (mean ± std) | test top-1 (mean ± std) | vs reference |', '|---|---:|---:|---:|---|']
    lines += ['| ' + ' | '.join(map(str, row)) + ' |' for row in seed_rows(summaries, verdicts, ' %')]
    return '\n'.join(lines) + ('\n\n"Beyond noise": Welch\'s t-test on the seeds\' values, two-sided, p < 0.05 '
                                '(with three seeds a side, 2.8 to 4.3 standard errors of the difference).\n')


def _label(folder: Path) -> str:
    """A run folder's head order, as a suffix of its rows' labels (``gqa (output-error)``)."""
    data = json.loads((folder / SEEDS_FILE).read_text())
    order = data.get('head_order', data.get('grouping', 'consecutive'))  # 'grouping': files written before 0.3
    return '' if order == 'consecutive' else f' ({order})'


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('runs', nargs='+', help=f'run folders written with --seeds (each holds {SEEDS_FILE})')
    parser.add_argument('--reference', default='gqa', help='the variant every other is judged against')
    parser.add_argument('--out', required=True)
    args = parser.parse_args(argv)
    summaries: List[Dict[str, Any]] = []
    for folder in map(Path, args.runs):
        data = json.loads((folder / SEEDS_FILE).read_text())
        summaries += summarise(data['rows'], _label(folder))
    references = [s for s in summaries if s['variant'] == args.reference]
    if not references:
        raise SystemExit(f'error: no {args.reference} runs among {[s["label"] for s in summaries]}')
    verdicts = []
    for s in summaries:
        if s['variant'] in (args.reference, 'mha') or 'test_top1_mean' not in s:
            continue
        same = next((r for r in references if r['label'].removeprefix(args.reference) ==
                     s['label'].removeprefix(s['variant'])), references[0])  # the reference of the same head order
        verdicts.append(verdict(s, same))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'seeds.json').write_text(json.dumps(dict(runs=summaries, verdicts=verdicts), indent=2))
    (out / 'seeds.md').write_text(seed_table(summaries, verdicts))
    print(seed_table(summaries, verdicts))


if __name__ == '__main__':
    main()
