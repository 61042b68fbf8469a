"""What an image goes through before a model sees it: the model's own data config (timm's, at the input size
the model was really built for), the evaluation geometry and the normalisation. Shared by training, evaluation
and the lens, so an image is prepared the same way everywhere."""
from __future__ import annotations

from typing import Any, Callable, Dict

import timm
from torch import nn
from torchvision import transforms as T

from ..core.families import family_of

__all__ = ['model_preprocessing', 'eval_geometry', 'normalisation', 'PREPROCESSING_KEYS']

PREPROCESSING_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')


def model_preprocessing(model: nn.Module) -> Dict[str, Any]:
    """timm's data config for ``model`` (from its ``pretrained_cfg``, where :func:`~gqa_core.io.hub.from_pretrained`
    puts a saved model's preprocessing), with the input size the model was really built for (its patch
    embedding's ``img_size``, which may be non-square or differ from the pretrained default)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    fam = family_of(model)  # a classifier may keep its patch embedding in its encoder
    img_size = getattr(fam.patch_embed(model) if fam is not None else getattr(model, 'patch_embed', None),
                       'img_size', None)
    if img_size is not None:
        cfg['input_size'] = (int(cfg['input_size'][0]), int(img_size[0]), int(img_size[1]))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if k in PREPROCESSING_KEYS}


def eval_geometry(preprocessing: Dict[str, Any]) -> Callable:
    """Resize (by ``crop_pct``) and centre-crop to the input size: what the model sees, before normalising."""
    size = tuple(preprocessing['input_size'][-2:])
    interpolation = T.InterpolationMode(preprocessing.get('interpolation', 'bicubic'))
    crop_pct = float(preprocessing.get('crop_pct', 1.0))
    resize = tuple(int(s / crop_pct) for s in size)
    return T.Compose([T.Resize(resize, interpolation=interpolation), T.CenterCrop(size)])


def normalisation(preprocessing: Dict[str, Any]) -> Callable:
    return T.Compose([T.ToTensor(), T.Normalize(preprocessing['mean'], preprocessing['std'])])
