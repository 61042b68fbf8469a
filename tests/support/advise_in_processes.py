"""``python -m support.advise_in_processes OUT`` (one process, or under ``accelerate launch``): the head-order
advisor on a tiny random ViT for three searches -- exhaustive with the model-output comparison (6 heads into 3
KV heads), exact DP (12 into 3) and pairwise swaps (16 into 4) -- with ``parallel=True``. Each process writes
what it chose to ``OUT/rank{R}.json``, before anything else is shared, so the test sees every rank's own
result."""
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from gqa_core.core.head_order import advise_head_order
from support import tiny_vit

CASES = {'exhaustive': (6, 3), 'exact': (12, 3), 'swap': (16, 4)}  # name -> (heads, KV heads)
IMAGES = 37  # odd: the two processes' parts differ in size (19 and 18)


def main(out: Path) -> None:
    state = PartialState(cpu=True)  # what the CLIs' Accelerator sets up: a gloo group under accelerate launch
    images = torch.randn(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    result = {'processes': state.num_processes}
    for name, (heads, kv_heads) in CASES.items():
        advice = advise_head_order(tiny_vit(num_heads=heads, head_dim=4, seed=heads), kv_heads, images,
                                   candidates=4, batch=8, parallel=True)
        result[name] = dict(permutations=advice.permutations, search=advice.search,
                            error_consecutive=advice.error_consecutive, error_advised=advice.error_advised,
                            output_divergence=advice.output_divergence)
    out.mkdir(parents=True, exist_ok=True)
    (out / f'rank{state.process_index}.json').write_text(json.dumps(result))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
