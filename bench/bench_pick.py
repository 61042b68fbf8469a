"""Server time of a pick: after a run, picking another query re-renders every column's "picked query" (and
"query-key geometry") view from the session's state (the kept queries and keys), with no model running again. Also the state a pick needs.

    python bench/bench_pick.py --repeat 20

Cases: the four default embedded models; ViT-S/16 at 224 px (197 tokens) and DINOv2-S with 4 registers at
518 px (1,374 tokens), both timm architectures with random weights converted to GQA (speed and memory do not
depend on the weights), served as local models. Prints min / median / max milliseconds over ``--repeat``
picks at random places, the bytes of kept queries and keys per model, and the hover panel a pick sends per model
(the layer's patch-to-patch maps as uint8 in base64, the picture; "click only" above ``HOVER_MAX_BYTES``).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402

from gqa_core import convert, save_pretrained  # noqa: E402
from gqa_core.lens.models import DEFAULT_MODELS, ModelRegistry  # noqa: E402
from gqa_core.lens.views import Choice, column_width, render, run_models  # noqa: E402

LARGE = {'vit-s-224': ('vit_small_patch16_224', {}), 'dinov2-s-reg4-518': ('vit_small_patch14_reg4_dinov2', {})}


def kept_bytes(analysis) -> int:
    return sum(t.numel() * t.element_size() for layer in analysis.recording.layers
               for t in (layer.queries, layer.keys, layer.normalisers(), layer.bias) if t is not None)


def time_picks(analyses, repeat: int, layer: int, view: str = 'pick') -> list:
    width = column_width(len(analyses))
    rng = random.Random(0)
    times, shown = [], []
    for _ in range(repeat):
        query = f'{rng.random():.3f}, {rng.random():.3f}'
        start = time.perf_counter()
        shown = [render(a, Choice(view, layer, query=query, width=width)) for a in analyses]
        times.append(time.perf_counter() - start)
        assert all(s.applies for s in shown), [s.caption for s in shown]
    return times, shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeat', type=int, default=20)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--image', default=str(ROOT / 'assets' / 'examples' / 'grace_hopper.jpg'))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (arch, extra) in LARGE.items():
            torch.manual_seed(0)
            save_pretrained(convert(timm.create_model(arch, pretrained=False, **extra), 'gqa', 3), Path(tmp) / name)
        registry = ModelRegistry(model_dirs=[tmp])
        cases = {'4 embedded models': list(DEFAULT_MODELS)} | {name: [f'local:{name}'] for name in LARGE}
        print('| case | view | tokens | kept q/k per model | hover panel per model | min ms | median | max |\n'
              '|---|---|---:|---:|---:|---:|---:|---:|')
        for case, specs in cases.items():
            analyses, errors, _ = run_models(registry, args.image, specs)
            assert not any(errors), errors
            tokens = analyses[0].recording.layers[0].queries.shape[2]
            for view in ('pick', 'geometry'):
                layer = len(analyses[0].recording.layers) // 2
                times, shown = time_picks(analyses, args.repeat, layer, view)
                ms = [t * 1e3 for t in times]
                panel = shown[0].html
                hover = '-' if view != 'pick' else 'click only' if panel is None else f'{len(panel) / 2**10:.0f} KiB'
                print(f'| {case} | {view} | {tokens:,} | {kept_bytes(analyses[0]) / 2**20:.2f} MiB | {hover} | '
                      f'{min(ms):.0f} | {statistics.median(ms):.0f} | {max(ms):.0f} |', flush=True)


if __name__ == '__main__':
    main()
