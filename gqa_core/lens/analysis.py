"""One model on one image: prediction plus what the views need, recorded compactly.

An :class:`Analysis` holds, per layer and head, only the summary rows (class token, registers, or the mean over
queries) and the attention rollout accumulated while the forward ran -- never every layer's T x T maps, so a
DINOv2-style model at 518 px (T = 1,374) keeps a few MB per session instead of hundreds. The full maps of one
layer are recomputed on demand (:func:`layer_maps`). Everything past :func:`analyse` is pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from ..io.preprocessing import eval_geometry, normalisation
from .deep_work import cpu_tflop, deep_refusal
from .gpu import ForwardJob, forwards_in_a_gpu_call, on_zerogpu, run_forwards
from .heads import AblationResult, Progress
from .models import LoadedModel
from ..core.head_order import head_groups
from ..core.record import FUSIONS, Recording, record
from ..core.device import model_device
from ..core.vit import gqa_layers

__all__ = ['Analysis', 'Pooling', 'analyse', 'layer_maps', 'model_input', 'FUSIONS']

HEADLESS_NOTE = 'features only (no classifier head): no prediction; every attention view is still shown'


@dataclass(frozen=True)
class Pooling:
    """How a conversion would share an MHA's key heads: ``num_kv_heads`` groups of heads per layer, each the
    original heads ``source_heads[layer]`` lists consecutively (the advisor's order), or consecutive heads when
    ``source_heads`` is None (the paper's mean-pooling); ``by`` names where the order comes from."""
    num_kv_heads: int
    by: str
    source_heads: Optional[List[List[int]]] = None

    def groups(self, layer: int, num_heads: int) -> List[List[int]]:
        return head_groups(self.source_heads[layer] if self.source_heads else range(num_heads), self.num_kv_heads)


@dataclass
class Analysis:
    """What one model did with one image. ``view`` is the image as the model saw it (resized, cropped)."""
    spec: str
    view: np.ndarray  # (h, w, 3) uint8
    recording: Recording  # batch of one; 'prefix' rows for every layer, rollouts per fusion
    top5: List[tuple]  # (label, probability); empty for a headless model
    grouping: Dict[str, Any]
    history: Optional[List[Dict[str, Any]]] = None  # DGQA: per layer {'steps': [...], 'allocation': [[...]]}
    summary: str = ''  # the model's one-line description (params, G, K/V bytes)
    notes: List[str] = field(default_factory=list)
    source_heads: Optional[List[List[int]]] = None  # advised head order: original MHA head at each position
    ablation: Optional[AblationResult] = None  # which heads matter (None: not computed, see deep_note)
    faithfulness: Optional[Dict[str, Dict[str, Any]]] = None  # deletion / insertion per map
    deep_note: str = ''
    deep_tflop: float = 0.0  # what its deep analyses cost on the CPU (counted against the run's limit)
    calibration: Optional[Dict[str, Any]] = None  # what calibration did, when the model was calibrated here
    pooling: Optional['Pooling'] = None  # an MHA's heads as a conversion of this run pools them (picked view)

    @property
    def summary_label(self) -> str:
        """What the summary rows are: ``class token`` or ``mean over queries``."""
        return self.recording.row_labels[self.recording.summary_row]

    @property
    def summary_rows(self) -> np.ndarray:
        """``(L, H, patches)``: attention of the summary row to every patch token, every layer and head."""
        return self.recording.summary_rows()

    @property
    def num_heads(self) -> int:
        return int(self.recording.layers[0].query_to_kv.shape[-1])

    def rollout(self, fusion: str = 'mean') -> np.ndarray:
        """``(patches,)`` attention rollout of the summary row (of the attention-pooling query when the model
        has one) with the given head fusion."""
        if fusion not in self.recording.rollout:
            raise ValueError(f'fusion must be one of {tuple(self.recording.rollout)}, got {fusion!r}')
        return self.recording.rollout_patches(fusion)

    def nbytes(self) -> int:
        """Bytes of the arrays this analysis keeps (what a session holds for it)."""
        rec = self.recording
        tensors = [rec.logits, *rec.rollout.values()] + ([rec.pool_attention] if rec.pool_attention is not None else [])
        normalisers = 0  # counted before a view computes them (LayerRecord.normalisers): one float per row
        for layer in rec.layers:
            tensors += [t for t in (layer.attention, layer.key_norms, layer.shares, layer.allocation,
                                    layer.query_to_kv, layer.full, layer.queries, layer.keys,
                                    layer.bias, layer.logit_mix, layer.weight_mix) if t is not None]
            if layer.queries is not None:
                normalisers += layer.queries.shape[:3].numel() * 4
        return self.view.nbytes + normalisers + sum(t.numel() * t.element_size() for t in tensors)


def model_input(loaded: LoadedModel, image: Image.Image) -> tuple:
    """``(view, x)``: the resized / cropped RGB view (uint8) and the normalised ``(1, 3, H, W)`` input."""
    view = eval_geometry(loaded.preprocessing)(image.convert('RGB'))
    return np.asarray(view), normalisation(loaded.preprocessing)(view)[None]


def analyse(loaded: LoadedModel, image: Image.Image, deep: bool = False,
            progress: Optional[Progress] = None, deep_spent: float = 0.0) -> Analysis:
    """Run ``loaded`` on one RGB image (always a batch of one: the result never depends on other requests).

    ``deep``: also ablate every head and measure the maps' faithfulness (batched forwards), for models whose
    deep analyses this server runs live (:func:`~gqa_core.lens.deep_work.deep_refusal`: their tokens, and their
    work where they run), so a live request stays bounded. The forwards run in
    this process, or on a ZeroGPU Space in one GPU call (:mod:`gqa_core.lens.gpu`). ``progress(fraction,
    what)`` hears how far the deep analyses are (in this process only). ``deep_spent``: TFLOP the other models of
    the same run already spent on the CPU (the CPU limit is a run's).
    """
    view, x = model_input(loaded, image)
    x = x.to(model_device(loaded.model))  # the registry's device (the CPU on a ZeroGPU Space)
    refusal = deep_refusal(loaded.model, spent=deep_spent) if deep else None
    run_deep = deep and refusal is None
    with loaded.lock:
        if on_zerogpu():
            out = forwards_in_a_gpu_call(ForwardJob.of(loaded.config, loaded.model, x, run_deep, loaded.labels))
        else:
            out = run_forwards(loaded.model, x, run_deep, loaded.labels, progress=progress)
        check_finite(out.recording)
        analysis = _summarise(loaded, view, out.recording)
    analysis.ablation, analysis.faithfulness = out.ablation, out.faithfulness
    analysis.deep_tflop = cpu_tflop(loaded.model) if run_deep else 0.0
    shrunk = shrink_note(image.size, loaded.preprocessing['input_size'][1:])
    if shrunk:
        analysis.notes.insert(0, shrunk)
    if not deep:
        analysis.deep_note = 'tick "which heads matter" and run again for head ablation and faithfulness'
    elif not run_deep:
        analysis.deep_note = refusal
    return analysis


class NonFiniteOutput(ValueError):
    """A model computed NaN or Inf: nothing it shows could be read (finite weights can still overflow)."""


def check_finite(recording: Recording) -> None:
    """Refuse a forward whose output (logits, or a headless model's features) holds NaN or Inf."""
    if not bool(torch.isfinite(recording.logits).all()):
        raise NonFiniteOutput("the model's outputs are not finite (NaN or Inf) on this image: its weights "
                              'overflow or are broken')


SHRINK_NOTE_FACTOR = 4  # a side this many times the model's input: say how little of the image it sees


def shrink_note(image_size: tuple, input_size: tuple) -> str:
    """A note when the image is much larger than what the model sees (a 1,200 px photo for a 32 px model)."""
    width, height = image_size
    in_h, in_w = (int(s) for s in input_size)
    if max(width / in_w, height / in_h) < SHRINK_NOTE_FACTOR:
        return ''
    return f'⚠️ the {width:,} × {height:,} image was shrunk to {in_w} × {in_h} px for this model: it sees only that'


def _summarise(loaded: LoadedModel, view: np.ndarray, result: Recording) -> Analysis:
    notes: List[str] = []
    top5: List[tuple] = []
    if result.headless:
        notes.append(HEADLESS_NOTE)
    else:
        probs, idx = result.topk(5)
        top5 = [(loaded.labels[int(i)] if int(i) < len(loaded.labels) else f'class {int(i)}', float(p))
                for p, i in zip(probs[0], idx[0])]
    changes = [layer.policy.allocation_history() for layer in gqa_layers(loaded.model)]
    history = None
    if all(c is not None for c in changes):
        history = [dict(steps=steps.tolist(), allocation=allocation.tolist()) for steps, allocation in changes]
    return Analysis(loaded.spec, view, result, top5, dict(loaded.grouping), history, loaded.summary(), notes,
                    loaded.source_heads,
                    calibration=loaded.calibration.as_dict() if loaded.calibration is not None else None)


def layer_maps(loaded: LoadedModel, analysis: Analysis, layer: int) -> np.ndarray:
    """``(H, T, T)`` full attention of one layer for the analysed image, recomputed from the stored view
    (deterministic: same input, batch of one) instead of kept for every layer."""
    x = normalisation(loaded.preprocessing)(Image.fromarray(analysis.view))[None].to(model_device(loaded.model))
    with loaded.lock, torch.inference_mode(), record(loaded.model, attention='none', full_layers=[layer]) as rec:
        loaded.model(x)
    return rec.result.layers[layer].full[0].numpy()
