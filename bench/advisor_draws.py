"""The head-order advisor against the paper's consecutive pooling, training-free, over several calibration draws:
the advisor table in docs/analyses.md.

    python bench/advisor_draws.py assets/models/mha --draws 0 1 2 --threads 2

For G = 4 and 2 (or ``--kv-heads``), GQA top-1 on the full CIFAR-10 test split with consecutive pooling, with
the advisor's layer error alone (``candidates=1``) and with its default (the model output picks among the 8 best),
each advised on 512 training images drawn with every ``--draws`` seed (``DataSplits.calibration``). Prints one
markdown row per G and the advising time.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from gqa_core.core.convert import convert
from gqa_core.core.head_order import advise_head_order
from gqa_core.io.hub import from_pretrained
from gqa_core.io.preprocessing import model_preprocessing
from gqa_core.lens.kv_budget import predictions, split_tensors
from gqa_core.training.data import build_datasets

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', nargs='?', default=str(ROOT / 'assets' / 'models' / 'mha'))
    parser.add_argument('--data', default=str(ROOT.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'))
    parser.add_argument('--draws', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--kv-heads', type=int, nargs='+', default=[4, 2])
    parser.add_argument('--calibration-images', type=int, default=512)
    parser.add_argument('--threads', type=int)
    parser.add_argument('--limit', type=int, help='fewer images per split (a quick check)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    mha = from_pretrained(args.model).float().eval()
    splits = build_datasets(args.data, model_preprocessing(mha), seed=0, limit=args.limit)
    images, labels = split_tensors(splits, 'test')

    def top1(model: torch.nn.Module) -> float:
        return float((predictions(model.eval(), images) == labels).float().mean())

    print(f'threads={torch.get_num_threads()} model={args.model} n={len(labels)} draws={args.draws}')
    print(f'MHA: {top1(mha):.2%}')
    print('| G | consecutive (paper) | layer error only (`candidates=1`) | default: the model output picks among the 8 best |')
    print('|---|---:|---:|---:|')
    for G in args.kv_heads:
        cells = {1: [], 8: []}
        seconds = {1: [], 8: []}
        for draw in args.draws:
            calibration = splits.calibration(args.calibration_images, draw)
            for candidates in cells:
                start = time.perf_counter()
                advice = advise_head_order(mha, G, calibration, candidates=candidates)
                seconds[candidates].append(time.perf_counter() - start)
                cells[candidates].append(top1(convert(copy.deepcopy(mha), 'gqa', G, head_order=advice.permutations)))
        consecutive = top1(convert(copy.deepcopy(mha), 'gqa', G))
        row = [' / '.join(f'{v * 100:.2f}' for v in cells[c]) + ' %' for c in (1, 8)]
        print(f'| {G} | {consecutive * 100:.2f} % | {row[0]} | {row[1]} |  '
              f'(advising: {sum(seconds[1]) / len(args.draws):.0f} s / {sum(seconds[8]) / len(args.draws):.0f} s a draw)')


if __name__ == '__main__':
    main()
