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

from .convert import convert, grouping_config, kv_cache_bytes

__all__ = ['create_model', 'save_pretrained', 'from_pretrained', 'push_to_hub', 'from_timm', 'load_config',
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
              **policy_options: Any) -> nn.Module:
    """Training-free variant of any timm ViT, local or on the Hub (``hf-hub:timm/vit_small_patch16_224...``),
    loaded through timm's own loader, then converted."""
    try:
        model = timm.create_model(name, pretrained=pretrained)
    except Exception as e:  # timm / hub raise many types; the user needs the name and the cause
        raise ModelLoadError(f'could not load timm model {name!r}: {type(e).__name__}: {e}') from e
    convert(model, variant, num_kv_heads, **policy_options)
    model.gqa_lens_backbone = dict(backbone=name.removeprefix('hf-hub:'), backbone_args={},
                                   timm_pretrained=name)
    return model


def _preprocessing(model: nn.Module) -> Dict[str, Any]:
    cfg = timm.data.resolve_data_config({}, model=model)
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
        num_classes=int(model.num_classes),
        labels=list(labels) if labels is not None else None,
        preprocessing=preprocessing or _preprocessing(model),
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
from gqa_core.hub import from_pretrained
model = from_pretrained("<this repo id or folder>").eval()
```
{extra}
"""


def _fetch(source: str, filename: str, revision: Optional[str]) -> Path:
    local = Path(source)
    if local.is_dir():
        path = local / filename
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
        raise ModelLoadError(f'{source}: download of {filename} failed: {e}') from None
    except ValueError as e:  # malformed repo ids
        raise ModelLoadError(f'{source}: not a folder or a valid Hub repo id ({e})') from None


def load_config(source: str, revision: Optional[str] = None) -> Dict[str, Any]:
    path = _fetch(source, CONFIG_NAME, revision)
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is not valid JSON ({e})') from None
    missing = [k for k in ('backbone', 'backbone_args', 'grouping') if k not in config]
    if not isinstance(config, dict) or missing:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is not a GQA Lens config (missing {missing})')
    return config


def from_pretrained(source: str, revision: Optional[str] = None, map_location: str = 'cpu') -> nn.Module:
    """Rebuild a saved model from a folder or a Hub repo id; strict: every tensor must be present and fit."""
    config = load_config(source, revision)
    grouping = dict(config['grouping'])
    variant, num_kv_heads = grouping.pop('variant', None), grouping.pop('num_kv_heads', None)
    try:
        args = dict(config['backbone_args'])
        args.setdefault('num_classes', config.get('num_classes', 1000))
        model = create_model(config['backbone'], args, variant, num_kv_heads, **grouping)
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ModelLoadError(f'{source}: bad config: {e}') from None
    weights = _fetch(source, WEIGHTS_NAME, revision)
    try:
        state = load_file(weights, device=map_location)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f'{source}: {WEIGHTS_NAME} is corrupt or truncated ({e})') from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f'{source}: weights do not fit the config: {e}') from None
    model.gqa_lens_config = config
    return model


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
