"""``python -m support.calibrate_in_processes OUT`` (one process, or under ``accelerate launch``): a calibrated
conversion of a tiny random ViT -- the advisor's head order, the closed form, a few optimisation steps -- with
``parallel=True``, for static GQA and per-image KDGQA (whose routing counts are part of the closed form's sums).
Each process writes its converted weights and its report to ``OUT/rank{R}.safetensors`` / ``.json``."""
import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from safetensors.torch import save_file

from gqa_core.core.calibrate import CalibrationBudget
from gqa_core.core.convert import convert
from support import tiny_vit

IMAGES = 37  # odd: the processes' parts differ in size


def main(out: Path) -> None:
    state = PartialState(cpu=True)  # a gloo group under accelerate launch, as the CLIs' Accelerator sets up
    images = torch.randn(IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mha = tiny_vit(num_heads=6, head_dim=4, seed=6)
    weights, reports = {}, {'processes': state.num_processes}
    for variant in ('gqa', 'kdgqa'):
        model = convert(copy.deepcopy(mha), variant, 3, head_order='output-error', calibration=images,
                        init='calibrated', budget=CalibrationBudget(steps=5, batch_images=8), parallel=True)
        weights.update({f'{variant}.{k}': v.contiguous() for k, v in model.state_dict().items()
                        if v.is_floating_point()})
        report = model.calibration_report.as_dict()
        report.pop('seconds')
        reports[variant] = report
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / f'rank{state.process_index}.safetensors')
    (out / f'rank{state.process_index}.json').write_text(json.dumps(reports))


if __name__ == '__main__':
    main(Path(sys.argv[1]))
