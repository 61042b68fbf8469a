"""How much work the deep analyses of one image are, and whether this server runs them live.

Head ablation and faithfulness run hundreds of forwards (:func:`~gqa_core.lens.gpu_duration.analysis_forwards`),
so what bounds a live request is their arithmetic, not the token count alone: at 577 tokens a ViT-L's deep
analyses are about 260 TFLOP (half an hour on two CPU cores) while DINOv2-S/14 at 518 px (1,374 tokens) is 22
TFLOP. The limit therefore depends on where the forwards run:

- on the CPU, at most ``GQA_LENS_DEEP_MAX_CPU_TFLOP`` for one run, all its models together (default 40: about
  four and a half minutes at the ~150 GFLOP/s two cores sustain, docs/benchmarks.md);
- on a ZeroGPU Space, what the call's reservation estimate (:func:`~gqa_core.lens.gpu_duration.estimated_seconds`)
  fits in ``MAX_GPU_SECONDS``, a fixed cap: a longer call could be aborted;
- on a local CUDA device, no limit but the token count.

Everywhere the deep analyses also need at most ``GQA_LENS_DEEP_MAX_TOKENS`` tokens (default 2,048, the default
token budget).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..core.device import model_device
from ..core.settings import Settings
from ..core.vit import blocks_of, gqa_layers, num_tokens
from .gpu import on_zerogpu
from .gpu_duration import MAX_GPU_SECONDS, analysis_forwards, estimated_seconds

__all__ = ['deep_forwards', 'deep_tflop', 'cpu_tflop', 'deep_refusal']


def deep_forwards(model: nn.Module) -> float:
    """Single-image forwards (whole-model passes) of one image's deep analyses on ``model``."""
    return analysis_forwards([a.num_heads + a.num_kv_heads for a in gqa_layers(model)], True)


def deep_tflop(model: nn.Module) -> float:
    """TFLOP of one image's deep analyses in the transformer blocks: per forward and token, twice the weights of
    every block's linear layers plus attention's ``4 x tokens x width`` (scores and values). What runs outside
    the blocks is left out: under 1 % for a plain patch embedding, but a hybrid's convolutional stem can cost as
    much as its blocks, and then the estimate is low."""
    T = num_tokens(model)
    per_token = 0
    for block, attn in zip(blocks_of(model), gqa_layers(model), strict=True):
        weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
        per_token += 2 * weights + 4 * T * attn.num_heads * attn.head_dim
    return deep_forwards(model) * T * per_token / 1e12


def cpu_tflop(model: nn.Module, device: Optional[torch.device] = None) -> float:
    """What the deep analyses of ``model`` count against the CPU limit: :func:`deep_tflop` where they run on this
    server's CPU (``device``, default the model's), 0 on a GPU or a ZeroGPU Space."""
    if on_zerogpu() or (device or model_device(model)).type != 'cpu':
        return 0.0
    return deep_tflop(model)


def deep_refusal(model: nn.Module, settings: Optional[Settings] = None,
                 device: Optional[torch.device] = None, spent: float = 0.0) -> Optional[str]:
    """None when the deep analyses of ``model`` run live here, else the one-line reason.

    Args:
        model: the converted model.
        settings: the operator's (default: the environment's).
        device: where its forwards run (default: the model's).
        spent: TFLOP the same run's other models already took on the CPU.
    """
    settings = settings or Settings.from_env()
    tokens = num_tokens(model)
    if tokens > settings.deep_max_tokens:
        return (f'head ablation and faithfulness need {tokens:,} tokens x many forwards; this server computes them '
                f'live up to {settings.deep_max_tokens:,} tokens (GQA_LENS_DEEP_MAX_TOKENS)')
    if on_zerogpu():
        seconds = estimated_seconds(tokens, len(gqa_layers(model)), deep_forwards(model))
        if seconds > MAX_GPU_SECONDS:
            return (f'head ablation and faithfulness of this model would need about {seconds:,.0f} s of GPU, more '
                    f'than one ZeroGPU call may reserve (a fixed {MAX_GPU_SECONDS} s)')
    work = cpu_tflop(model, device)
    if work and spent + work > settings.deep_max_cpu_tflop:
        others = f' after the {_tflop(spent)} TFLOP of this run\'s other models' if spent else ''
        return (f'head ablation and faithfulness of this model are about {_tflop(work)} TFLOP{others}; this '
                f'server computes them live on its CPU up to {settings.deep_max_cpu_tflop:g} TFLOP a run '
                f'(GQA_LENS_DEEP_MAX_CPU_TFLOP)')
    return None


def _tflop(value: float) -> str:
    return f'{value:,.0f}' if value >= 10 else f'{value:.2g}'
