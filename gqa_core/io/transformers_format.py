"""transformers-format repos and folders (``google/vit-*``, ``facebook/deit-*``, ``facebook/dinov2-*``,
``facebook/dinov2-with-registers-*``, ``facebook/dinov3-vit*``) as the equivalent timm model, with no
transformers code run.

Their ``config.json`` names a transformers class, not a timm architecture. It is read here as untrusted data:
only the fields this module needs, each typed and bounded, decide a timm architecture and its geometry, which
then pass the same allow-list and size budget as any other config (:mod:`gqa_core.io.safe_config`). The
``model.safetensors`` tensors are renamed into timm's layout (separate query / key / value projections joined
into timm's fused ``qkv``; DINOv2's registers placed as timm places them) and loaded strictly: a tensor missing,
left over or of the wrong shape is an error naming it. Nothing is unpickled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
from torch import Tensor, nn

from ..core.rules import BOOLEAN, Rule, check, integer, number
from ..core.vit import set_norm_eps
from .safe_config import Budget, ConfigError, check_backbone_args, check_budget

__all__ = ['is_transformers_config', 'TransformersModel', 'read_config', 'check_size', 'to_timm_state', 'build',
           'ARCHITECTURES']

# transformers class -> (model_type, timm architecture giving the defaults: preprocessing, norms, layer layout)
ARCHITECTURES: Dict[str, Tuple[str, str]] = {
    'ViTModel': ('vit', 'vit_base_patch16_224'),
    'ViTForImageClassification': ('vit', 'vit_base_patch16_224'),
    'DeiTModel': ('deit', 'deit_base_distilled_patch16_224'),
    'DeiTForImageClassificationWithTeacher': ('deit', 'deit_base_distilled_patch16_224'),
    'Dinov2Model': ('dinov2', 'vit_base_patch14_dinov2'),
    'Dinov2WithRegistersModel': ('dinov2_with_registers', 'vit_base_patch14_reg4_dinov2'),
    'DINOv3ViTModel': ('dinov3_vit', 'vit_small_patch16_dinov3_qkvb'),  # timm's Eva with DINOv3's RoPE
}
# Heads timm has no module for: refused by name rather than loaded without their head.
REFUSED = {
    'DeiTForImageClassification': 'its classifier reads the class token only, while timm\'s distilled DeiT '
                                  'averages the class and distillation heads; load DeiTModel (features) or '
                                  'DeiTForImageClassificationWithTeacher',
    'Dinov2ForImageClassification': 'its classifier reads the class token and the mean patch token together, a '
                                    'head timm does not have; load the Dinov2Model backbone (features)',
}


def is_transformers_config(data: Dict[str, Any]) -> bool:
    """A transformers ``config.json`` (names a ``model_type``), not GQA Lens's or timm's own."""
    return isinstance(data, dict) and 'model_type' in data and 'backbone' not in data and 'architecture' not in data


def _field(data: Dict[str, Any], key: str, rule: Rule, default: Any = None) -> Any:
    return check(f'config.json: {key}', data.get(key, default), rule, ConfigError)


@dataclass
class TransformersModel:
    """What a transformers config describes, as timm sees it."""
    architecture: str  # the transformers class
    model_type: str
    timm_name: str
    timm_args: Dict[str, Any]
    depth: int
    labels: Optional[List[str]]
    norm_eps: float


def _labels(data: Dict[str, Any], classified: bool) -> Optional[List[str]]:
    if not classified:
        return None
    id2label = data.get('id2label')
    if not (isinstance(id2label, dict) and 0 < len(id2label) <= 100_000):
        raise ConfigError('config.json: id2label must map 1..100000 class ids to names')
    labels: Dict[int, str] = {}
    for key, name in id2label.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < len(id2label)
                and isinstance(name, str) and len(name) <= 200):
            raise ConfigError('config.json: id2label must map "0".."N-1" to names of at most 200 characters')
        labels[int(key)] = name
    return [labels[i] for i in range(len(labels))]


def read_config(data: Dict[str, Any]) -> TransformersModel:
    """The timm architecture and geometry a transformers ``config.json`` describes (untrusted data)."""
    names = data.get('architectures')
    if not (isinstance(names, list) and len(names) == 1 and isinstance(names[0], str) and len(names[0]) <= 100):
        raise ConfigError('config.json: architectures must name one transformers class')
    name = names[0]
    if name in REFUSED:
        raise ConfigError(f'{name} is not supported: {REFUSED[name]}')
    if name not in ARCHITECTURES:
        raise ConfigError(f'{name[:100]!r} is not a transformers class GQA Lens reads (supported: '
                          f'{", ".join(sorted(ARCHITECTURES))})')
    model_type, timm_name = ARCHITECTURES[name]
    if data.get('model_type') != model_type:
        raise ConfigError(f'config.json: model_type must be {model_type!r} for {name}')
    _field(data, 'num_channels', Rule(lambda v: v == 3, '3 (RGB)'), 3)
    _field(data, 'hidden_act', Rule(lambda v: v == 'gelu', '"gelu" (the activation timm\'s blocks use)'), 'gelu')
    width = _field(data, 'hidden_size', integer(8, 4096))
    heads = _field(data, 'num_attention_heads', integer(1, 64))
    depth = _field(data, 'num_hidden_layers', integer(1, 64))
    if model_type == 'dinov3_vit':
        return _dinov3(data, name, timm_name, width, heads, depth)
    if model_type in ('vit', 'deit'):
        hidden = _field(data, 'intermediate_size', integer(8, 65536))
        mlp_ratio = hidden / width
    else:
        mlp_ratio = _field(data, 'mlp_ratio', number(0.25, 16))
        _field(data, 'use_swiglu_ffn', Rule(lambda v: v is False, 'false (SwiGLU DINOv2 is not supported)'), False)
    args: Dict[str, Any] = dict(
        img_size=_field(data, 'image_size', integer(8, 4096)),
        patch_size=_field(data, 'patch_size', integer(1, 64)),
        embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
        qkv_bias=_field(data, 'qkv_bias', BOOLEAN, True),
    )
    classified = not name.endswith('Model')  # ...ForImageClassification(WithTeacher): a classifier head
    labels = _labels(data, classified)
    args['num_classes'] = len(labels) if labels else 0
    if model_type == 'vit':
        args['global_pool'] = 'token'
    if model_type.startswith('dinov2'):
        args['init_values'] = 1.0  # layer scale: the value itself is a loaded weight
    if model_type == 'dinov2_with_registers':
        args['reg_tokens'] = _field(data, 'num_register_tokens', integer(0, 64), 4)
    eps = _field(data, 'layer_norm_eps', number(1e-12, 1e-2, says='a number 1e-12..0.01'), 1e-12)
    return TransformersModel(name, model_type, timm_name, check_backbone_args(args, timm_name), depth, labels, eps)


def _dinov3(data: Dict[str, Any], name: str, timm_name: str, width: int, heads: int,
            depth: int) -> TransformersModel:
    """DINOv3's ViT as timm's ``Eva`` DINOv3 (the same RoPE: equal within float error, tested)."""
    biases = tuple(_field(data, f'{k}_bias', BOOLEAN, d)
                   for k, d in (('query', True), ('key', False), ('value', True)))
    if biases == (False, False, False):
        timm_name = 'vit_small_patch16_dinov3'
    elif biases != (True, False, True):
        raise ConfigError('config.json: DINOv3 with query_bias, key_bias, value_bias = '
                          f'{list(biases)} is not supported (timm has none or q/v biases with a zero key bias)')
    _field(data, 'proj_bias', Rule(lambda v: v is True, 'true'), True)
    _field(data, 'mlp_bias', Rule(lambda v: v is True, 'true'), True)
    _field(data, 'use_gated_mlp', Rule(lambda v: v is False, 'false (gated-MLP DINOv3 is not supported yet)'), False)
    _field(data, 'rope_theta', Rule(lambda v: v == 100, '100 (timm\'s DINOv3 RoPE)'), 100.0)
    args: Dict[str, Any] = dict(
        img_size=_field(data, 'image_size', integer(8, 4096)),
        patch_size=_field(data, 'patch_size', integer(1, 64)),
        embed_dim=width, depth=depth, num_heads=heads,
        mlp_ratio=_field(data, 'intermediate_size', integer(8, 65536)) / width,
        qkv_bias=biases[0], num_reg_tokens=_field(data, 'num_register_tokens', integer(0, 64), 0),
        init_values=1.0, num_classes=0, global_pool='token',  # upstream DINOv3 pools the class token
    )
    eps = _field(data, 'layer_norm_eps', number(1e-12, 1e-2, says='a number 1e-12..0.01'), 1e-5)
    return TransformersModel(name, 'dinov3_vit', timm_name, check_backbone_args(args, timm_name), depth, None, eps)


_PREFIXES = ('vit.', 'deit.', 'dinov2.', 'model.')
_DROPPED = ('embeddings.mask_token', 'pooler.dense.weight', 'pooler.dense.bias')  # unused by any forward here
_RENAMES = {  # per-layer transformers names -> timm names (query/key/value are joined separately)
    'attention.output.dense': 'attn.proj',
    'intermediate.dense': 'mlp.fc1', 'output.dense': 'mlp.fc2',  # ViT / DeiT
    'layernorm_before': 'norm1', 'layernorm_after': 'norm2',
    'mlp.fc1': 'mlp.fc1', 'mlp.fc2': 'mlp.fc2', 'norm1': 'norm1', 'norm2': 'norm2',  # DINOv2
    'layer_scale1.lambda1': 'ls1.gamma', 'layer_scale2.lambda1': 'ls2.gamma',
}
_DINOV3_RENAMES = {  # DINOv3's per-layer names -> timm Eva's (q/k/v joined separately)
    'attention.o_proj': 'attn.proj', 'norm1': 'norm1', 'norm2': 'norm2', 'mlp.up_proj': 'mlp.fc1',
    'mlp.down_proj': 'mlp.fc2', 'layer_scale1.lambda1': 'gamma_1', 'layer_scale2.lambda1': 'gamma_2',
    'attention.q_proj.bias': 'attn.q_bias', 'attention.v_proj.bias': 'attn.v_bias',
}
_TOP = {
    'embeddings.cls_token': 'cls_token', 'embeddings.position_embeddings': 'pos_embed',
    'embeddings.distillation_token': 'dist_token', 'embeddings.register_tokens': 'reg_token',
    'embeddings.patch_embeddings.projection.weight': 'patch_embed.proj.weight',
    'embeddings.patch_embeddings.projection.bias': 'patch_embed.proj.bias',
    'embeddings.patch_embeddings.weight': 'patch_embed.proj.weight',  # DINOv3
    'embeddings.patch_embeddings.bias': 'patch_embed.proj.bias',
    'layernorm.weight': 'norm.weight', 'layernorm.bias': 'norm.bias', 'norm.weight': 'norm.weight',
    'norm.bias': 'norm.bias',
    'classifier.weight': 'head.weight', 'classifier.bias': 'head.bias',
    'cls_classifier.weight': 'head.weight', 'cls_classifier.bias': 'head.bias',
    'distillation_classifier.weight': 'head_dist.weight', 'distillation_classifier.bias': 'head_dist.bias',
}


def _dinov3_tensor(out: Dict[str, Tensor], qkv: Dict, layer: int, rest: str, tensor: Tensor, name: str,
                   timm_name: str) -> None:
    base, _, kind = rest.rpartition('.')
    projection = {'attention.q_proj': 'query', 'attention.k_proj': 'key', 'attention.v_proj': 'value'}
    if rest in _DINOV3_RENAMES:
        out[f'blocks.{layer}.{_DINOV3_RENAMES[rest]}'] = tensor
    elif base in projection and kind == 'weight':
        qkv.setdefault((layer, 'weight'), {})[projection[base]] = tensor
    elif base in _DINOV3_RENAMES:
        out[f'blocks.{layer}.{_DINOV3_RENAMES[base]}.{kind}'] = tensor
    else:
        raise ConfigError(f'model.safetensors: {name[:120]!r} has no place in timm\'s {timm_name}')


def to_timm_state(described: TransformersModel, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """transformers tensor names -> timm's, q/k/v joined into ``qkv``; ``ConfigError`` naming any tensor that
    has no place in timm's model."""
    out: Dict[str, Tensor] = {}
    qkv: Dict[Tuple[int, str], Dict[str, Tensor]] = {}
    for name, tensor in state.items():
        key = next((name[len(p):] for p in _PREFIXES if name.startswith(p)), name)
        if key in _DROPPED:
            continue
        if key in _TOP:
            out[_TOP[key]] = tensor
            continue
        parts = key.split('.')
        if parts[:1] == ['layer'] and described.model_type == 'dinov3_vit':
            parts = ['encoder', *parts]  # DINOv3 names its layers without the encoder
        if len(parts) < 5 or parts[:2] != ['encoder', 'layer'] or not parts[2].isdigit():
            raise ConfigError(f'model.safetensors: {name[:120]!r} has no place in timm\'s {described.timm_name}')
        layer, rest = int(parts[2]), '.'.join(parts[3:])
        if described.model_type == 'dinov3_vit':
            _dinov3_tensor(out, qkv, layer, rest, tensor, name, described.timm_name)
            continue
        if rest.startswith('attention.attention.') and len(parts) == 7 and parts[5] in ('query', 'key', 'value'):
            which, kind = parts[5], parts[6]  # query | key | value, weight | bias
            qkv.setdefault((layer, kind), {})[which] = tensor
            continue
        base, _, kind = rest.rpartition('.')
        if rest in _RENAMES:  # layer scale: a parameter, not a module
            out[f'blocks.{layer}.{_RENAMES[rest]}'] = tensor
        elif base in _RENAMES:
            out[f'blocks.{layer}.{_RENAMES[base]}.{kind}'] = tensor
        else:
            raise ConfigError(f'model.safetensors: {name[:120]!r} has no place in timm\'s {described.timm_name}')
    for (layer, kind), parts in qkv.items():
        missing = [w for w in ('query', 'key', 'value') if w not in parts]
        if missing:
            raise ConfigError(f'model.safetensors: layer {layer} has no attention {missing[0]}.{kind}')
        out[f'blocks.{layer}.attn.qkv.{kind}'] = torch.cat([parts['query'], parts['key'], parts['value']])
    if described.model_type == 'dinov2_with_registers' and 'pos_embed' in out and 'cls_token' in out:
        # transformers adds the class token's position before inserting the registers; timm's register
        # models (no_embed_class) add positions to the patches only
        out['cls_token'] = out['cls_token'] + out['pos_embed'][:, :1]
        out['pos_embed'] = out['pos_embed'][:, 1:]
    return out


def check_size(described: TransformersModel, budget: Budget) -> None:
    """Refuse a model over ``budget`` before its weights are even fetched (counted on the meta device)."""
    check_budget(described.timm_name, described.timm_args, budget)


def build(described: TransformersModel, state: Dict[str, Tensor]) -> nn.Module:
    """The timm model (multi-head attention) equivalent to a transformers config and its weights."""
    model = timm.create_model(described.timm_name, pretrained=False, **described.timm_args)
    set_norm_eps(model, described.norm_eps)  # transformers' ViT uses 1e-12 where timm uses 1e-6
    timm_state = to_timm_state(described, state)
    try:
        model.load_state_dict(timm_state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f'model.safetensors does not fit {described.architecture}: {str(e)[:500]}') from None
    if described.labels is not None:
        model.pretrained_cfg = dict(model.pretrained_cfg, label_names=described.labels)
    return model.eval()
