"""``python -m support.train_dgqa_ranks DATA OUT`` under ``accelerate launch``: the real trainer
(:func:`gqa_core.training.train.run`) trains DGQA-diff and DGQA-EMA on a tiny ViT, re-allocating every step, and
each process writes what *its own* DGQA policies hold after every training forward to ``OUT/rank{R}.json``.

A global forward hook (PyTorch's ``register_module_forward_hook``) reads each policy right after its update, so
the record is what that process computed from its own batch and the all-reduced statistic; the trainer's DDP
does not broadcast buffers (:func:`~gqa_core.training.parallel.make_accelerator`), so no process's state is
overwritten by rank 0's and a drift between processes would stay visible.
"""
import json
import sys
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_hook

from gqa_core.core.policies import DGQAPolicy
from gqa_core.training.train import parse_args, run

MODEL = '{"img_size":32,"patch_size":8,"embed_dim":24,"depth":2,"num_heads":6,"mlp_ratio":2.0,"num_classes":10}'
PRE = '{"input_size":[3,32,32],"mean":[0.5,0.5,0.5],"std":[0.5,0.5,0.5],"interpolation":"bicubic","crop_pct":1.0}'


def main(data: str, out: Path) -> None:
    records = []
    names = {}

    def record(module: torch.nn.Module, args: tuple, output: object) -> None:
        if isinstance(module, DGQAPolicy) and module.training:
            layer = names.setdefault(id(module), len(names))  # variants in turn: 0-1 diff, 2-3 ema
            records.append(dict(policy=layer, step=int(module.step), allocation=module.allocation.tolist(),
                                shares=module.shares.tolist(), reference=module.reference.tolist(),
                                ema=module.ema.tolist(), history=module.history.tolist(),
                                history_steps=module.history_steps.tolist()))

    hook = register_module_forward_hook(record)
    cfg = parse_args(['--data', data, '--out', str(out / 'runs'), '--timm-model', 'vit_tiny_patch16_224',
                      '--model-args', MODEL, '--preprocessing', PRE, '--variants', 'dgqa-diff', 'dgqa-ema',
                      '--num-kv-heads', '3', '--window', '1', '--beta', '0.5', '--epochs', '1', '--limit', '256',
                      '--batch-size', '16', '--lr', '0.003', '--augment', 'none', '--workers', '0', '--seed', '0',
                      '--device', 'cpu'])
    run(cfg)
    hook.remove()
    import torch.distributed as dist
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f'rank{rank}.json').write_text(json.dumps(records))


if __name__ == '__main__':
    main(sys.argv[1], Path(sys.argv[2]))
