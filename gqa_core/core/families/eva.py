"""timm's ``Eva`` (eva.py): EVA-02, DINOv3, Perception Encoder, RoPE-ViT, Sapiens2 (its own GQA)."""
from __future__ import annotations

from typing import Any, Dict

from torch import Tensor
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaBlockPostNorm

from ..rules import BOOLEAN, Rule, either, integer, list_of, number, one_of, optional
from .base import Family, has_qkv_bias, is_present, register
from .vision_transformer import BACKBONE_ARGS

__all__ = ['EvaFamily', 'EVA_ARGS', 'SHARED_ARGS']

# The keys timm's Eva and Beit constructors share with VisionTransformer's
SHARED_ARGS = ('img_size', 'patch_size', 'in_chans', 'num_classes', 'global_pool', 'embed_dim', 'depth',
               'num_heads', 'mlp_ratio', 'qkv_bias', 'init_values', 'drop_rate', 'pos_drop_rate', 'proj_drop_rate',
               'attn_drop_rate', 'drop_path_rate', 'dynamic_img_size')
EVA_ARGS: Dict[str, Rule] = {
    **{k: BACKBONE_ARGS[k] for k in SHARED_ARGS}, 'class_token': BOOLEAN,
    'qkv_fused': BOOLEAN,
    'qk_norm': BOOLEAN,
    'num_reg_tokens': integer(0, 64),
    'use_abs_pos_emb': BOOLEAN,
    'use_rot_pos_emb': BOOLEAN,
    'attn_pool_num_heads': optional(integer(1, 64)),
    'attn_pool_mlp_ratio': optional(number(0.25, 16)),
    'num_kv_heads': optional(either(integer(1, 64), list_of(integer(1, 64), 1, 256))),  # timm's own GQA blocks
    'attn_type': one_of('eva', 'rope'),
}


class EvaFamily(Family):
    name = 'Eva'
    classes = (Eva,)
    timm_modules = ('timm.models.eva',)
    args = EVA_ARGS

    def num_registers(self, model: Eva) -> int:
        reg = getattr(model, 'reg_token', None)  # Eva holds its registers as one parameter
        return int(reg.shape[1]) if reg is not None else 0

    def check_positions(self, model: Eva) -> None:
        """RoPE with learned per-head frequencies (RoPE-ViT's ``mixed``) rotates each head's keys differently,
        so a pooled KV head has no one rotation."""
        if getattr(model, 'rope_mixed', False):
            raise ValueError(f'{type(model).__name__} uses RoPE with learned per-head frequencies '
                             '(rope_type="mixed"): a pooled KV head serves query heads that rotate keys '
                             'differently, so mean-pooling K is not defined; the model was not changed')

    def block_inputs(self, model: Eva, images: Tensor) -> Tensor:
        x, _ = model._pos_embed(model.patch_embed(images))
        return model.norm_pre(x)

    def block_context(self, model: Eva, images: Tensor) -> Dict[str, Any]:
        if model.rope is None:
            return {}
        return {'rope': model._pos_embed(model.patch_embed(images[:1]))[1]}

    def geometry(self, model: Eva) -> Dict[str, Any]:
        """The rest (RoPE type and grid, norms) is the architecture's own."""
        attn, block = model.blocks[0].attn, model.blocks[0]
        geometry = self.common_geometry(model)
        geometry.update(
            qkv_bias=has_qkv_bias(attn),
            qkv_fused=getattr(attn, 'qkv', None) is not None,
            qk_norm=is_present(attn.q_norm),
            init_values=1.0 if getattr(block, 'gamma_1', None) is not None else None,
            class_token=self.has_class_token(model),
            num_reg_tokens=self.num_registers(model),
            use_abs_pos_emb=model.pos_embed is not None,
            use_rot_pos_emb=model.rope is not None,
            dynamic_img_size=bool(model.dynamic_img_size),
        )
        # the KV heads timm builds each block with (its own GQA: Sapiens2, num_kv_heads); a converted layer
        # remembers the heads of the layer it was made from, so the rebuilt backbone takes the same weights
        native = [int(getattr(b.attn, 'native_kv_heads', None) or getattr(b.attn, 'num_kv_heads', None)
                      or b.attn.num_heads) for b in model.blocks]
        # all multi-head: H said explicitly (an architecture whose default is per-block GQA, Sapiens2, is
        # overridden), but post-norm blocks take no num_kv_heads at all
        post_norm = isinstance(block, EvaBlockPostNorm)
        geometry['num_kv_heads'] = None if post_norm else native[0] if len(set(native)) == 1 else native
        # timm's AttentionRope (the only Eva attention with num_kv_heads) or EvaAttention
        geometry['attn_type'] = 'rope' if getattr(attn, 'kind', None) == 'rope' or isinstance(attn, AttentionRope) \
            else 'eva'
        if model.attn_pool is not None:
            geometry['attn_pool_num_heads'] = int(model.attn_pool.num_heads)
            geometry['attn_pool_mlp_ratio'] = model.attn_pool.mlp.fc1.out_features / model.embed_dim
        return geometry


register(EvaFamily())
