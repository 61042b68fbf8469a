"""Converting timm Vision Transformers between multi-head attention and the grouped-query family."""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch import nn
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer

from .attention import GroupedQueryAttention, kv_bytes

__all__ = ['convert', 'revert', 'grouping_config', 'gqa_layers', 'kv_cache_bytes']


def _check_vit(model: nn.Module) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f'expected a timm VisionTransformer (vit_*, deit_*, ...), got {type(model).__name__}')
    return model


def gqa_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, GroupedQueryAttention)]


def convert(
        model: nn.Module,
        variant: str,
        num_kv_heads: Optional[int] = None,
        **policy_options: Any,
) -> VisionTransformer:
    """Swap every block's attention of a timm ViT, in place, for :class:`GroupedQueryAttention`.

    From timm's ``Attention`` (MHA) the K/V heads are mean-pooled in consecutive blocks of H/G; Q and the
    output projection are copied; no other weight is touched (the final norm included). A model converted
    before can change policy at the same G (weights kept) or be re-pooled from G = H. ``policy_options``
    go to the policy (``compat``, ``seed``, ``stat``, ``window``, ``beta``, ``noise_scale``, ...).
    """
    vit = _check_vit(model)
    attns = [_convertible_attention(index, block, num_kv_heads) for index, block in enumerate(vit.blocks)]
    # Build every new layer before touching the model: a failure (bad G, bad option) leaves it as it was.
    new_layers = []
    for index, attn in enumerate(attns):
        new = GroupedQueryAttention.from_attention(attn, variant, num_kv_heads, **policy_options)
        new.policy.stream = index
        new_layers.append(new)
    for block, new in zip(vit.blocks, new_layers):
        block.attn = new
    return vit


def _convertible_attention(index: int, block: nn.Module, num_kv_heads: Optional[int]) -> Attention:
    """The block's timm ``Attention`` (MHA), or a ``ValueError`` naming the block and what it holds instead."""
    attn = getattr(block, 'attn', None)
    if attn is None:
        raise ValueError(f'block {index} ({type(block).__name__}) has no single `attn` module (parallel or fused '
                         'attention blocks are not supported); the model was not changed')
    if isinstance(attn, GroupedQueryAttention):
        if num_kv_heads not in (None, attn.num_kv_heads) and attn.num_kv_heads != attn.num_heads:
            raise ValueError(f'block {index} already has G={attn.num_kv_heads}; convert to G={num_kv_heads} '
                             'from the multi-head model (G = H), not from another grouping')
        return attn.to_attention()
    if type(attn) is not Attention:
        raise ValueError(f'block {index} ({type(block).__name__}): attention {type(attn).__name__} is not timm '
                         'Attention; the model was not changed')
    return attn


def revert(model: nn.Module) -> VisionTransformer:
    """Back to timm's own ``Attention`` (MHA), exactly equivalent at inference for fixed groupings."""
    vit = _check_vit(model)
    for block in vit.blocks:
        if isinstance(block.attn, GroupedQueryAttention):
            block.attn = block.attn.to_attention()
    return vit


def grouping_config(model: nn.Module) -> Dict[str, Any]:
    """The grouping every layer of ``model`` uses (variant, G, compat, policy options); layers must agree."""
    layers = gqa_layers(model)
    if not layers:
        raise ValueError(f'{type(model).__name__} has no grouped-query attention layers; call convert() first')
    configs = [layer.grouping_config() for layer in layers]
    if any(c != configs[0] for c in configs):
        raise ValueError('layers of this model use different groupings: ' + str(configs))
    return configs[0]


def kv_cache_bytes(model: nn.Module, bytes_per_value: int = 2) -> int:
    """Bytes of K and V one image occupies over all layers (fp16 by default) -- what grouping saves."""
    vit = _check_vit(model)
    tokens = vit.patch_embed.num_patches + vit.num_prefix_tokens
    total = 0
    for block in vit.blocks:
        attn = block.attn
        kv_heads = getattr(attn, 'num_kv_heads', attn.num_heads)  # timm's own MHA: G = H
        total += kv_bytes(kv_heads, attn.head_dim, tokens, bytes_per_value)
    return total
