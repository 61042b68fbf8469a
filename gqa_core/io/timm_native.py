"""Give back to timm: a static-GQA model saved in timm's own format, which plain timm loads with no GQA Lens.

timm 1.0.31 expresses grouped-query attention in one place: ``AttentionRope(num_kv_heads=G, qkv_fused=False)``,
which ``Eva`` (and so EVA-02, DINOv3, Perception Encoder, Sapiens2) and ``NaFlexVit`` (in its ``EvaBlock``
blocks) build with ``attn_type='rope'`` and ``num_kv_heads`` (one G, or one per block); query head h reads KV head
h // (H / G) -- GQA Lens's consecutive static grouping. So a model qualifies when it is an ``Eva`` or a
``NaFlexVit`` and every layer's grouping is fixed and uniform (``gqa``, or ``mha``; ``pgqa`` only at G = H). timm's
other ViTs (``VisionTransformer``, ``Beit``, ...) take no ``num_kv_heads``, and the key-driven policies (KDGQA,
DGQA) choose their groups per image or per step: neither can be written for plain timm.

    save_timm_native(model, 'out/')  # model.safetensors + timm_args.json + README.md
    timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file='out/model.safetensors', **overlay),
                      **args)

``overlay`` carries the classifier's size (timm drops a classifier whose size differs from its own pretrained
config's) and the preprocessing the model was trained with.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Tuple

import timm
import torch
from safetensors.torch import save_file
from timm.models.eva import Eva
from timm.models.naflexvit import NaFlexVit
from torch import nn

from ..core.attention import GroupedQueryAttention, _qkv_tensors
from ..core.vit import blocks_of, check_vit, set_norm_eps
from .config import backbone_of

__all__ = ['timm_native', 'save_timm_native']


def _check_expressible(vit: nn.Module) -> None:
    if not isinstance(vit, (Eva, NaFlexVit)):
        raise ValueError(f'{type(vit).__name__}: timm expresses grouped-query attention only in its Eva and '
                         'NaFlexVit models (AttentionRope with num_kv_heads); this model cannot be written for plain '
                         'timm')
    for index, block in enumerate(blocks_of(vit)):
        attn = block.attn
        if not isinstance(attn, GroupedQueryAttention):
            continue  # timm's own layer already
        policy = attn.policy
        if not policy.consecutive_at_inference:
            raise ValueError(f'block {index}: {policy.name} chooses its groups per image or per step; timm\'s '
                             'num_kv_heads is a fixed, uniform grouping (convert to gqa to export)')
        if attn.relative_position_bias_table is not None:
            raise ValueError(f'block {index}: a relative position bias has no place in timm\'s AttentionRope')


def timm_native(model: nn.Module) -> Tuple[nn.Module, str, Dict[str, Any]]:
    """``(timm model, architecture, constructor args)``: the same function as ``model`` built by timm alone, its
    attention timm's ``AttentionRope`` with each block's G."""
    vit = check_vit(model)
    _check_expressible(vit)
    arch, args, eps = backbone_of(vit)
    kv_heads = [int(getattr(b.attn, 'num_kv_heads', None) or b.attn.num_heads) for b in blocks_of(vit)]
    args = dict(args, attn_type='rope', qkv_fused=False,
                num_kv_heads=kv_heads[0] if len(set(kv_heads)) == 1 else kv_heads)
    native = timm.create_model(arch, pretrained=False, **args)
    if eps is not None:
        set_norm_eps(native, eps)
        args['norm_eps'] = eps
    # a NaFlexVit of plain blocks becomes one of EvaBlocks (timm builds those for num_kv_heads): the same
    # function, its LayerScale named gamma_1 / gamma_2 there
    state = {re.sub(r'^(blocks\.\d+)\.ls([12])\.gamma$', r'\1.gamma_\2', k): v
             for k, v in vit.state_dict().items() if '.attn.' not in k}
    for index, block in enumerate(blocks_of(vit)):
        weights, biases = _qkv_tensors(block.attn)
        prefix = f'blocks.{index}.attn.'
        for name, w, b in zip(('q_proj', 'k_proj', 'v_proj'), weights, biases):
            state[prefix + name + '.weight'] = w
            if b is not None or getattr(blocks_of(native)[index].attn, name).bias is not None:
                state[prefix + name + '.bias'] = b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype)
        for name, tensor in block.attn.state_dict().items():
            if name.split('.')[0] in ('q_norm', 'k_norm', 'norm', 'proj', 'gate'):
                state[prefix + name] = tensor
    missing, unexpected = native.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in dict(native.named_parameters())]
    if missing or unexpected:
        raise ValueError(f'{arch}: timm\'s layout differs from this model at {(missing + unexpected)[:3]}')
    return native.eval(), arch, args


def save_timm_native(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (timm's own state dict), ``timm_args.json`` (architecture and constructor
    args) and a README with the two lines that load it in plain timm."""
    native, arch, args = timm_native(model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    eps = args.pop('norm_eps', None)
    save_file({k: v.detach().cpu().contiguous() for k, v in native.state_dict().items()},
              str(directory / 'model.safetensors'), metadata={'format': 'pt'})
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    overlay = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
               if k in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'label_names')}
    overlay['num_classes'] = int(model.num_classes)
    (directory / 'timm_args.json').write_text(json.dumps(dict(architecture=arch, model_args=args,
                                                              pretrained_cfg_overlay=overlay), indent=2))
    note = '' if eps is None else f'\nIts norms use eps={eps} (set it on every norm after creating the model).\n'
    (directory / 'README.md').write_text(f"""# {arch}, grouped-query attention in timm's own format

Made with GQA Lens; loads with timm alone (1.0.31 or later), no GQA Lens needed:

```python
import json, timm
spec = json.load(open('timm_args.json'))
overlay = dict(spec['pretrained_cfg_overlay'], file='model.safetensors')
model = timm.create_model(spec['architecture'], pretrained=True, pretrained_cfg_overlay=overlay,
                          **spec['model_args'])
```
{note}""")
    return directory
