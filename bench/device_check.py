"""On a machine with CUDA: the app's analysis on the GPU equals the CPU's within 1e-4 (float32, no TF32), for
every family of bench/bench_families.py at a small size, random weights.

    python bench/device_check.py      # one JSON line per family: max |GPU - CPU| of logits, rows, rollouts
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))
from bench_families import FAMILIES  # noqa: E402

TOLERANCE = 1e-4


def main() -> None:
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from gqa_core import convert, save_pretrained
    from gqa_core.lens.analysis import analyse
    from gqa_core.lens.models import ModelRegistry
    if not torch.cuda.is_available():
        raise SystemExit('no CUDA device here: nothing to compare')
    image = Image.open(ROOT / 'assets' / 'examples' / 'grace_hopper.jpg').convert('RGB')
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for key, (name, _) in FAMILIES.items():
            torch.manual_seed(0)
            model = timm.create_model(name, depth=4).eval()
            H = model.blocks[0].attn.num_heads
            save_pretrained(convert(model, 'kdgqa', H // 2 if H % 2 == 0 else H), Path(tmp) / key)
            runs = {d: analyse(ModelRegistry(model_dirs=[tmp], device=d).get(f'local:{key}'), image, deep=True)
                    for d in ('cpu', 'cuda')}
            cpu, gpu = runs['cpu'].recording, runs['cuda'].recording
            diffs = dict(logits=float((cpu.logits - gpu.logits).abs().max()),
                         summary_rows=float(np.abs(cpu.summary_rows() - gpu.summary_rows()).max()),
                         rollout=max(float((cpu.rollout[f] - gpu.rollout[f]).abs().max()) for f in cpu.rollout),
                         same_routing=bool(all((a.query_to_kv == b.query_to_kv).all()
                                               for a, b in zip(cpu.layers, gpu.layers))))
            worst = max(worst, diffs['logits'], diffs['summary_rows'], diffs['rollout'])
            print(json.dumps(dict(family=key, model=name, **diffs)), flush=True)
    print(json.dumps(dict(worst=worst, tolerance=TOLERANCE, ok=worst <= TOLERANCE)))


if __name__ == '__main__':
    main()
