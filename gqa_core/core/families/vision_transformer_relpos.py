"""timm's ``VisionTransformerRelPos`` (vision_transformer_relpos.py): ViT with a relative position bias on the
attention logits instead of absolute position embeddings -- per layer (``RelPosAttention.rel_pos``) or one for the
model (``shared_rel_pos``, the ``vit_srelpos_*``), computed by an MLP over log-spaced offsets (``mlp``, Swin-v2
style ``mlp_swin``) or looked up in a table (``bias``); pre-norm or residual post-norm (``*_rpn_*``) blocks."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor
from timm.layers import RelPosBias, RelPosMlp
from timm.models.vision_transformer_relpos import VisionTransformerRelPos

from ..rules import BOOLEAN, Rule, integer, one_of, optional
from .base import Family, has_qkv_bias, is_present, register
from .vision_transformer import BACKBONE_ARGS

__all__ = ['RelPosFamily', 'RELPOS_ARGS']

RELPOS_ARGS: Dict[str, Rule] = {
    **{k: BACKBONE_ARGS[k] for k in ('img_size', 'patch_size', 'in_chans', 'num_classes', 'embed_dim', 'depth',
                                     'num_heads', 'mlp_ratio', 'qkv_bias', 'qk_norm', 'init_values', 'class_token',
                                     'drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate')},
    'global_pool': one_of('', 'avg', 'token', says="'', avg or token"),
    'fc_norm': BOOLEAN,
    'rel_pos_type': one_of('mlp', 'mlp_swin', 'bias', says='mlp, mlp_swin or bias'),
    'rel_pos_dim': optional(integer(1, 4096)),
    'shared_rel_pos': BOOLEAN,
}


class RelPosFamily(Family):
    name = 'VisionTransformerRelPos'
    classes = (VisionTransformerRelPos,)
    timm_modules = ('timm.models.vision_transformer_relpos',)
    args = RELPOS_ARGS

    def block_inputs(self, model: VisionTransformerRelPos, images: Tensor) -> Tensor:
        """Patches and the class token: no absolute positions, no pre-norm."""
        x = model.patch_embed(images)
        if model.cls_token is not None:
            x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return x

    def block_context(self, model: VisionTransformerRelPos, images: Tensor) -> Dict[str, Any]:
        """The model-wide bias every block is given (``vit_srelpos_*``); a per-layer bias is the layer's own."""
        if model.shared_rel_pos is None:
            return {}
        return {'shared_rel_pos': model.shared_rel_pos.get_bias()}

    def geometry(self, model: VisionTransformerRelPos) -> Dict[str, Any]:
        """The block class (pre-norm or residual post-norm) is the architecture's own."""
        block = model.blocks[0]
        attn = block.attn
        geometry = self.common_geometry(model)
        rel_pos = model.shared_rel_pos if model.shared_rel_pos is not None else attn.rel_pos
        geometry.update(
            qkv_bias=has_qkv_bias(attn),
            qk_norm=is_present(attn.q_norm),
            init_values=1.0 if is_present(getattr(block, 'ls1', None)) else None,  # the value is a loaded weight
            class_token=self.has_class_token(model),
            fc_norm=is_present(model.fc_norm),
            shared_rel_pos=model.shared_rel_pos is not None,
        )
        if isinstance(rel_pos, RelPosMlp):
            geometry['rel_pos_type'] = 'mlp_swin' if rel_pos.mode == 'swin' else 'mlp'
            geometry['rel_pos_dim'] = int(rel_pos.mlp.fc1.out_features)
        elif isinstance(rel_pos, RelPosBias):
            geometry['rel_pos_type'] = 'bias'
        return geometry


register(RelPosFamily())
