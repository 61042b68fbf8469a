"""Saving and loading converted models: a folder or Hub repo with ``config.json``, ``model.safetensors`` and a
model card. Loading never unpickles; every failure names the repo and the problem.

The backbone is always rebuilt by timm (``timm.create_model(backbone, **backbone_args)``) and then converted,
so a saved model is exactly "timm ViT + grouping + weights".
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.convert import convert, gqa_layers, grouping_config, kv_cache_bytes, source_heads
from ..core.grouping import check_permutations
from .safe_config import (Budget, ConfigError, check_backbone, check_backbone_args, check_budget, check_config,
                          check_preprocessing)

__all__ = ['create_model', 'save_pretrained', 'from_pretrained', 'push_to_hub', 'from_timm', 'load_config',
           'model_preprocessing',
           'ModelLoadError', 'CONFIG_NAME', 'WEIGHTS_NAME']

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CARD_NAME = 'README.md'
FORMAT = 'gqa-lens/1'


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the source and what is wrong."""


def create_model(backbone: str, backbone_args: Optional[Dict[str, Any]] = None, variant: str = 'mha',
                 num_kv_heads: Optional[int] = None, pretrained: bool = False, **policy_options: Any) -> nn.Module:
    """A timm ViT built from ``backbone`` + ``backbone_args``, converted to ``variant``; it remembers how it was
    built, so :func:`save_pretrained` can write a complete config."""
    backbone_args = dict(backbone_args or {})
    model = timm.create_model(backbone, pretrained=pretrained, **backbone_args)
    convert(model, variant, num_kv_heads, **policy_options)
    model.gqa_lens_backbone = dict(backbone=backbone, backbone_args=backbone_args)
    return model


def from_timm(name: str, variant: str, num_kv_heads: Optional[int] = None, pretrained: bool = True,
              budget: Optional[Budget] = None, **policy_options: Any) -> nn.Module:
    """Training-free variant of a timm ViT, then converted: ``hf-hub:ORG/NAME[@REVISION]`` (a timm-format
    repo) or a timm name whose pretrained weights live on the Hub (``vit_small_patch16_224.augreg_in21k_ft_in1k``).

    The repo's ``config.json`` is data: its architecture must be a timm ViT and its ``model_args`` pass the
    allow-list (and ``budget``) before anything is built; weights load from ``model.safetensors`` only, through
    timm's own loader (its checkpoint filters resize position embeddings as usual). ``pretrained=False``
    builds a timm name with random weights.
    """
    if not pretrained:
        try:
            model = timm.create_model(check_backbone(name))
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
        backbone, args, extra = name, {}, {}
    else:
        repo, revision = _timm_repo(name)
        cfg = _read_json(repo, _fetch(repo, CONFIG_NAME, revision, local=False))
        try:
            backbone = check_backbone(cfg.get('architecture'))
            args = check_backbone_args(cfg.get('model_args', {}))
            num_classes = cfg.get('num_classes', cfg.get('pretrained_cfg', {}).get('num_classes'))
            if num_classes is not None:
                args.setdefault('num_classes', num_classes)
            args = check_backbone_args(args)
            overlay = _timm_preprocessing(cfg.get('pretrained_cfg', {}))
            if budget is not None:
                check_budget(backbone, args, budget)
        except ConfigError as e:
            raise ModelLoadError(f'{repo}: {CONFIG_NAME}: {e}') from None
        weights = _fetch(repo, WEIGHTS_NAME, revision, local=False)
        try:
            model = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=dict(
                overlay, file=str(weights), source='file', custom_load=False, hf_hub_id=None, url=None), **args)
        except Exception as e:  # timm's loader raises many types; the user needs the repo and the cause
            raise ModelLoadError(f'{repo}: the weights could not be loaded into {backbone} '
                                 f'({type(e).__name__}: {_short(e)})') from None
        extra = dict(timm_pretrained=f'hf-hub:{repo}' + (f'@{revision}' if revision else ''))
    convert(model, variant, num_kv_heads, **policy_options)
    model.gqa_lens_backbone = dict(backbone=backbone, backbone_args=args, **extra)
    return model


def _short(e: BaseException, limit: int = 200) -> str:
    text = str(e)
    return text if len(text) <= limit else text[:limit] + '…'


def _timm_repo(name: str) -> tuple:
    """``(repo_id, revision)`` of a timm-format Hub repo from ``hf-hub:ORG/NAME[@REV]`` or a timm model name."""
    if name.startswith('hf-hub:'):
        repo, _, revision = name[len('hf-hub:'):].partition('@')
        return repo, revision or None
    try:
        arch = check_backbone(name)
    except ConfigError as e:
        raise ModelLoadError(str(e)) from None
    cfg = timm.models.get_pretrained_cfg(arch)
    hub_id = getattr(cfg, 'hf_hub_id', None) if cfg is not None else None
    if not hub_id:
        raise ModelLoadError(f'{name}: timm has no Hub weights for it (GQA Lens loads safetensors from the Hub only)')
    return hub_id, None


def _timm_preprocessing(pretrained_cfg: Any) -> Dict[str, Any]:
    """The preprocessing fields of a timm ``pretrained_cfg``, validated; everything else in it is dropped."""
    if not isinstance(pretrained_cfg, dict):
        raise ConfigError('pretrained_cfg must be an object')
    keys = ('input_size', 'mean', 'std', 'crop_pct', 'interpolation')
    pre = {k: pretrained_cfg[k] for k in keys if k in pretrained_cfg}
    if 'input_size' in pre:
        check_preprocessing(dict(dict(mean=[0.5] * 3, std=[0.5] * 3), **pre))
    return pre


def model_preprocessing(model: nn.Module) -> Dict[str, Any]:
    """timm's data config for ``model``, with the input size the model was really built for (its patch
    embedding's ``img_size``, which may be non-square or differ from the pretrained default)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        cfg['input_size'] = (int(cfg['input_size'][0]), int(img_size[0]), int(img_size[1]))
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, labels: Optional[Sequence[str]] = None,
                    preprocessing: Optional[Dict[str, Any]] = None, metrics: Optional[Dict[str, Any]] = None,
                    dtype: Optional[torch.dtype] = None, card_extra: str = '') -> Path:
    """Write ``config.json``, ``model.safetensors`` (floating tensors cast to ``dtype`` if given) and a card."""
    spec = getattr(model, 'gqa_lens_backbone', None)
    if spec is None:
        raise ValueError('model does not know its timm backbone; build it with gqa_core.hub.create_model() '
                         'or from_timm(), or set model.gqa_lens_backbone = {"backbone": ..., "backbone_args": {...}}')
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    save_file(state, directory / WEIGHTS_NAME, metadata={'format': 'pt', 'gqa_lens': FORMAT})
    config = dict(
        format=FORMAT,
        backbone=spec['backbone'],
        backbone_args=spec['backbone_args'],
        grouping=grouping_config(model),
        source_heads=source_heads(model),
        num_classes=int(model.num_classes),
        labels=list(labels) if labels is not None else None,
        preprocessing=preprocessing or model_preprocessing(model),
        params=sum(p.numel() for p in model.parameters()),
        kv_cache_bytes_fp16=kv_cache_bytes(model),
        metrics=metrics or {},
        weights_dtype=str(dtype or next(model.parameters()).dtype).removeprefix('torch.'),
    )
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + '\n')
    (directory / CARD_NAME).write_text(model_card(config, card_extra))
    return directory


def model_card(config: Dict[str, Any], extra: str = '') -> str:
    g = config['grouping']
    metrics = config.get('metrics') or {}
    rows = '\n'.join(f'| {k} | {v} |' for k, v in metrics.items()) or '| (none recorded) | |'
    options = ', '.join(f'{k}={v!r}' for k, v in g.items() if k not in ('variant', 'num_kv_heads'))
    return f"""---
library_name: gqa-lens
pipeline_tag: image-classification
tags:
- gqa-lens
- timm
- grouped-query-attention
- {g['variant']}
---

# {g['variant'].upper()} ViT ({config['backbone']}, G={g['num_kv_heads']})

A timm `{config['backbone']}` whose attention is **{g['variant']}** with {g['num_kv_heads']} key/value heads
({options}), from GQA Lens: "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention"
(arXiv 2408.08454).

- parameters: {config['params']:,}
- K/V cache per image (fp16): {config['kv_cache_bytes_fp16']:,} bytes
- classes: {config['num_classes']}; input {config['preprocessing'].get('input_size')}

| metric | value |
|---|---|
{rows}

## Load

```python
from gqa_core import from_pretrained
model = from_pretrained("<this repo id or folder>").eval()
```
{extra}
"""


def _fetch(source: str, filename: str, revision: Optional[str], local: bool = True) -> Path:
    """``filename`` of a local folder (only when ``local``) or of a Hub repo, downloaded through the Hub cache."""
    if local and Path(source).is_dir():
        path = Path(source) / filename
        if not path.is_file():
            raise ModelLoadError(f'{source}: missing {filename}')
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        return Path(hf_hub_download(source, filename, revision=revision))
    except RepositoryNotFoundError:
        raise ModelLoadError(f'{source}: no such model repo on the Hub (or it is private)') from None
    except RevisionNotFoundError:
        raise ModelLoadError(f'{source}: revision {revision!r} not found') from None
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise ModelLoadError(f'{source}: not a local folder, and not in the Hub cache while offline '
                             '(HF_HUB_OFFLINE is set or the Hub cannot be reached)') from None
    except EntryNotFoundError:
        hint = (' GQA Lens loads safetensors only and never unpickles .bin/.pt files.'
                if filename == WEIGHTS_NAME else '')
        raise ModelLoadError(f'{source}: the repo has no {filename}.{hint}') from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f'{source}: download of {filename} failed ({type(e).__name__})') from None
    except ValueError:  # malformed repo ids
        raise ModelLoadError(f'{source}: not ' + ('a folder or ' if local else '') + 'a valid Hub repo id') from None


def _read_json(source: str, path: Path, limit: int = 4 * 2**20) -> Dict[str, Any]:
    if path.stat().st_size > limit:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is over {limit // 2**20} MiB')
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is not valid JSON ({e.__class__.__name__})') from None
    if not isinstance(config, dict):
        raise ModelLoadError(f'{source}: {CONFIG_NAME} does not hold an object')
    return config


def load_config(source: str, revision: Optional[str] = None, *, local: bool = True,
                budget: Optional[Budget] = None) -> Dict[str, Any]:
    """The validated ``config.json`` of a folder or Hub repo (see :mod:`gqa_core.safe_config`)."""
    config = _read_json(source, _fetch(source, CONFIG_NAME, revision, local))
    missing = [k for k in ('backbone', 'backbone_args', 'grouping') if k not in config]
    if missing:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is not a GQA Lens config (missing {missing})')
    try:
        return check_config(config, budget)
    except ConfigError as e:
        raise ModelLoadError(f'{source}: {CONFIG_NAME}: {e}') from None


def from_pretrained(source: str, revision: Optional[str] = None, map_location: str = 'cpu', *, local: bool = True,
                    budget: Optional[Budget] = None) -> nn.Module:
    """Rebuild a saved model from a folder or a Hub repo id; strict: every tensor must be present and fit.

    ``local=False`` never reads a local folder (for repo ids typed by untrusted users); ``budget`` refuses
    configs describing a model over it before anything is built.
    """
    config = load_config(source, revision, local=local, budget=budget)
    grouping = dict(config['grouping'])
    variant, num_kv_heads = grouping.pop('variant', None), grouping.pop('num_kv_heads', None)
    try:
        args = dict(config['backbone_args'])
        args.setdefault('num_classes', config.get('num_classes', 1000))
        model = create_model(config['backbone'], args, variant, num_kv_heads, **grouping)
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ModelLoadError(f'{source}: bad config: {_short(e)}') from None
    weights = _fetch(source, WEIGHTS_NAME, revision, local)
    try:
        state = load_file(weights, device=map_location)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f'{source}: {WEIGHTS_NAME} is corrupt or truncated ({type(e).__name__})') from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f'{source}: weights do not fit the config: {_short(e, 600)}') from None
    _set_source_heads(model, config.get('source_heads'), source)
    model.gqa_lens_config = config
    return model


def _set_source_heads(model: nn.Module, perms: Any, source: str) -> None:
    """Which MHA head each head position came from (an advised grouping), checked against the model."""
    if perms is None:
        return
    layers = gqa_layers(model)
    try:
        perms = check_permutations(perms, len(layers), layers[0].num_heads)
    except ValueError as e:
        raise ModelLoadError(f'{source}: {CONFIG_NAME}: source_heads: {e}') from None
    for layer, perm in zip(layers, perms):
        layer.source_heads = perm


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool = False, token: Optional[str] = None,
                commit_message: str = 'Upload GQA Lens model', **save_kwargs: Any) -> str:
    """Save to a temporary folder and upload it as one commit; returns the commit URL."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, **save_kwargs)
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(info)
