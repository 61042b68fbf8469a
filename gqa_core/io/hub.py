"""Saving and loading converted models: a folder or Hub repo with ``config.json``, ``model.safetensors`` and a
model card. Loading never unpickles; every failure names the repo and the problem.

The backbone is always rebuilt by timm (``timm.create_model(backbone, **backbone_args)``) and then converted,
so a saved model is exactly "timm ViT + grouping + weights". What is written is a
:class:`~gqa_core.io.config.GQALensConfig` read from the model itself: any converted timm ViT saves, however
it was built.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.convert import convert, kv_heads_label
from ..core.head_order import head_groups
from .config import FORMAT, GQALensConfig
from .credentials import Token
from .preprocessing import PREPROCESSING_KEYS
from .safe_config import Budget, ConfigError, check_backbone, check_backbone_args, check_budget, check_preprocessing
from . import transformers_format

__all__ = ['create_model', 'save_pretrained', 'from_pretrained', 'push_to_hub', 'from_timm', 'load_config', 'load_pretrained',
           'ModelLoadError', 'CONFIG_NAME', 'WEIGHTS_NAME']

CONFIG_NAME = 'config.json'
WEIGHTS_NAME = 'model.safetensors'
CARD_NAME = 'README.md'


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the source and what is wrong."""


def create_model(backbone: str, backbone_args: Optional[Dict[str, Any]] = None, variant: str = 'mha',
                 num_kv_heads: Optional[int] = None, pretrained: bool = False, **policy_options: Any) -> nn.Module:
    """``timm.create_model(backbone, **backbone_args)`` converted to ``variant`` (a shorthand: any converted timm
    ViT saves with :func:`save_pretrained`)."""
    model = timm.create_model(backbone, pretrained=pretrained, **dict(backbone_args or {}))
    convert(model, variant, num_kv_heads, **policy_options)
    return model


def from_timm(name: str, variant: str, num_kv_heads: Optional[int] = None, pretrained: bool = True,
              budget: Optional[Budget] = None, token: Union[Token, Callable[[str], Token]] = None,
              **policy_options: Any) -> nn.Module:
    """Training-free variant of a timm ViT, then converted: ``hf-hub:ORG/NAME[@REVISION]`` (a timm-format
    repo) or a timm name whose pretrained weights live on the Hub (``vit_small_patch16_224.augreg_in21k_ft_in1k``).

    The repo's ``config.json`` is data: its architecture must be a timm ViT and its ``model_args`` pass the
    allow-list (and ``budget``) before anything is built; weights load from ``model.safetensors`` only, through
    timm's own loader (its checkpoint filters resize position embeddings as usual). ``pretrained=False``
    builds a timm name with random weights. ``token``: as huggingface_hub's (``False`` sends none; see
    :mod:`gqa_core.io.credentials`), or a function of the repo id that gives it.
    """
    if not pretrained:
        try:
            model = timm.create_model(check_backbone(name))
        except ConfigError as e:
            raise ModelLoadError(str(e)) from None
    else:
        repo, revision = _timm_repo(name)
        if callable(token):
            token = token(repo)
        cfg = _read_json(repo, _fetch(repo, CONFIG_NAME, revision, local=False, token=token))
        if transformers_format.is_transformers_config(cfg):
            model = _from_transformers(repo, cfg, revision, False, budget, token)
            return convert(model, variant, num_kv_heads, **policy_options)
        try:
            backbone = check_backbone(cfg.get('architecture'))
            pretrained_cfg = cfg.get('pretrained_cfg', {})
            overlay = _timm_preprocessing(pretrained_cfg)  # first: an object, before num_classes is read from it
            args = check_backbone_args(cfg.get('model_args', {}), backbone, where='model_args')
            num_classes = cfg.get('num_classes', pretrained_cfg.get('num_classes'))
            if num_classes is not None:
                args.setdefault('num_classes', num_classes)
                # the repo's classifier size: timm drops a classifier whose size differs from its own cfg's
                overlay['num_classes'] = args['num_classes']
            args = check_backbone_args(args, backbone, where='model_args')
            if budget is not None:
                check_budget(backbone, args, budget, overlay.get('input_size'))
        except ConfigError as e:
            raise ModelLoadError(f'{repo}: {CONFIG_NAME}: {e}') from None
        weights = _fetch(repo, WEIGHTS_NAME, revision, local=False, token=token)
        _read_weights(repo, weights, floating_only=True)  # finite, floating: timm's loader would cast silently
        try:
            model = timm.create_model(backbone, pretrained=True, pretrained_cfg_overlay=dict(
                overlay, file=str(weights), source='file', custom_load=False, hf_hub_id=None, url=None), **args)
        except Exception as e:  # timm's loader raises many types; the user needs the repo and the cause
            raise ModelLoadError(f'{repo}: the weights could not be loaded into {backbone}: '
                                 f'{load_error_words(e)}') from None
    convert(model, variant, num_kv_heads, **policy_options)
    return model


def _short(e: Any, limit: int = 200) -> str:
    """``e``'s text on one line (every run of whitespace one space), cut to ``limit`` characters."""
    text = ' '.join(str(e).split())
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
    pre = {k: pretrained_cfg[k] for k in PREPROCESSING_KEYS if k in pretrained_cfg}
    if 'input_size' in pre:
        check_preprocessing(dict(dict(mean=[0.5] * 3, std=[0.5] * 3), **pre))
    return pre


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, labels: Optional[Sequence[str]] = None,
                    preprocessing: Optional[Dict[str, Any]] = None, metrics: Optional[Dict[str, Any]] = None,
                    dtype: Optional[torch.dtype] = None, card_extra: str = '', dataset: Optional[str] = None) -> Path:
    """Write ``config.json`` (read from the model: :meth:`GQALensConfig.of`), ``model.safetensors`` (floating
    tensors cast to ``dtype`` if given) and a model card. ``dataset``: what the model was trained on."""
    config = GQALensConfig.of(model, labels=list(labels) if labels is not None else None,
                              preprocessing=preprocessing, metrics=metrics, dataset=dataset)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    save_file(state, directory / WEIGHTS_NAME, metadata={'format': 'pt', 'gqa_lens': FORMAT})
    data = config.to_json(model, str(dtype or next(model.parameters()).dtype).removeprefix('torch.'))
    (directory / CONFIG_NAME).write_text(json.dumps(data, indent=2) + '\n')
    (directory / CARD_NAME).write_text(model_card(data, card_extra))
    return directory


def pooled_heads(config: Dict[str, Any]) -> str:
    """Which MHA heads each KV head was mean-pooled from, in words: consecutive (the paper's), or per layer the
    groups of the saved head order (``source_heads``, e.g. the head-order advisor's)."""
    heads, G = config.get('source_heads'), config['grouping']['num_kv_heads']
    if heads is None or not isinstance(G, int):  # a head order applies to one G for every block
        return 'mean-pooled from consecutive MHA heads' if isinstance(G, int) else \
            'each block\'s own K/V heads (repeated, or pooled in consecutive blocks, to its G)'
    layers = '; '.join(f'layer {i}: ' + ''.join('(' + ' '.join(map(str, group)) + ')' for group in head_groups(order, G))
                       for i, order in enumerate(heads))
    return f'mean-pooled from the MHA heads grouped per layer as {layers}'


def calibrated(config: Dict[str, Any]) -> str:
    """How calibration changed the pooled heads, in words ('' when the model was not calibrated)."""
    c = config.get('conversion') or {}
    if c.get('init') != 'calibrated':
        return ''
    moved = 'K/V projections' if c.get('params') == 'kv' else 'K/V, Q and output projections'
    data = f" of {c['data']}" if c.get('data') else ''
    return (f", then calibrated without labels on {c.get('images', '?')} images{data}: a closed-form fit, then "
            f"{c.get('steps_per_layer', 0)} optimisation steps a layer on the attention's {moved} against the MHA "
            f"model's block outputs ({c.get('seconds', 0):.0f} s)")


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

# {g['variant'].upper()} ViT ({config['backbone']}, G={kv_heads_label(g['num_kv_heads'])})

A timm `{config['backbone']}` whose attention is **{g['variant']}** with {kv_heads_label(g['num_kv_heads'])} key/value heads
({options}), from GQA Lens: "Beyond Uniform Query Distribution: Key-Driven Grouped Query Attention"
(arXiv 2408.08454).

- parameters: {config['params']:,}
- K/V cache per image (fp16): {config['kv_cache_bytes_fp16']:,} bytes
- K/V heads: {pooled_heads(config)}{calibrated(config)}
- trained on: {config.get('dataset') or 'not stated'}
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


def _fetch(source: str, filename: str, revision: Optional[str], local: bool = True, token: Token = None) -> Path:
    """``filename`` of a local folder (only when ``local``) or of a Hub repo, downloaded through the Hub cache
    with ``token`` (``False``: none, whatever the environment holds)."""
    if local and Path(source).is_dir():
        path = Path(source) / filename
        if not path.is_file():
            raise ModelLoadError(f'{source}: missing {filename}')
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    try:
        return Path(hf_hub_download(source, filename, revision=revision, token=token))
    except RepositoryNotFoundError:
        raise ModelLoadError(f'{source}: not found or private (no model repo of that name this server may '
                             'read)') from None
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


MAX_JSON_DEPTH = 32  # nesting a config.json may have: ours and timm's need 4, transformers' 3


class _DuplicateKey(ValueError):
    """An object in the JSON names one key twice (parsers disagree on which value wins)."""


def _unique_keys(pairs: Sequence[Tuple[str, Any]]) -> Dict[str, Any]:
    seen: Dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar: 0), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _read_json(source: str, path: Path, limit: int = 4 * 2**20) -> Dict[str, Any]:
    """``config.json`` parsed as untrusted data: bounded in size and nesting, every key once, an object; every
    refusal is one line naming the problem."""
    if path.stat().st_size > limit:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is over {limit // 2**20} MiB')
    try:
        config = json.loads(path.read_text(), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        key = str(e)
        raise ModelLoadError(f'{source}: {CONFIG_NAME} has the key {key if len(key) <= 40 else key[:39] + "…"!r} '
                             'twice') from None
    except RecursionError:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is nested too deeply (the limit is {MAX_JSON_DEPTH} '
                             'levels)') from None
    except UnicodeDecodeError:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is not valid JSON (not UTF-8 text)') from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is not valid JSON ({e.msg} at line {e.lineno} column '
                             f'{e.colno})') from None
    except ValueError:  # an integer literal longer than Python converts (sys.get_int_max_str_digits)
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is not valid JSON (a number with too many digits)') from None
    if json_depth(config) > MAX_JSON_DEPTH:
        raise ModelLoadError(f'{source}: {CONFIG_NAME} is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)')
    if not isinstance(config, dict):
        raise ModelLoadError(f'{source}: {CONFIG_NAME} does not hold an object')
    return config


def load_config(source: str, revision: Optional[str] = None, *, local: bool = True, budget: Optional[Budget] = None,
                token: Token = None) -> GQALensConfig:
    """The validated ``config.json`` of a GQA Lens folder or Hub repo, without building the model."""
    return _gqa_lens_config(source, _read_json(source, _fetch(source, CONFIG_NAME, revision, local, token)), budget)


def _gqa_lens_config(source: str, data: Dict[str, Any], budget: Optional[Budget]) -> GQALensConfig:
    try:
        return GQALensConfig.from_json(data, budget)
    except ConfigError as e:
        raise ModelLoadError(f'{source}: {CONFIG_NAME}: {e}') from None


# State whose +-Inf means "no clamp": timm's Gemma4ClippableLinear bounds and a grouped layer's copy of them
CLAMP_BOUNDS = ('.clip_bounds', '.input_min', '.input_max', '.output_min', '.output_max')


def _read_weights(source: str, path: Path, map_location: str = 'cpu', floating_only: bool = False) -> Dict:
    """The tensors of a safetensors file, every floating one finite (NaN or Inf weights compute nothing a person
    could read) but clamp bounds, where +-Inf means "no clamp" (:data:`CLAMP_BOUNDS`: Gemma4's clippable linears,
    never NaN); ``floating_only``: no tensor of another dtype (formats whose models hold no integer state)."""
    try:
        state = load_file(path, device=map_location)
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f'{source}: {WEIGHTS_NAME} is corrupt or truncated ({type(e).__name__})') from None
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            if floating_only:
                raise ModelLoadError(f'{source}: the weights in {WEIGHTS_NAME} do not fit the model: '
                                     f'{_short(name, 80)} is {_dtype(tensor)}, not floating point')
        elif not bool((~torch.isnan(tensor) if name.endswith(CLAMP_BOUNDS) else torch.isfinite(tensor)).all()):
            raise ModelLoadError(f'{source}: {WEIGHTS_NAME} holds values that are not finite (NaN or Inf) in '
                                 f'{_short(name, 80)}')
    return state


def _weights(source: str, revision: Optional[str], local: bool, token: Token, map_location: str = 'cpu',
             floating_only: bool = False) -> Dict:
    return _read_weights(source, _fetch(source, WEIGHTS_NAME, revision, local, token), map_location, floating_only)


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix('torch.')


def _names(keys: Sequence[str], most: int = 3) -> str:
    shown = ', '.join(_short(k, 80) for k in keys[:most])
    return shown + (f' and {len(keys) - most} more' if len(keys) > most else '')


_SIZE_MISMATCH = re.compile(r'size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from '
                            r'checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)')
_KEYS = re.compile(r'(Missing|Unexpected) key\(s\) in state_dict: ((?:"[^"]*"(?:, )?)+)')
_QUOTED = re.compile(r'"([^"]*)"')


def load_error_words(error: BaseException) -> str:
    """What torch's ``load_state_dict`` error says, in the words :func:`check_fit` uses, on one line (timm's
    loader raises it for timm-format repos); other errors: their own text on one line."""
    text = str(error)
    problems = [f'{kind.lower()} {_names(_QUOTED.findall(keys))}' for kind, keys in _KEYS.findall(text)]
    problems += [f'{_short(name, 80)} has shape {got}, the model needs {want}'
                 for name, got, want in _SIZE_MISMATCH.findall(text)]
    if not problems:
        return f'{type(error).__name__}: {_short(error)}'
    more = f' (and {len(problems) - 3} more problems)' if len(problems) > 3 else ''
    return '; '.join(problems[:3]) + more


def check_fit(source: str, model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Refuse weights that do not fit ``model`` exactly, in one line naming the tensors: missing or unexpected
    names, other shapes, or another kind of dtype (an integer or boolean tensor where the model holds floating
    point would be cast silently by ``load_state_dict``). Shapes are compared for parameters only: buffers may
    be resized by their module when loaded (DGQA's allocation history grows), and ``load_state_dict`` checks
    them."""
    expected = model.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f'missing {_names(missing)}')
    if unexpected:
        problems.append(f'unexpected {_names(unexpected)}')
    for name, tensor in state.items():
        want = expected.get(name)
        if want is None:
            continue
        if want.is_floating_point() and not tensor.is_floating_point():
            problems.append(f'{_short(name, 80)} is {_dtype(tensor)}, not floating point')
        elif not want.is_floating_point() and tensor.dtype != want.dtype:
            problems.append(f'{_short(name, 80)} is {_dtype(tensor)}, not {_dtype(want)}')
        elif name in parameters and tuple(tensor.shape) != tuple(want.shape):
            problems.append(f'{_short(name, 80)} has shape {list(tensor.shape)}, the config needs '
                            f'{list(want.shape)}')
    if problems:
        more = f' (and {len(problems) - 3} more problems)' if len(problems) > 3 else ''
        raise ModelLoadError(f'{source}: the weights in {WEIGHTS_NAME} do not fit the config: '
                             + '; '.join(problems[:3]) + more)


def _from_transformers(source: str, data: Dict[str, Any], revision: Optional[str], local: bool,
                       budget: Optional[Budget], token: Token) -> nn.Module:
    """The timm model (MHA) equivalent to a transformers-format repo or folder
    (:mod:`gqa_core.io.transformers_format`): config checked and the size counted before any weight is fetched."""
    try:
        described = transformers_format.read_config(data)
        if budget is not None:
            transformers_format.check_size(described, budget)
        return transformers_format.build(described, _weights(source, revision, local, token, floating_only=True))
    except ConfigError as e:
        raise ModelLoadError(f'{source}: {e}') from None


def from_pretrained(source: str, revision: Optional[str] = None, map_location: str = 'cpu', *, local: bool = True,
                    budget: Optional[Budget] = None, token: Token = None) -> nn.Module:
    """Rebuild a saved model from a folder or a Hub repo id; strict: every tensor must be present and fit.

    ``local=False`` never reads a local folder (for repo ids typed by untrusted users); ``budget`` refuses
    configs describing a model over it before anything is built; ``token`` as huggingface_hub's (``False``: send
    none, for downloads strangers cause: :mod:`gqa_core.io.credentials`). The saved preprocessing and labels land in
    the model's timm ``pretrained_cfg`` (where timm's ``resolve_data_config`` finds them). A transformers-format
    repo or folder (ViT, DeiT, DINOv2, DINOv2 with registers, DINOv3) loads as the equivalent timm model with
    multi-head attention (G = H).
    """
    return load_pretrained(source, revision, map_location, local=local, budget=budget, token=token)[0]


def load_pretrained(source: str, revision: Optional[str] = None, map_location: str = 'cpu', *, local: bool = True,
                    budget: Optional[Budget] = None, token: Token = None) -> Tuple[nn.Module, GQALensConfig]:
    """:func:`from_pretrained`'s model with its typed config, validated once from one read of ``config.json``
    (a transformers-format repo's config is the one its timm equivalent saves), so that whoever holds the model
    never has to derive it again."""
    data = _read_json(source, _fetch(source, CONFIG_NAME, revision, local, token))
    if transformers_format.is_transformers_config(data):
        model = convert(_from_transformers(source, data, revision, local, budget, token), 'mha').to(map_location)
        return model, GQALensConfig.of(model)
    config = _gqa_lens_config(source, data, budget)
    try:
        model = config.build()
    except (ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ModelLoadError(f'{source}: bad config: {_short(e)}') from None
    state = _weights(source, revision, local, token, map_location)
    check_fit(source, model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f'{source}: the weights do not fit the config: {load_error_words(e)}') from None
    except ValueError as e:  # a module refused what it was given (a DGQA allocation that is not one)
        raise ModelLoadError(f'{source}: {WEIGHTS_NAME}: {_short(e)}') from None
    return model, config


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
