"""Where the forwards of an analysis (and of a live KV budget) run.

In this process by default. On a ZeroGPU Space -- the hardware free Gradio Spaces get -- CUDA exists only
inside a ``@spaces.GPU`` function that Hugging Face runs in another process, so arguments and results cross a
process boundary: the jobs here are plain picklable data (the model's typed config, its weights as CPU
tensors, the input tensors) and their results come back as CPU tensors. Model loading, conversion, session
state and files stay in the main process. Without ZeroGPU (``spaces`` not installed, or ``SPACES_ZERO_GPU``
unset) the decorator returns the function unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor, nn

from ..core.convert import check_kv_as_built
from ..core.device import full_fp32
from ..core.record import FUSIONS, Recording, record
from ..io.config import GQALensConfig
from ..core.vit import gqa_layers, num_tokens
from .gpu_duration import analysis_forwards, gpu_seconds, kv_budget_forwards
from .heads import AblationResult, Progress, ablation_study, faithfulness

__all__ = ['ForwardJob', 'Forwards', 'run_forwards', 'forwards_in_a_gpu_call', 'on_zerogpu',
           'KVBudgetJob', 'kv_budget_in_a_gpu_call', 'cpu_state', 'job_model',
           'forward_job_seconds', 'kv_budget_job_seconds']


def _gpu(duration: Callable[..., int]) -> Callable[[Callable], Callable]:
    """``@spaces.GPU`` reserving ``duration(*the call's arguments)`` seconds (:mod:`.gpu_duration`); the function
    keeps ``duration`` as ``gpu_seconds``, so what a call would reserve can be asked without ZeroGPU."""
    def decorate(fn: Callable) -> Callable:
        fn.gpu_seconds = duration  # type: ignore[attr-defined]
        try:
            import spaces
        except ImportError:
            return fn
        return spaces.GPU(duration=duration)(fn)
    return decorate


def on_zerogpu() -> bool:
    try:
        from spaces.config import Config
    except ImportError:
        return False
    return bool(Config.zero_gpu)


@dataclass
class Forwards:
    """What the forwards of one analysis produced (CPU tensors / numpy)."""
    recording: Recording
    ablation: Optional[AblationResult] = None
    faithfulness: Optional[Dict[str, Dict[str, Any]]] = None


def run_forwards(model: nn.Module, x: Tensor, deep: bool, labels: List[str],
                 progress: Optional[Progress] = None) -> Forwards:
    """The recorded forward of ``x`` (one image) and, when ``deep``, every head ablation and the faithfulness
    curves of the summary map and the rollout -- all the forwards an analysis needs, on ``x``'s device.
    ``progress(fraction, what)``: how far the deep analyses are (ablation the first half, faithfulness the
    second)."""
    with torch.inference_mode(), record(model, attention='prefix', rollout=FUSIONS, keep_qk=True) as rec:
        model(x)
    result = rec.result
    if not deep:
        return Forwards(result)
    target = None if result.headless else int(result.logits[0].argmax())
    label = labels[target] if target is not None and target < len(labels) else ''
    def half(offset: float) -> Optional[Progress]:
        return None if progress is None else (lambda fraction, what: progress(offset + fraction / 2, what))
    ablation = ablation_study(model, x, target, label, progress=half(0.0))
    maps = {f'{result.row_labels[result.summary_row]} map': result.summary_rows()[-1].mean(0),
            'rollout': result.rollout_patches('mean')}
    return Forwards(result, ablation, faithfulness(model, x, maps, result.grid_size, target, progress=half(0.5)))


@dataclass
class ForwardJob:
    """An analysis's forwards as data: the model's typed ``config`` (carried from the load, never derived
    again), its CPU ``state``, the input ``x``, and the model's ``tokens`` and ``layers`` (what its GPU call
    reserves time for, known without building it)."""
    config: GQALensConfig
    state: Dict[str, Tensor]
    x: Tensor
    deep: bool
    labels: List[str]
    tokens: int
    layers: int
    forwards: float  # single-image forwards the job runs, in whole-model passes (gpu_duration.analysis_forwards)

    @classmethod
    def of(cls, config: GQALensConfig, model: nn.Module, x: Tensor, deep: bool, labels: List[str]) -> 'ForwardJob':
        attns = gqa_layers(model)
        forwards = analysis_forwards([a.num_heads + a.num_kv_heads for a in attns], deep)
        return cls(config, cpu_state(model), x.cpu(), deep, list(labels), num_tokens(model), len(attns), forwards)


def forward_job_seconds(job: ForwardJob) -> int:
    """The seconds a ZeroGPU call of ``job`` reserves.

    Args:
        job: the analysis's forwards.
    """
    return gpu_seconds(job.tokens, job.layers, job.forwards)


def cpu_state(model: nn.Module) -> Dict[str, Tensor]:
    """The model's weights as CPU tensors (shared with the model where it lives on the CPU)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _device() -> torch.device:
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    full_fp32(device)
    return device


def job_model(job: Any) -> nn.Module:
    """The job's model, rebuilt from its config and weights on CUDA when there is one."""
    model = job.config.build()
    model.load_state_dict(job.state, strict=True)
    return model.to(_device()).eval()


@_gpu(forward_job_seconds)
def forwards_in_a_gpu_call(job: ForwardJob) -> Forwards:
    """:func:`run_forwards` for a job, with the model rebuilt from its data on CUDA when there is one; what
    a ZeroGPU Space runs inside its GPU slice."""
    return run_forwards(job_model(job), job.x.to(_device()), job.deep, job.labels)


@dataclass
class KVBudgetJob:
    """A live KV budget as data: the MHA model's config and weights, evaluation images, labels, calibration."""
    config: GQALensConfig
    state: Dict[str, Tensor]
    images: Tensor
    labels: Optional[Tensor]
    calibration: Tensor
    max_refine_flops: Optional[float]
    tokens: int
    layers: int
    forwards: float  # single-image forwards the job runs (gpu_duration.kv_budget_forwards)

    @classmethod
    def of(cls, config: GQALensConfig, model: nn.Module, images: Tensor, labels: Optional[Tensor],
           calibration: Tensor, max_refine_flops: Optional[float]) -> 'KVBudgetJob':
        from .kv_budget import conversions
        layers = len(gqa_layers(model))
        converted = conversions(gqa_layers(model)[0].num_heads)
        advised = sorted({g for g, _, order, _ in converted if order != 'consecutive'})
        forwards = kv_budget_forwards(len(images), len(calibration), layers, len(converted), advised)
        forwards += len(images) if check_kv_as_built(model, 'the model', 'the explorer') else 0  # its own row
        return cls(config, cpu_state(model), images.cpu(), None if labels is None else labels.cpu(), calibration.cpu(),
                   max_refine_flops, num_tokens(model), layers, forwards)


def kv_budget_job_seconds(job: KVBudgetJob) -> int:
    """The seconds a ZeroGPU call of ``job`` reserves.

    Args:
        job: the live KV budget's work.
    """
    return gpu_seconds(job.tokens, job.layers, job.forwards)


@_gpu(kv_budget_job_seconds)
def kv_budget_in_a_gpu_call(job: KVBudgetJob) -> list:
    from .kv_budget import kv_budget_rows
    device = _device()
    return kv_budget_rows(job_model(job), job.images.to(device), None if job.labels is None else job.labels.to(device),
                          job.calibration.to(device), batch_size=64, max_refine_flops=job.max_refine_flops)
