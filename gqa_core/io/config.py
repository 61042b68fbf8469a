"""The typed config of a GQA Lens model: what ``config.json`` holds, how it is validated and how it is read
back from a model.

A loaded model comes with its config: :func:`~gqa_core.io.hub.load_pretrained` returns the one it validated, and
whoever holds the model (the app's registry, the ZeroGPU jobs) carries it. For a model built or converted in
code, :meth:`GQALensConfig.of` reads it from the model once -- the timm architecture from timm's
``pretrained_cfg``, the geometry from its modules (checked by rebuilding it on the ``meta`` device), the
grouping from its attention layers, preprocessing and labels from ``pretrained_cfg`` -- so a deep copy, a
conversion or a model made with ``timm.create_model`` is always described truthfully.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import timm
import torch
from torch import nn

from ..core.convert import convert, grouping_config, kv_cache_bytes, source_heads
from ..core.head_order import check_permutations
from ..core.rules import Rule, check, optional, text
from ..core.vit import gqa_layers, norm_eps, set_norm_eps, vit_geometry
from .preprocessing import model_preprocessing
from .safe_config import (Budget, ConfigError, check_backbone, check_backbone_args, check_budget, check_conversion,
                          check_grouping, check_labels, check_norm_eps, check_num_classes, check_preprocessing, check_source_heads)

__all__ = ['GroupingSpec', 'GQALensConfig', 'FORMAT', 'backbone_of', 'conversion_record']

FORMAT = 'gqa-lens/1'
METRICS = Rule(lambda v: isinstance(v, dict) and len(v) <= 100, 'an object of at most 100 entries')
DATASET = optional(text(100), says='null or a name of at most 100 printable characters')


@dataclass(frozen=True)
class GroupingSpec:
    """Which policy every layer uses: its name, G (one for every block, or one per block), and its options (each
    checked by the policy's schema)."""
    variant: str
    num_kv_heads: Optional[Union[int, List[int]]]
    options: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any) -> 'GroupingSpec':
        checked = check_grouping(data)
        return cls(checked.pop('variant'), checked.pop('num_kv_heads'), checked)

    def to_dict(self) -> Dict[str, Any]:
        return dict(variant=self.variant, num_kv_heads=self.num_kv_heads, **self.options)


@dataclass
class GQALensConfig:
    """``config.json`` of a saved model. ``backbone_args`` rebuild it with ``timm.create_model``; the rest is
    applied on top (conversion, head order, preprocessing, labels). ``dataset`` names what it was trained on
    (shown to people; None when unknown); ``metrics`` are the trainer's record."""
    backbone: str
    backbone_args: Dict[str, Any]
    grouping: GroupingSpec
    num_classes: int
    preprocessing: Optional[Dict[str, Any]] = None
    labels: Optional[List[str]] = None
    source_heads: Optional[List[List[int]]] = None
    metrics: Dict[str, Any] = field(default_factory=dict)
    dataset: Optional[str] = None
    norm_eps: Optional[float] = None  # every LayerNorm's epsilon, when it is not what timm's constructor sets
    conversion: Optional[Dict[str, Any]] = None  # how the K/V heads were made (init, calibration images, work)

    # -- reading and writing -------------------------------------------------------------------------------
    @classmethod
    def from_json(cls, data: Any, budget: Optional[Budget] = None) -> 'GQALensConfig':
        """Validate a parsed ``config.json`` (untrusted data); with ``budget``, also small enough to build."""
        if not isinstance(data, dict):
            raise ConfigError('config.json must hold an object')
        missing = [k for k in ('backbone', 'backbone_args', 'grouping') if k not in data]
        if missing:
            raise ConfigError(f'not a GQA Lens config (missing {missing})')
        args = check_backbone_args(data['backbone_args'], check_backbone(data['backbone']))
        num_classes = check_num_classes(data.get('num_classes', args.get('num_classes', 1000)))
        metrics = check('metrics', data.get('metrics') or {}, METRICS, ConfigError)
        dataset = check('dataset', data.get('dataset'), DATASET, ConfigError)
        config = cls(
            backbone=check_backbone(data['backbone']),
            backbone_args=args,
            grouping=GroupingSpec.from_dict(data['grouping']),
            num_classes=num_classes,
            preprocessing=check_preprocessing(data['preprocessing']) if data.get('preprocessing') else None,
            labels=check_labels(data.get('labels'), num_classes),
            source_heads=check_source_heads(data.get('source_heads')),
            metrics=dict(metrics),
            dataset=dataset,
            norm_eps=check_norm_eps(data.get('norm_eps')),
            conversion=check_conversion(data.get('conversion')),
        )
        if budget is not None:
            check_budget(config.backbone, config.model_args(), budget,
                         (config.preprocessing or {}).get('input_size'))
        return config

    def to_json(self, model: Optional[nn.Module] = None, weights_dtype: Optional[str] = None) -> Dict[str, Any]:
        """The ``config.json`` object; with ``model``, also its size figures (read by people, not by loading)."""
        out: Dict[str, Any] = dict(
            format=FORMAT, backbone=self.backbone, backbone_args=self.backbone_args,
            grouping=self.grouping.to_dict(), source_heads=self.source_heads, num_classes=self.num_classes,
            labels=self.labels, preprocessing=self.preprocessing, dataset=self.dataset,
        )
        if self.norm_eps is not None:
            out['norm_eps'] = self.norm_eps
        if self.conversion is not None:
            out['conversion'] = self.conversion
        if model is not None:
            out.update(params=sum(p.numel() for p in model.parameters()), kv_cache_bytes_fp16=kv_cache_bytes(model))
        out['metrics'] = self.metrics
        if weights_dtype is not None:
            out['weights_dtype'] = weights_dtype
        return out

    @property
    def geometry(self) -> Optional[tuple]:
        """``(layers, heads)`` as the config states them (None when it leaves them to timm's defaults)."""
        depth, heads = self.backbone_args.get('depth'), self.backbone_args.get('num_heads')
        return (int(depth), int(heads)) if depth is not None and heads is not None else None

    def model_args(self) -> Dict[str, Any]:
        return dict(self.backbone_args, num_classes=self.num_classes)

    # -- the model it describes ----------------------------------------------------------------------------
    def build(self) -> nn.Module:
        """The timm model with this config's geometry, grouping, head order, preprocessing and labels (random
        weights: load a state dict next)."""
        overlay = dict(self.preprocessing or {}, num_classes=self.num_classes)
        if self.labels is not None:
            overlay['label_names'] = list(self.labels)
        overlay = {k: tuple(v) if isinstance(v, list) and k != 'label_names' else v for k, v in overlay.items()}
        model = timm.create_model(self.backbone, pretrained=False, pretrained_cfg_overlay=overlay,
                                  **self.model_args())
        if self.norm_eps is not None:
            set_norm_eps(model, self.norm_eps)
        g = self.grouping
        convert(model, g.variant, g.num_kv_heads, **g.options)
        model.gqa_conversion = dict(self.conversion) if self.conversion is not None else None
        if self.source_heads is not None:
            layers = gqa_layers(model)
            try:
                perms = check_permutations(self.source_heads, len(layers), layers[0].num_heads)
            except ValueError as e:
                raise ValueError(f'source_heads: {e}') from None
            for layer, perm in zip(layers, perms):
                layer.source_heads = perm
        return model

    @classmethod
    def of(cls, model: nn.Module, *, labels: Optional[List[str]] = None,
           preprocessing: Optional[Dict[str, Any]] = None, metrics: Optional[Dict[str, Any]] = None,
           dataset: Optional[str] = None, conversion: Optional[Dict[str, Any]] = None) -> 'GQALensConfig':
        """Read a converted timm ViT's config from the model itself (see the module doc); ``labels`` and
        ``preprocessing`` given here win over what its ``pretrained_cfg`` says; ``conversion`` (how its K/V heads
        were made) defaults to what :func:`~gqa_core.core.convert.convert` left on the model."""
        backbone, args, eps = backbone_of(model)
        grouping = dict(grouping_config(model))
        spec = GroupingSpec(grouping.pop('variant'), grouping.pop('num_kv_heads'), grouping)
        saved_labels = model.pretrained_cfg.get('label_names') if hasattr(model, 'pretrained_cfg') else None
        labels = labels if labels is not None else saved_labels
        return cls(backbone, args, spec, int(model.num_classes), preprocessing or model_preprocessing(model),
                   list(labels) if labels is not None and len(labels) == model.num_classes else None,
                   source_heads(model), dict(metrics or {}), dataset, eps,
                   check_conversion(conversion if conversion is not None else conversion_record(model)))


def conversion_record(model: nn.Module) -> Optional[Dict[str, Any]]:
    """How the model's K/V heads were made (``gqa_conversion``, left by ``convert`` or by loading), or None."""
    return getattr(model, 'gqa_conversion', None)


def backbone_of(model: nn.Module) -> tuple:
    """``(timm name, constructor args, norm eps)`` that rebuild ``model``: the name from its ``pretrained_cfg``,
    the args read from its modules, checked by building that model on the ``meta`` device and comparing every
    parameter's shape and every module's class; the LayerNorm epsilon when the model's (one for all) differs
    from the rebuilt one's (e.g. 1e-12 in models read from transformers), else None. ``ValueError`` when they
    differ otherwise (a model timm's constructor cannot express)."""
    arch = getattr(model, 'pretrained_cfg', {}).get('architecture')
    if not arch:
        raise ValueError(f'{type(model).__name__} has no timm pretrained_cfg naming its architecture; build it '
                         'with timm.create_model(...)')
    args = vit_geometry(model)
    try:
        args = check_backbone_args(args, arch)
        with torch.device('meta'):
            rebuilt = timm.create_model(arch, pretrained=False, **args)
        if gqa_layers(model):
            g = dict(grouping_config(model))
            convert(rebuilt, g.pop('variant'), g.pop('num_kv_heads'), **g)
    except (ConfigError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f'{arch}: cannot describe this model by its timm constructor ({e})') from None
    mine = _layout(model)
    theirs = _layout(rebuilt)
    for name in sorted(set(mine) | set(theirs)):
        if mine.get(name) != theirs.get(name):
            raise ValueError(f'{arch} rebuilt from {args} differs from this model at {name}: '
                             f'{theirs.get(name)} instead of {mine.get(name)}')
    eps = set(norm_eps(model).values())
    if len(eps) > 1:
        raise ValueError(f'{arch}: its LayerNorms use different epsilons {sorted(eps)}; GQA Lens saves one')
    own = next(iter(eps), None)
    return arch, args, (own if own is not None and {own} != set(norm_eps(rebuilt).values()) else None)


# Training-only modules that are the identity at inference: a model trained with stochastic depth saves (and
# loads) as the same model without it.
_INFERENCE_IDENTITY = {'DropPath': 'Identity'}


def _layout(model: nn.Module) -> Dict[str, Any]:
    """Every module's class (training-only identities as ``Identity``) and every parameter's shape, by name."""
    layout: Dict[str, Any] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        layout[name] = _INFERENCE_IDENTITY.get(kind, kind)
        for pname, p in module.named_parameters(recurse=False):
            layout[f'{name}.{pname}'] = tuple(p.shape)
    return layout
