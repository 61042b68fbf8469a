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

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import timm
import torch

from ..core.policies import POLICIES
from ..core.vit import num_tokens
from ..core.settings import Settings

__all__ = ['ConfigError', 'Budget', 'check_backbone', 'check_backbone_args', 'check_grouping', 'check_preprocessing',
           'check_labels', 'check_budget', 'check_source_heads', 'check_num_classes', 'check_norm_eps', 'BACKBONE_ARGS']

VIT_MODULES = ('timm.models.vision_transformer', 'timm.models.deit', 'timm.models.eva', 'timm.models.beit')
BACKBONE_NAME = re.compile(r'^[a-z0-9_]{1,80}(\.[a-z0-9_]{1,80})?$')


class ConfigError(ValueError):
    """A config field is not acceptable; the message names the field and the rule."""


def _int(low: int, high: int) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and low <= v <= high


def _float(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: type(v) in (int, float) and math.isfinite(v) and low <= v <= high


def _bool(v: Any) -> bool:
    return type(v) is bool


def _size(v: Any) -> bool:
    return _int(8, 4096)(v) or (isinstance(v, (list, tuple)) and len(v) == 2 and all(_int(8, 4096)(s) for s in v))


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    return lambda v: any(v is c or (type(v) is type(c) and v == c) for c in choices)


# Geometry and regularisation keys of timm's VisionTransformer, each with its rule. Anything else -- a path,
# a URL, a loader option, a layer class -- is refused.
BACKBONE_ARGS: Dict[str, tuple] = {
    'img_size': (_size, 'an int or [height, width], 8..4096'),
    'patch_size': (_int(1, 64), 'an int 1..64'),
    'in_chans': (_one_of(3), '3 (RGB)'),
    'num_classes': (_int(0, 100_000), 'an int 0..100000'),
    'global_pool': (_one_of('', 'token', 'avg', 'avgmax', 'max', 'map'), "'', token, avg, avgmax, max or map"),
    'embed_dim': (_int(8, 4096), 'an int 8..4096'),
    'depth': (_int(1, 64), 'an int 1..64'),
    'num_heads': (_int(1, 64), 'an int 1..64'),
    'mlp_ratio': (_float(0.25, 16), 'a number 0.25..16'),
    'qkv_bias': (_bool, 'true or false'),
    'qk_norm': (_bool, 'true or false'),
    'proj_bias': (_bool, 'true or false'),
    'init_values': (lambda v: v is None or _float(0, 10)(v), 'null or a number 0..10'),
    'class_token': (_bool, 'true or false'),
    'pos_embed': (_one_of('learn', 'none'), 'learn or none'),
    'no_embed_class': (_bool, 'true or false'),
    'reg_tokens': (_int(0, 64), 'an int 0..64'),
    'pre_norm': (_bool, 'true or false'),
    'final_norm': (_bool, 'true or false'),
    'fc_norm': (lambda v: v is None or _bool(v), 'null, true or false'),
    'dynamic_img_size': (_bool, 'true or false'),
    'dynamic_img_pad': (_bool, 'true or false'),
    'drop_rate': (_float(0, 1), 'a number 0..1'),
    'pos_drop_rate': (_float(0, 1), 'a number 0..1'),
    'proj_drop_rate': (_float(0, 1), 'a number 0..1'),
    'attn_drop_rate': (_float(0, 1), 'a number 0..1'),
    'drop_path_rate': (_float(0, 1), 'a number 0..1'),
}
# The keys timm's Eva (eva.py) and Beit (beit.py) constructors add; the keys they lack are refused for them.
_SHARED = ('img_size', 'patch_size', 'in_chans', 'num_classes', 'global_pool', 'embed_dim', 'depth', 'num_heads',
           'mlp_ratio', 'qkv_bias', 'init_values', 'drop_rate', 'pos_drop_rate', 'proj_drop_rate', 'attn_drop_rate',
           'drop_path_rate', 'dynamic_img_size')
EVA_ARGS: Dict[str, tuple] = {
    **{k: BACKBONE_ARGS[k] for k in _SHARED}, 'class_token': BACKBONE_ARGS['class_token'],
    'qkv_fused': (_bool, 'true or false'),
    'qk_norm': BACKBONE_ARGS['qk_norm'],
    'num_reg_tokens': (_int(0, 64), 'an int 0..64'),
    'use_abs_pos_emb': (_bool, 'true or false'),
    'use_rot_pos_emb': (_bool, 'true or false'),
    'attn_pool_num_heads': (lambda v: v is None or _int(1, 64)(v), 'null or an int 1..64'),
    'attn_pool_mlp_ratio': (lambda v: v is None or _float(0.25, 16)(v), 'null or a number 0.25..16'),
}
BEIT_ARGS: Dict[str, tuple] = {
    **{k: BACKBONE_ARGS[k] for k in _SHARED if k != 'dynamic_img_size'},
    'use_abs_pos_emb': (_bool, 'true or false'),
    'use_rel_pos_bias': (_bool, 'true or false'),
    'use_shared_rel_pos_bias': (_bool, 'true or false'),
}
FAMILY_ARGS = {'timm.models.vision_transformer': BACKBONE_ARGS, 'timm.models.deit': BACKBONE_ARGS,
               'timm.models.eva': EVA_ARGS, 'timm.models.beit': BEIT_ARGS}
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


def _check_fields(where: str, values: Any, rules: Dict[str, tuple]) -> Dict[str, Any]:
    if not isinstance(values, dict):
        raise ConfigError(f'{where} must be an object, got {type(values).__name__}')
    for key, value in values.items():
        if key not in rules:
            shown = key if isinstance(key, str) and len(key) <= 40 else '(a long key)'
            raise ConfigError(f'{where}: {shown!r} is not an allowed key (allowed: {", ".join(sorted(rules))})')
        check, rule = rules[key]
        if not check(value):
            raise ConfigError(f'{where}.{key} must be {rule}')
    return dict(values)


def check_backbone(name: Any) -> str:
    """A timm Vision Transformer name (``vit_*``, ``deit_*``, ``eva02_*``, ``beit_*``, ..., optionally ``.tag``)
    of a family GQA Lens converts, and nothing else."""
    if not isinstance(name, str) or not BACKBONE_NAME.match(name):
        raise ConfigError('backbone must be a timm model name (lower-case letters, digits, _ and one optional .tag)')
    arch = name.split('.')[0]
    if not timm.is_model(arch):
        raise ConfigError(f'backbone {name!r} is not a timm model')
    module = timm.models.model_entrypoint(arch).__module__
    if module not in VIT_MODULES:
        raise ConfigError(f'backbone {name!r} is not a timm Vision Transformer')
    return name


def check_backbone_args(args: Any, backbone: Optional[str] = None) -> Dict[str, Any]:
    """``args`` against the allow-list of ``backbone``'s family (timm's VisionTransformer when not given)."""
    rules = BACKBONE_ARGS
    if backbone is not None:
        rules = FAMILY_ARGS[timm.models.model_entrypoint(check_backbone(backbone).split('.')[0]).__module__]
    return _check_fields('backbone_args', args, rules)


def check_grouping(grouping: Any) -> Dict[str, Any]:
    """``{variant, num_kv_heads, **options}``, each option checked by the policy's own schema
    (:attr:`~gqa_core.core.policies.GroupingPolicy.OPTIONS`)."""
    if not isinstance(grouping, dict):
        raise ConfigError('grouping must be an object')
    grouping = dict(grouping)
    variant, g = grouping.pop('variant', None), grouping.pop('num_kv_heads', None)
    if variant not in POLICIES:
        raise ConfigError(f'grouping.variant must be one of {sorted(POLICIES)}')
    if not (g is None or _int(1, 64)(g)):
        raise ConfigError('grouping.num_kv_heads must be null or an int 1..64')
    rules = {key: (option.accepts, option.rule()) for key, option in POLICIES[variant].OPTIONS.items()}
    return dict(variant=variant, num_kv_heads=g, **_check_fields('grouping', grouping, rules))


def check_preprocessing(pre: Any) -> Dict[str, Any]:
    """Bounded geometry: the resize a hostile ``crop_pct`` could blow up is capped too."""
    if not isinstance(pre, dict):
        raise ConfigError('preprocessing must be an object')
    size = pre.get('input_size')
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and size[0] == 3
            and all(_int(8, 4096)(s) for s in size[1:])):
        raise ConfigError('preprocessing.input_size must be [3, height, width] with sides 8..4096')
    for key in ('mean', 'std'):
        v = pre.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 3 and all(_float(-1e3, 1e3)(x) for x in v)):
            raise ConfigError(f'preprocessing.{key} must be three numbers')
    if any(x == 0 for x in pre['std']):
        raise ConfigError('preprocessing.std must not contain 0')
    if not _float(0.25, 1.0)(pre.get('crop_pct', 1.0)):
        raise ConfigError('preprocessing.crop_pct must be a number 0.25..1')
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


def check_budget(backbone: str, args: Dict[str, Any], budget: Budget) -> Dict[str, int]:
    """Count the model's parameters and tokens without allocating it (``meta`` device); refuse it when over
    ``budget``. Returns ``{'params': ..., 'tokens': ...}``."""
    try:
        with torch.device('meta'):
            model = timm.create_model(backbone.split('.')[0], pretrained=False, **args)
    except Exception as e:  # timm validates geometry with many exception types
        raise ConfigError(f'backbone {backbone!r} cannot be built with these backbone_args '
                          f'({type(e).__name__}: {str(e)[:200]})') from None
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
            isinstance(p, list) and len(p) <= 64 and all(_int(0, 63)(h) for h in p) for p in heads)):
        raise ConfigError('source_heads must be null or one list of head indices per layer')
    return heads


def check_norm_eps(eps: Any) -> Optional[float]:
    if eps is not None and not _float(1e-12, 1e-2)(eps):
        raise ConfigError('norm_eps must be null or a number 1e-12..0.01')
    return eps


def _text(limit: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and 0 < len(v) <= limit and v.isprintable()


# How the shared K/V heads were made (:mod:`gqa_core.core.calibrate`): shown on model cards and in the app.
CONVERSION_FIELDS: Dict[str, tuple] = {
    'init': (_one_of('mean', 'calibrated'), '"mean" or "calibrated"'),
    'images': (_int(1, 10**7), 'an int 1..10000000'),
    'data': (_text(100), 'at most 100 printable characters'),
    'steps_per_layer': (_int(0, 100_000), 'an int 0..100000'),
    'params': (_one_of('kv', 'all'), '"kv" or "all"'),
    'seconds': (_float(0, 10**7), 'a number of seconds'),
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
    if not _int(0, 100_000)(num_classes):
        raise ConfigError('num_classes must be an int 0..100000')
    return num_classes
