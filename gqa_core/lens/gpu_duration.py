"""How many seconds a ZeroGPU call reserves: sized by the work it carries, between a floor and a cap.

ZeroGPU schedules a ``@spaces.GPU`` call for the duration it asks (``spaces.GPU(duration=callable)``: the callable
gets the call's own arguments), charges that to the visitor's daily GPU quota, queues long reservations behind
short ones, and may abort a call that outlives its reservation. A fixed 60 s over-charges every small analysis and
may under-reserve a deep one, so each job says how much it does -- tokens per image x layers x the forwards it
runs (one image through the model, or with ablation every head removal and every faithfulness step; for the KV
budget every image through every converted model and the advisor's passes) -- and reserves

    seconds = MIN_GPU_SECONDS + tokens x layers x forwards / TOKEN_LAYERS_PER_SECOND, within [MIN, MAX]

The rate is an estimate, not a measurement: no GPU has been lent to this project (``bench/device_check.py``
would measure it). Every count below is the one the forwards actually run, so only the rate is assumed.
"""
from __future__ import annotations

from typing import Sequence

from ..core.ablation import ABLATION_MODES
from .heads import CURVE_STEPS

__all__ = ['MIN_GPU_SECONDS', 'MAX_GPU_SECONDS', 'TOKEN_LAYERS_PER_SECOND', 'FAITHFULNESS_MAPS',
           'ADVISOR_CANDIDATES', 'gpu_seconds', 'estimated_seconds', 'analysis_forwards', 'kv_budget_forwards']

# The floor: before any forward a call rebuilds the model from its config, copies its weights to the GPU (up to
# GQA_LENS_MAX_PARAMS = 350 M parameters, 1.4 GB in fp32) and runs CUDA's first kernels: a few seconds, doubled.
MIN_GPU_SECONDS = 10
# The cap: twice ZeroGPU's default of 60 s. A longer reservation waits longer in ZeroGPU's queue and takes most of
# a visitor's daily quota at once; deep analyses whose estimate exceeds it are not run (deep_work.deep_refusal:
# a ViT-L at 577 tokens estimates 240 s at the rate below), everything else is capped here.
MAX_GPU_SECONDS = 120
# One image token through one block of the widest model the budget admits (ViT-L, width 1,024: about 25 MFLOP,
# plus attention's 4 x tokens x width) at a third of a half-H200 slice's fp32 peak (analyses keep TF32 off) is
# about 300,000 a second; a third of that leaves a 3x margin, because a call that runs over may be aborted.
TOKEN_LAYERS_PER_SECOND = 100_000
FAITHFULNESS_MAPS = 2  # run_forwards measures the summary map and the rollout
ADVISOR_CANDIDATES = 8  # advise_head_order's default: candidate orders per layer compared on the model's output


def gpu_seconds(tokens: int, layers: int, forwards: float) -> int:
    """The seconds to reserve for ``forwards`` single-image passes of a ``tokens``-token, ``layers``-layer model.

    Args:
        tokens: tokens per image (patches and prefix tokens).
        layers: transformer blocks.
        forwards: single-image forwards the call runs (a batch of n images counts n).
    """
    return int(min(MAX_GPU_SECONDS, max(MIN_GPU_SECONDS, round(estimated_seconds(tokens, layers, forwards)))))


def estimated_seconds(tokens: int, layers: int, forwards: float) -> float:
    """:func:`gpu_seconds` before its floor and cap: what the work would take at the assumed rate."""
    return MIN_GPU_SECONDS + tokens * layers * forwards / TOKEN_LAYERS_PER_SECOND


def analysis_forwards(removals: Sequence[int], ablation: bool) -> float:
    """Single-image forwards of one analysis, in whole-model passes: the recorded one, and with ``ablation`` the
    unperturbed one of the ablation and of the faithfulness curves, every KV-head and query-head removal in each
    mode (:func:`~gqa_core.lens.heads.ablation_study`: a removal in block l starts from the tokens entering it, so
    it runs L - l of the L blocks) and the deletion and insertion curves of each faithfulness map
    (``CURVE_STEPS + 1`` points each; fewer for a model of fewer patches, so this never under-counts).

    Args:
        removals: per block, its KV heads and query heads together (each removed once per mode; blocks may
            differ in KV heads).
        ablation: whether the deep analyses (ablation, faithfulness) run.
    """
    if not ablation:
        return 1
    depth = len(removals)
    partial = sum(n * (depth - block) for block, n in enumerate(removals)) / depth
    return 3 + partial * len(ABLATION_MODES) + FAITHFULNESS_MAPS * 2 * (CURVE_STEPS + 1)


def kv_budget_forwards(images: int, calibration: int, layers: int, conversions: int,
                       advised: Sequence[int]) -> float:
    """Single-image forwards of one live KV budget: every evaluation image through the MHA and each converted
    model, and for each advised G the advisor's passes over the calibration images (one through the MHA, then
    per layer its candidates through the rest of the model: about ``candidates x (layers + 1) / 2`` passes).

    Args:
        images: evaluation images.
        calibration: calibration images the advisor scores.
        layers: transformer blocks.
        conversions: converted models evaluated (rows of the table besides the MHA's).
        advised: the Gs the advisor runs for.
    """
    advisor = calibration * (1 + ADVISOR_CANDIDATES * (layers + 1) / 2)
    return images * (1 + conversions) + advisor * len(advised)
