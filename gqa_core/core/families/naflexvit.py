"""timm's ``NaFlexVit`` (naflexvit.py): NaFlex ViTs, SigLIP-2 NaFlex encoders, C-RADIO v3 / v4 backbones.

GQA Lens feeds it image tensors ``(B, 3, H, W)``; NaFlexVit's patch-dictionary input (variable aspect ratio,
padding masks) is timm's own and not used here. Its patch embedding, position table and prefix tokens live in
one module (``embeds``); its blocks are timm's ``Block`` (``Attention``) or, for RoPE, GQA and the other EVA
options, ``EvaBlock`` (``EvaAttention`` / ``AttentionRope``, timm's own GQA with ``num_kv_heads``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch.nn as nn
from torch import Tensor
from timm.layers import AttentionRope, GluMlp, SwiGLU
from timm.layers.pos_embed_sincos import (RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed,
                                          RotaryEmbeddingMRope)
from timm.models.eva import EvaBlock
from timm.models.naflexvit import NaFlexVit

from ..rules import BOOLEAN, Rule, either, integer, list_of, number, one_of, optional
from .base import Family, has_qkv_bias, is_present, register
from .vision_transformer import BACKBONE_ARGS

__all__ = ['NaFlexVitFamily', 'NAFLEX_ARGS']

GRID = list_of(integer(1, 512), 2, 2)
FACTOR = optional(number(0, 64))
# Keys of NaFlexVit(cfg, **kwargs) (its NaFlexVitCfg fields, plus in_chans / num_classes / img_size) that give a
# model its state-dict shapes or its forward on image tensors, each with its rule
NAFLEX_ARGS: Dict[str, Rule] = {
    **{k: BACKBONE_ARGS[k] for k in (
        'img_size', 'in_chans', 'num_classes', 'global_pool', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
        'qkv_bias', 'qk_norm', 'proj_bias', 'init_values', 'class_token', 'reg_tokens', 'pre_norm', 'final_norm',
        'fc_norm', 'dynamic_img_pad', 'drop_rate', 'pos_drop_rate', 'proj_drop_rate', 'attn_drop_rate',
        'drop_path_rate')},
    'patch_size': either(integer(1, 64), list_of(integer(1, 64), 2, 2)),
    'patch_drop_rate': BACKBONE_ARGS['drop_rate'],
    'pos_embed': one_of('learned', 'factorized', 'none'),
    'pos_embed_grid_size': optional(GRID),
    'pos_embed_interp_mode': one_of('bilinear', 'bicubic', 'nearest', 'area'),
    'pos_embed_ar_preserving': BOOLEAN,
    'pos_embed_antialias': BOOLEAN,
    'pos_embed_align_corners': BOOLEAN,
    'pos_embed_use_grid_sample': BOOLEAN,
    'embed_proj_type': one_of('linear', 'conv'),
    'patchify_channels_last': BOOLEAN,
    'pool_include_prefix': BOOLEAN,
    'attn_pool_num_heads': optional(integer(1, 64)),
    'attn_pool_mlp_ratio': optional(number(0.25, 16)),
    'act_layer': one_of('gelu', 'gelu_tanh', 'quick_gelu', 'silu'),
    'attn_type': one_of('standard', 'eva', 'rope'),
    'qkv_fused': BOOLEAN,
    'swiglu_mlp': BOOLEAN,
    'scale_mlp_norm': BOOLEAN,
    'scale_attn_inner_norm': BOOLEAN,
    'attn_only_layer_scale': BOOLEAN,
    'attn_gated': BOOLEAN,
    'num_kv_heads': optional(either(integer(1, 64), list_of(integer(1, 64), 1, 64))),  # timm's own GQA blocks
    'rope_type': one_of('none', 'axial', 'mixed', 'dinov3', 'mrope'),
    'rope_temperature': optional(number(1, 1e7)),
    'rope_ref_feat_shape': optional(GRID),
    'rope_grid_offset': number(-64, 64),
    'rope_grid_indexing': one_of('ij', 'xy'),
    'rope_rotate_half': BOOLEAN,
    'rope_mrope_section': optional(list_of(integer(0, 512), 3, 3)),
    'rope_shift_coords': FACTOR,
    'rope_jitter_coords': FACTOR,
    'rope_rescale_coords': FACTOR,
}

# the activation classes timm's get_act_layer gives for NAFLEX_ARGS' act_layer names
_ACT_NAMES = {'GELU': 'gelu', 'GELUTanh': 'gelu_tanh', 'QuickGELU': 'quick_gelu', 'SiLU': 'silu'}


class NaFlexVitFamily(Family):
    name = 'NaFlexVit'
    classes = (NaFlexVit,)
    timm_modules = ('timm.models.naflexvit',)
    args = NAFLEX_ARGS

    # -- where things are: the patch projection, position table and prefix tokens are one module
    def patch_embed(self, model: NaFlexVit) -> nn.Module:
        return model.embeds

    def has_class_token(self, model: NaFlexVit) -> bool:
        return bool(model.has_class_token)  # the token itself is model.embeds.cls_token

    def img_size(self, model: NaFlexVit) -> Tuple[int, int]:
        """The size it is shown images at: its data config's (NaFlexVit takes any size; the constructor's
        ``img_size`` only sizes the position table when no grid is given)."""
        size = (getattr(model, 'pretrained_cfg', None) or {}).get('input_size')
        if size:
            return int(size[-2]), int(size[-1])
        embeds = model.embeds
        if embeds.default_img_size is not None:
            return tuple(int(s) for s in embeds.default_img_size)
        grid = embeds.pos_embed_grid_size or (16, 16)
        return tuple(int(g) * int(p) for g, p in zip(grid, embeds.patch_size))

    def token_grid(self, model: NaFlexVit, x: Optional[Tensor]) -> tuple:
        """The grid of ``x``'s own size (NaFlexVit takes any), else of :meth:`img_size`."""
        size = tuple(x.shape[-2:]) if isinstance(x, Tensor) and x.dim() == 4 else self.img_size(model)
        return tuple(int(s) for s in model.embeds.dynamic_feat_size(size))

    def num_patches(self, model: NaFlexVit) -> int:
        rows, cols = self.token_grid(model, None)
        return rows * cols

    # -- the forward on image tensors, taken apart (timm's own _forward_embeds: patches, position table,
    # prefix tokens, RoPE, norm_pre; no patch mask for a batch of images)
    def check_positions(self, model: NaFlexVit) -> None:
        """RoPE with learned per-head frequencies rotates each head's keys differently, so a pooled KV head
        has no one rotation."""
        if model.rope_is_mixed:
            raise ValueError(f'{type(model).__name__} uses RoPE with learned per-head frequencies '
                             '(rope_type="mixed"): a pooled KV head serves query heads that rotate keys '
                             'differently, so mean-pooling K is not defined; the model was not changed')

    def block_inputs(self, model: NaFlexVit, images: Tensor) -> Tensor:
        return model._forward_embeds(images, patch_coord=None, patch_valid=None, attn_mask=None)['patches']

    def block_context(self, model: NaFlexVit, images: Tensor) -> Dict[str, Any]:
        """The RoPE every block is given for ``images``' grid (axial, DINOv3 or MRoPE tables: one for all)."""
        if model.rope is None:
            return {}
        embeds = model._forward_embeds(images[:1], patch_coord=None, patch_valid=None, attn_mask=None)
        return {'rope': embeds['rope_embeds']}

    # -- rebuilding
    def geometry(self, model: NaFlexVit) -> Dict[str, Any]:
        """Every NaFlexVitCfg field that changes the state-dict shapes or the forward on image tensors, read
        from the modules (NaFlexVit keeps no cfg); the rest (norm classes, SwiGLU alignment) is the
        architecture's own, and the meta rebuild of :func:`~gqa_core.io.config.backbone_of` checks it."""
        embeds, block = model.embeds, model.blocks[0]
        attn, eva = block.attn, isinstance(block, EvaBlock)
        patch = tuple(int(p) for p in embeds.patch_size)
        geometry: Dict[str, Any] = dict(
            patch_size=patch[0] if patch[0] == patch[1] else list(patch),
            num_classes=int(model.num_classes),
            global_pool=model.global_pool,
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),
            num_heads=int(attn.num_heads),
            mlp_ratio=block.mlp.fc2.in_features / model.embed_dim,
            qkv_bias=has_qkv_bias(attn),
            qk_norm=is_present(getattr(attn, 'q_norm', None)),
            proj_bias=attn.proj.bias is not None,
            init_values=1.0 if (getattr(block, 'gamma_1', None) is not None if eva
                                else is_present(getattr(block, 'ls1', None))) else None,  # the value is a weight
            class_token=self.has_class_token(model),
            reg_tokens=int(model.num_reg_tokens),
            pos_embed=embeds.pos_embed_type,
            pos_embed_interp_mode=embeds.pos_embed_interp_mode,
            pos_embed_ar_preserving=bool(embeds.pos_embed_ar_preserving),
            pos_embed_antialias=bool(embeds.pos_embed_antialias),
            pos_embed_align_corners=bool(embeds.pos_embed_align_corners),
            pos_embed_use_grid_sample=bool(embeds.pos_embed_use_grid_sample),
            embed_proj_type='linear' if embeds.is_linear else 'conv',
            patchify_channels_last=bool(embeds.channels_last),
            dynamic_img_pad=bool(embeds.dynamic_img_pad),
            pre_norm=is_present(model.norm_pre),
            final_norm=is_present(model.norm) or is_present(model.fc_norm),
            fc_norm=is_present(model.fc_norm),
            pool_include_prefix=bool(model.pool_include_prefix),
        )
        if embeds.pos_embed is not None:  # (1, h, w, C)
            geometry['pos_embed_grid_size'] = [int(s) for s in embeds.pos_embed.shape[1:3]]
        elif embeds.pos_embed_y is not None:  # (1, h, C) and (1, w, C)
            geometry['pos_embed_grid_size'] = [int(embeds.pos_embed_y.shape[1]), int(embeds.pos_embed_x.shape[1])]
        act = getattr(block.mlp, 'act', None)
        if type(act).__name__ in _ACT_NAMES and not isinstance(block.mlp, (SwiGLU, GluMlp)):
            geometry['act_layer'] = _ACT_NAMES[type(act).__name__]
        if model.attn_pool is not None:
            geometry['attn_pool_num_heads'] = int(model.attn_pool.num_heads)
            geometry['attn_pool_mlp_ratio'] = model.attn_pool.mlp.fc1.out_features / model.embed_dim
        geometry.update(self._block_geometry(model))
        geometry.update(self._rope_geometry(model))
        return geometry

    def _block_geometry(self, model: NaFlexVit) -> Dict[str, Any]:
        """timm's ``Block`` ('standard') or ``EvaBlock`` and what it was built with."""
        block = model.blocks[0]
        attn = block.attn
        if not isinstance(block, EvaBlock):
            return dict(attn_type='standard', scale_attn_inner_norm=is_present(getattr(attn, 'norm', None)),
                        scale_mlp_norm=is_present(getattr(block.mlp, 'norm', None)))
        rope_attn = getattr(attn, 'kind', None) == 'rope' or isinstance(attn, AttentionRope)
        # the KV heads timm builds each block with (its own GQA); a converted layer remembers the heads of the
        # layer it was made from, so the rebuilt backbone takes the same weights
        native = [int(getattr(b.attn, 'native_kv_heads', None) or getattr(b.attn, 'num_kv_heads', None)
                      or b.attn.num_heads) for b in model.blocks]
        return dict(
            attn_type='rope' if rope_attn else 'eva',
            qkv_fused=getattr(attn, 'qkv', None) is not None,
            swiglu_mlp=isinstance(block.mlp, (SwiGLU, GluMlp)),
            scale_mlp_norm=is_present(getattr(block.mlp, 'norm', None)),
            scale_attn_inner_norm=is_present(getattr(attn, 'norm', None)),
            attn_only_layer_scale=block.gamma_1 is not None and block.gamma_2 is None,
            attn_gated=getattr(attn, 'gate', None) is not None,
            num_kv_heads=native[0] if len(set(native)) == 1 else native,
        )

    def _rope_geometry(self, model: NaFlexVit) -> Dict[str, Any]:
        """The RoPE table's type and the settings of timm's rotary module that change its rotation."""
        rope = model.rope
        if rope is None:
            return dict(rope_type='none')
        kinds = ((RotaryEmbeddingMixed, 'mixed'), (RotaryEmbeddingMRope, 'mrope'), (RotaryEmbeddingDinoV3, 'dinov3'),
                 (RotaryEmbeddingCat, 'axial'))
        kind = next(name for cls, name in kinds if isinstance(rope, cls))
        geometry: Dict[str, Any] = dict(
            rope_type=kind, rope_grid_indexing=rope.grid_indexing,
            rope_temperature=float(rope.temperature) if rope.temperature is not None else None,
            rope_shift_coords=rope.shift_coords, rope_jitter_coords=rope.jitter_coords,
            rope_rescale_coords=rope.rescale_coords,
            rope_rotate_half=bool(getattr(model.blocks[0].attn, 'rotate_half', False)))
        if kind in ('axial', 'dinov3'):
            geometry['rope_grid_offset'] = float(rope.grid_offset)
        if kind == 'axial' and rope.ref_feat_shape is not None:
            geometry['rope_ref_feat_shape'] = [int(s) for s in rope.ref_feat_shape]
        if kind == 'mrope':
            geometry['rope_mrope_section'] = [int(s) for s in rope.mrope_section]
        return geometry


register(NaFlexVitFamily())
