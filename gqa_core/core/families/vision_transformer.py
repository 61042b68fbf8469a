"""timm's ``VisionTransformer`` (vision_transformer.py, deit.py): ViT, DeiT, DINOv2, SigLIP, CLIP, ..."""
from __future__ import annotations

from typing import Any, Dict

from timm.models.vision_transformer import VisionTransformer

from ..rules import BOOLEAN, Rule, integer, number, one_of, optional
from .base import RATE, SIZE, Family, has_qkv_bias, is_present, register

__all__ = ['VisionTransformerFamily', 'BACKBONE_ARGS']

# Geometry and regularisation keys of timm's VisionTransformer, each with its rule. Anything else -- a path,
# a URL, a loader option, a layer class -- is refused.
BACKBONE_ARGS: Dict[str, Rule] = {
    'img_size': SIZE,
    'patch_size': integer(1, 64),
    'in_chans': one_of(3, says='3 (RGB)'),
    'num_classes': integer(0, 100_000),
    'global_pool': one_of('', 'token', 'avg', 'avgmax', 'max', 'map', says="'', token, avg, avgmax, max or map"),
    'embed_dim': integer(8, 4096),
    'depth': integer(1, 64),
    'num_heads': integer(1, 64),
    'mlp_ratio': number(0.25, 16),
    'qkv_bias': BOOLEAN,
    'qk_norm': BOOLEAN,
    'proj_bias': BOOLEAN,
    'init_values': optional(number(0, 10)),
    'class_token': BOOLEAN,
    'pos_embed': one_of('learn', 'none'),
    'no_embed_class': BOOLEAN,
    'reg_tokens': integer(0, 64),
    'pre_norm': BOOLEAN,
    'final_norm': BOOLEAN,
    'fc_norm': optional(BOOLEAN, says='null, true or false'),
    'dynamic_img_size': BOOLEAN,
    'dynamic_img_pad': BOOLEAN,
    'drop_rate': RATE,
    'pos_drop_rate': RATE,
    'proj_drop_rate': RATE,
    'attn_drop_rate': RATE,
    'drop_path_rate': RATE,
}


class VisionTransformerFamily(Family):
    name = 'VisionTransformer'
    classes = (VisionTransformer,)
    timm_modules = ('timm.models.vision_transformer', 'timm.models.deit')
    args = BACKBONE_ARGS

    def geometry(self, model: VisionTransformer) -> Dict[str, Any]:
        attn, block = model.blocks[0].attn, model.blocks[0]
        geometry = self.common_geometry(model)
        geometry.update(
            qkv_bias=has_qkv_bias(attn),
            qk_norm=is_present(attn.q_norm),
            proj_bias=attn.proj.bias is not None,
            init_values=1.0 if is_present(getattr(block, 'ls1', None)) else None,  # the value is a loaded weight
            class_token=self.has_class_token(model),
            reg_tokens=self.num_registers(model),
            no_embed_class=bool(model.no_embed_class),
            pos_embed='learn' if model.pos_embed is not None else 'none',
            pre_norm=is_present(model.norm_pre),
            final_norm=is_present(model.norm) or is_present(model.fc_norm),
            fc_norm=is_present(model.fc_norm),
            dynamic_img_size=bool(model.dynamic_img_size),
            dynamic_img_pad=bool(getattr(model.patch_embed, 'dynamic_img_pad', False)),
        )
        fc1 = getattr(block.mlp, 'fc1', None)
        if fc1 is not None:
            geometry['mlp_ratio'] = fc1.out_features / model.embed_dim
        return geometry


register(VisionTransformerFamily())
