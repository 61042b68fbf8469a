"""timm's ``Beit`` (beit.py): BEiT and BEiT v2, with per-block or shared relative position bias."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor
from timm.models.beit import Beit

from ..rules import BOOLEAN, Rule
from .base import Family, has_qkv_bias, register
from .eva import SHARED_ARGS
from .vision_transformer import BACKBONE_ARGS

__all__ = ['BeitFamily', 'BEIT_ARGS']

BEIT_ARGS: Dict[str, Rule] = {
    **{k: BACKBONE_ARGS[k] for k in SHARED_ARGS if k != 'dynamic_img_size'},
    'use_abs_pos_emb': BOOLEAN,
    'use_rel_pos_bias': BOOLEAN,
    'use_shared_rel_pos_bias': BOOLEAN,
}


class BeitFamily(Family):
    name = 'Beit'
    classes = (Beit,)
    timm_modules = ('timm.models.beit',)
    args = BEIT_ARGS

    def block_inputs(self, model: Beit, images: Tensor) -> Tensor:
        x = model.patch_embed(images)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + model.pos_embed if model.pos_embed is not None else x
        return model.pos_drop(x)

    def block_context(self, model: Beit, images: Tensor) -> Dict[str, Any]:
        """The relative position bias every block shares (when the model has one)."""
        return {'shared_rel_pos_bias': model.rel_pos_bias() if model.rel_pos_bias is not None else None}

    def geometry(self, model: Beit) -> Dict[str, Any]:
        attn, block = model.blocks[0].attn, model.blocks[0]
        geometry = self.common_geometry(model)
        geometry.update(
            qkv_bias=has_qkv_bias(attn),
            init_values=1.0 if getattr(block, 'gamma_1', None) is not None else None,
            use_abs_pos_emb=model.pos_embed is not None,
            use_rel_pos_bias=getattr(attn, 'relative_position_bias_table', None) is not None,
            use_shared_rel_pos_bias=model.rel_pos_bias is not None,
        )
        return geometry


register(BeitFamily())
