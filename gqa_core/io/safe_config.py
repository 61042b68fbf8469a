"""Configs from anywhere are data: validate every field against an allow-list and a size budget before
anything is built.

A ``config.json`` (ours, or timm's on the Hub) decides which timm model is created and with what arguments.
Passed through unchecked it could name a loader option (``checkpoint_path``, ``pretrained_cfg_overlay``), a
file or URL, or a model far too large for the server. Here a config is accepted only when its backbone is a
timm Vision Transformer, every backbone argument is a known geometry key with a value of the right type and
range, the preprocessing cannot ask for unbounded work, and the model it describes -- counted on PyTorch's
``meta`` device, which allocates nothing -- fits the :class:`Budget`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional

import timm
import torch

from ..core.policies import POLICIES
from ..core.rules import Rule, check, check_fields, either, integer, list_of, number, one_of, optional, text
from ..core.families import REFUSED_MODULES, family_args, timm_modules
from ..core.families.vision_transformer import BACKBONE_ARGS
from ..core.vit import num_tokens, patch_embed_of
from ..core.settings import Settings

__all__ = ['ConfigError', 'Budget', 'check_backbone', 'check_backbone_args', 'check_grouping', 'check_preprocessing',
           'check_labels', 'check_budget', 'check_source_heads', 'check_num_classes', 'check_norm_eps', 'BACKBONE_ARGS']

BACKBONE_NAME = re.compile(r'^[a-z0-9_]{1,80}(\.[a-z0-9_]{1,80})?$')


class ConfigError(ValueError):
    """A config field is not acceptable; the message names the field and the rule."""


INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos')


@dataclass(frozen=True)
class Budget:
    """The largest model the server builds: parameters and tokens per image (attention work and recorded maps
    grow with tokens squared). Defaults fit the app's 2-core / 24 GiB machine with ViT-L and DINOv2 at 518 px
    inside; operators set ``GQA_LENS_MAX_PARAMS`` / ``GQA_LENS_MAX_TOKENS``."""
    max_params: int = 350_000_000
    max_tokens: int = 2_048

    @classmethod
    def from_env(cls) -> 'Budget':
        settings = Settings.from_env()
        return cls(settings.max_params, settings.max_tokens)


def _check_fields(where: str, values: Any, rules: Dict[str, Rule]) -> Dict[str, Any]:
    return check_fields(where, values, rules, ConfigError)


def check_backbone(name: Any) -> str:
    """A timm Vision Transformer name (``vit_*``, ``deit_*``, ``eva02_*``, ``beit_*``, ..., optionally ``.tag``)
    of a family GQA Lens converts, and nothing else."""
    if not isinstance(name, str) or not BACKBONE_NAME.match(name):
        raise ConfigError('backbone must be a timm model name (lower-case letters, digits, _ and one optional .tag)')
    arch = name.split('.')[0]
    if not timm.is_model(arch):
        raise ConfigError(f'backbone {name!r} is not a timm model')
    module = timm.models.model_entrypoint(arch).__module__
    if module not in timm_modules():
        reason = REFUSED_MODULES.get(module)
        raise ConfigError(f'backbone {name!r} is not a timm Vision Transformer'
                          + (f' GQA Lens opens ({reason})' if reason else ''))
    return name


def check_backbone_args(args: Any, backbone: Optional[str] = None, where: str = 'backbone_args') -> Dict[str, Any]:
    """``args`` against the allow-list of ``backbone``'s family (timm's VisionTransformer when not given);
    ``where``: the field's name in refusals (a timm config calls it ``model_args``)."""
    rules = BACKBONE_ARGS
    if backbone is not None:
        rules = family_args(timm.models.model_entrypoint(check_backbone(backbone).split(".")[0]).__module__)
    return _check_fields(where, args, rules)


def check_grouping(grouping: Any) -> Dict[str, Any]:
    """``{variant, num_kv_heads, **options}``, each option checked by the policy's own schema
    (:attr:`~gqa_core.core.policies.GroupingPolicy.OPTIONS`)."""
    if not isinstance(grouping, dict):
        raise ConfigError('grouping must be an object')
    grouping = dict(grouping)
    variant, g = grouping.pop('variant', None), grouping.pop('num_kv_heads', None)
    if not isinstance(variant, str) or variant not in POLICIES:  # a list or an object is unhashable
        raise ConfigError(f'grouping.variant must be one of {sorted(POLICIES)}')
    # one G for every block, or one per block (a model whose blocks share K/V heads differently: Sapiens2)
    check('grouping.num_kv_heads', g, optional(either(integer(1, 64), list_of(integer(1, 64), 1, 256))), ConfigError)
    return dict(variant=variant, num_kv_heads=g, **_check_fields('grouping', grouping, POLICIES[variant].OPTIONS))


def check_preprocessing(pre: Any) -> Dict[str, Any]:
    """Bounded geometry: the resize a hostile ``crop_pct`` could blow up is capped too."""
    if not isinstance(pre, dict):
        raise ConfigError('preprocessing must be an object')
    size = pre.get('input_size')
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[0] == 3
            and all(integer(8, 4096)(s) for s in size[1:])):
        raise ConfigError('preprocessing.input_size must be [3, height, width] with sides 8..4096')
    for key in ('mean', 'std'):
        v = pre.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(number(-1e3, 1e3)(x) for x in v)):
            raise ConfigError(f'preprocessing.{key} must be three numbers')
    if any(x == 0 for x in pre['std']):
        raise ConfigError('preprocessing.std must not contain 0')
    check('preprocessing.crop_pct', pre.get('crop_pct', 1.0), number(0.25, 1), ConfigError)
    if pre.get('interpolation', 'bicubic') not in INTERPOLATIONS:
        raise ConfigError(f'preprocessing.interpolation must be one of {INTERPOLATIONS}')
    return dict(pre)


def check_labels(labels: Any, num_classes: int) -> Optional[list]:
    if labels is None:
        return None
    if not (isinstance(labels, list) and len(labels) == num_classes
            and all(isinstance(s, str) and len(s) <= 200 for s in labels)):
        raise ConfigError(f'labels must be null or {num_classes} strings of at most 200 characters')
    return labels


def check_budget(backbone: str, args: Dict[str, Any], budget: Budget,
                 input_size: Optional[Any] = None) -> Dict[str, int]:
    """Count the model's parameters and tokens without allocating it (``meta`` device); refuse it when over
    ``budget``. ``input_size``: the preprocessing's ``[3, H, W]`` the model is built and shown images with (a model
    that takes any size, NaFlexVit, has as many tokens as that). Returns ``{'params': ..., 'tokens': ...}``."""
    width, heads = args.get('embed_dim'), args.get('num_heads')
    if width is not None and heads is not None and width % heads:
        raise ConfigError(f'backbone_args.num_heads ({heads}) must divide embed_dim ({width})')
    try:
        with torch.device('meta'):
            overlay = dict(input_size=tuple(input_size)) if input_size is not None else None
            model = timm.create_model(backbone.split('.')[0], pretrained=False, pretrained_cfg_overlay=overlay,
                                      **args)
    except Exception as e:  # timm validates geometry with many exception types: its words, on one line
        reason = ' '.join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f'backbone {backbone!r} cannot be built with these backbone_args ({reason})') from None
    grid = tuple(getattr(patch_embed_of(model), 'grid_size', None) or ())
    if grid and min(grid) < 1:
        raise ConfigError(f'backbone_args: the patches are larger than the image (a {grid[0]}x{grid[1]} patch grid)')
    params = sum(p.numel() for p in model.parameters())
    tokens = num_tokens(model)
    if params > budget.max_params:
        raise ConfigError(f'the config asks for a model of {params:,} parameters; this server allows '
                          f'{budget.max_params:,}')
    if tokens > budget.max_tokens:
        raise ConfigError(f'the config asks for {tokens:,} tokens per image; this server allows {budget.max_tokens:,}')
    return dict(params=params, tokens=tokens)


def check_source_heads(heads: Any) -> Optional[list]:
    if heads is not None and not (isinstance(heads, list) and len(heads) <= 64 and all(
            isinstance(p, list) and len(p) <= 64 and all(integer(0, 63)(h) for h in p) for p in heads)):
        raise ConfigError('source_heads must be null or one list of head indices per layer')
    return heads


def check_norm_eps(eps: Any) -> Optional[float]:
    return check('norm_eps', eps, optional(number(1e-12, 1e-2, says='a number 1e-12..0.01')), ConfigError)


# How the shared K/V heads were made (:mod:`gqa_core.core.calibrate`): shown on model cards and in the app.
CONVERSION_FIELDS: Dict[str, Rule] = {
    'init': one_of('mean', 'calibrated', says='"mean" or "calibrated"'),
    'images': integer(1, 10**7),
    'data': text(100),
    'steps_per_layer': integer(0, 100_000),
    'params': one_of('kv', 'all', says='"kv" or "all"'),
    'seconds': number(0, 10**7, says='a number of seconds'),
}


def check_conversion(conversion: Any) -> Optional[Dict[str, Any]]:
    """``conversion`` of a config: null, or how the K/V heads were initialised (see ``CONVERSION_FIELDS``)."""
    if conversion is None:
        return None
    checked = _check_fields('conversion', conversion, CONVERSION_FIELDS)
    if 'init' not in checked:
        raise ConfigError('conversion.init is required')
    return checked


def check_num_classes(num_classes: Any) -> int:
    check('num_classes', num_classes, integer(0, 100_000), ConfigError)
    return num_classes
