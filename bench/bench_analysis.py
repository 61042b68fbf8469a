"""One app analysis of a large-token model, today's recorder against an earlier revision's, side by side in one
process (interleaved rounds), with the recorded rows compared bitwise.

    python bench/bench_analysis.py --before 16b7ae0          # DINOv2-reg ViT-S/14 at 518 px: 1,374 tokens

The earlier ``gqa_core/core/record.py`` is read from git (``--before``) and imported beside today's. Each
round times, for each recorder, the app's forwards (``run_forwards``: recorded forward, prefix rows, three
rollouts, kept q/k) and the rest of ``analyse`` (softmax, top-5, summary), then the figures the first page
draws. Prints min / median / max seconds per part, and the largest difference of every recorded array.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's gqa_core, not an installed one
sys.path.insert(0, str(ROOT / 'bench'))
import bench_scale  # noqa: E402,F401  (sets the offline environment)


def load_record_at(revision: str):
    """``gqa_core.core.record`` as it was at ``revision`` (a module beside today's, same package)."""
    source = subprocess.run(['git', '-C', str(ROOT), 'show', f'{revision}:gqa_core/core/record.py'],
                            check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader('gqa_core.core._record_before', loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = 'gqa_core.core'
    sys.modules[spec.name] = module  # dataclasses look their module up
    exec(compile(source, f'{revision}:gqa_core/core/record.py', 'exec'), module.__dict__)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_small_patch14_reg4_dinov2')
    parser.add_argument('--before', default='', help='git revision of the recorder to compare with')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import timm
    import torch
    from PIL import Image
    from gqa_core import convert, save_pretrained
    from gqa_core.lens import analysis as analysis_module, gpu
    from gqa_core.lens.models import ModelRegistry
    from gqa_core.lens.views import Choice, render
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    H = model.blocks[0].attn.num_heads
    image = Image.open(ROOT / 'assets' / 'examples' / 'grace_hopper.jpg').convert('RGB')
    recorders = {'today': gpu.record}
    if args.before:
        recorders[f'before ({args.before})'] = load_record_at(args.before).record
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(convert(model, 'kdgqa', H // 2), Path(tmp) / 'm')
        loaded = ModelRegistry(model_dirs=[tmp]).get('local:m')
        times = {(name, part): [] for name in recorders for part in ('forwards', 'analyse', 'figures')}
        results = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name, recorder in recorders.items():
                gpu.record = recorder
                run = gpu.run_forwards
                spent = {}

                def timed_forwards(*a, **k):
                    start = time.perf_counter()
                    out = run(*a, **k)
                    spent['forwards'] = time.perf_counter() - start
                    return out
                gpu.run_forwards = analysis_module.run_forwards = timed_forwards
                start = time.perf_counter()
                analysis = analysis_module.analyse(loaded, image)
                total = time.perf_counter() - start
                gpu.run_forwards = analysis_module.run_forwards = run
                start = time.perf_counter()
                for choice in (Choice('overlay'), Choice('rollout'), Choice('grid'), Choice('key_norms')):
                    render(analysis, choice)
                figures = time.perf_counter() - start
                if round_:
                    times[name, 'forwards'].append(spent['forwards'])
                    times[name, 'analyse'].append(total - spent['forwards'])
                    times[name, 'figures'].append(figures)
                results[name] = analysis.recording
        gpu.record = recorders['today']
    rec = results['today']
    print(f'model={args.model} tokens={rec.rollout["mean"].shape[-1]} threads={torch.get_num_threads()} '
          f'rounds={args.rounds}')
    print('| recorder | part | min s | median s | max s |')
    print('|---|---|---:|---:|---:|')
    for (name, part), samples in times.items():
        print(f'| {name} | {part} | {min(samples):.3f} | {statistics.median(samples):.3f} | {max(samples):.3f} |')
    for name in recorders:
        whole = [sum(times[name, p][i] for p in ('forwards', 'analyse', 'figures')) for i in range(args.rounds)]
        print(f'| {name} | whole analysis | {min(whole):.3f} | {statistics.median(whole):.3f} | {max(whole):.3f} |')
    for name, other in results.items():
        if name == 'today':
            continue
        for key, value in other.to_numpy().items():
            if isinstance(value, np.ndarray) and value.dtype.kind == 'f':
                mine = rec.to_numpy()[key]
                same = np.array_equal(value, mine)
                print(f'{key}: {"identical" if same else f"max |diff| {np.abs(value - mine).max():.2e}"}')


if __name__ == '__main__':
    main()
