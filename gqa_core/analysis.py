"""One model on one image: prediction plus everything recorded, and the derived attention quantities.

Everything past :func:`analyse` is pure numpy on recorded data, so it is testable without a model or a browser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from .data import eval_geometry, normalisation
from .models import LoadedModel
from .record import Recording, record

__all__ = ['Analysis', 'analyse', 'prefix_attention', 'attention_rollout', 'FUSIONS']

FUSIONS = ('mean', 'max', 'min')


@dataclass
class Analysis:
    """What one model did with one image. ``view`` is the image as the model saw it (resized, cropped)."""
    spec: str
    view: np.ndarray  # (h, w, 3) uint8
    recording: Recording  # batch of one, full maps
    labels: List[str]
    top5: List[tuple]  # (label, probability)
    grouping: Dict[str, Any]
    history: Optional[List[Dict[str, Any]]] = None  # DGQA: per layer {'steps': [...], 'allocation': [[...]]}
    summary: str = ''  # the model's one-line description (params, G, K/V bytes)

    @property
    def maps(self) -> np.ndarray:
        """``(L, H, T, T)`` attention of the single image."""
        return self.recording.stacked('attention')[:, 0]


def analyse(loaded: LoadedModel, image: Image.Image) -> Analysis:
    """Run ``loaded`` on one RGB image (always a batch of one: the result never depends on other requests)."""
    view = eval_geometry(loaded.preprocessing)(image)
    x = normalisation(loaded.preprocessing)(view)[None]
    with loaded.lock, torch.inference_mode(), record(loaded.model, attention='full') as rec:
        loaded.model(x)
    result = rec.result
    probs, idx = result.topk(5)
    top5 = [(loaded.labels[int(i)], float(p)) for p, i in zip(probs[0], idx[0])]
    history = None
    if loaded.grouping['variant'] == 'dgqa':
        history = [dict(steps=b.attn.policy.history_steps.tolist(), allocation=b.attn.policy.history.tolist())
                   for b in loaded.model.blocks]
    return Analysis(loaded.spec, np.asarray(view.convert('RGB')), result, loaded.labels, top5,
                    dict(loaded.grouping), history, loaded.summary())


def prefix_attention(maps: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
    """Attention from the class token (first prefix token) to every patch: ``(..., T, T) -> (..., patches)``.

    With no prefix token the mean attention over all query tokens stands in for it.
    """
    rows = maps[..., 0, :] if num_prefix_tokens > 0 else maps.mean(-2)
    return rows[..., num_prefix_tokens:]


def attention_rollout(maps: np.ndarray, num_prefix_tokens: int, fusion: str = 'mean') -> np.ndarray:
    """Abnar & Zuidema's rollout: fuse heads, add the residual (0.5 A + 0.5 I), renormalise, multiply layers.

    maps: ``(L, H, T, T)``. Returns ``(patches,)``: the rolled-out class-token attention to each patch.
    """
    if fusion not in FUSIONS:
        raise ValueError(f'fusion must be one of {FUSIONS}, got {fusion!r}')
    fused = getattr(maps, fusion)(axis=1)  # (L, T, T)
    T = fused.shape[-1]
    joint = np.eye(T)
    for layer in fused:
        a = 0.5 * layer + 0.5 * np.eye(T)
        a = a / a.sum(-1, keepdims=True)
        joint = a @ joint
    return prefix_attention(joint[None], num_prefix_tokens)[0]
