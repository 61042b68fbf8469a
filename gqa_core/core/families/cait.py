"""timm's ``Cait`` (cait.py): CaiT, Class-Attention in Image Transformers (Touvron et al., 2021).

CaiT runs ``blocks`` (``LayerScaleBlock`` with talking-heads self-attention, ``TalkingHeadAttn``) over the patch
tokens only, then ``blocks_token_only`` (``LayerScaleBlockClassAttn`` with ``ClassAttn``), where a class token
inserted only there attends to [class, patches], then the final norm and the head on the class token.

What GQA Lens converts: the ``blocks`` (the self-attention trunk, 24-48 layers). Their talking heads mix
logits and weights across heads; :class:`~gqa_core.core.attention.GroupedQueryAttention` (kind ``'talking'``)
keeps the mixes per query head, each query head reading its KV head's K/V, exact at G = H.

The class-attention layers stay timm's multi-head ``ClassAttn``, part of :meth:`CaitFamily.head`: they are not
self-attention over the blocks' tokens (one query, the class token, over a token set the trunk never sees: the
class token and the patches), and their blocks are called as ``block(x, x_cls)``. Everything GQA Lens does
block by block (running the blocks from any layer, recording T x T maps of one token set, the rollout
through the layers, ablation, the advisor, calibration against the blocks' outputs) is defined over
``blocks``; the two class-attention layers (of 26-50) are the head that reads their output, kept exact.
Their K/V cache (two layers over T + 1 tokens) is not counted in ``kv_cache_bytes``.

The blocks have no prefix token (the class token joins after them), so a recording's summary row is the mean
over the queries and the rollout starts from it.
"""
from __future__ import annotations

from typing import Any, Dict

from torch import Tensor
from timm.models.cait import Cait

from ..rules import BOOLEAN, Rule, integer, number, one_of
from .base import Family, has_qkv_bias, register
from .vision_transformer import BACKBONE_ARGS

__all__ = ['CaitFamily', 'CAIT_ARGS']

CAIT_ARGS: Dict[str, Rule] = {
    **{k: BACKBONE_ARGS[k] for k in ('img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depth',
                                     'num_heads', 'mlp_ratio', 'drop_rate', 'pos_drop_rate', 'proj_drop_rate',
                                     'attn_drop_rate', 'drop_path_rate')},
    'global_pool': one_of('', 'token', 'avg', says="'', token or avg"),
    'qkv_bias': BOOLEAN,
    'init_values': number(0, 10),
    'depth_token_only': integer(0, 16),
    'mlp_ratio_token_only': number(0.25, 16),
}


class CaitFamily(Family):
    name = 'Cait'
    classes = (Cait,)
    timm_modules = ('timm.models.cait',)
    args = CAIT_ARGS

    def num_prefix_tokens(self, model: Cait) -> int:
        """The blocks see the patches only (timm's ``num_prefix_tokens`` = 1 counts the class token the head adds)."""
        return 0

    def has_class_token(self, model: Cait) -> bool:
        """Not in the blocks: the class token exists only in the class-attention head."""
        return False

    def block_inputs(self, model: Cait, images: Tensor) -> Tensor:
        x = model.patch_embed(images)
        return model.pos_drop(x + model.pos_embed)

    def head(self, model: Cait, tokens: Tensor) -> Tensor:
        """The class-attention blocks (class token over [class, patches]), the norm and the head (timm's
        ``forward_features`` after ``blocks``, then ``forward_head``)."""
        x = model.forward_cls(tokens) if model.blocks_token_only is not None else tokens
        return model.forward_head(model.norm(x))

    def geometry(self, model: Cait) -> Dict[str, Any]:
        """``init_values`` only switches LayerScale's value at init (the gammas are loaded weights)."""
        geometry = self.common_geometry(model)
        token_only = model.blocks_token_only if model.blocks_token_only is not None else []
        geometry.update(
            qkv_bias=has_qkv_bias(self.blocks(model)[0].attn),
            init_values=1e-5,
            depth_token_only=len(token_only),
        )
        if len(token_only):
            geometry['mlp_ratio_token_only'] = token_only[0].mlp.fc2.in_features / model.embed_dim
        return geometry


register(CaitFamily())
