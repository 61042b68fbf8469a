"""timm's DeepSeek-V4 vision tower (deepseek_vit.py): ``DeepseekVitEncoder`` (the ``*_enc`` models) and
``DeepseekVitClassifier``, which wraps one as ``encoder``. Pre-norm ``DeepseekVitBlock`` s (RMSNorm,
``AttentionRope`` with 2D rotate-half RoPE as the only position encoding, a bias-free SwiGLU), a final RMSNorm,
and the VLM projector (``aligner``) that unshuffles r x r tokens (zero-padding the grid)."""
from __future__ import annotations

from typing import Any, Dict

from torch import Tensor, nn
from timm.models.deepseek_vit import DeepseekVitClassifier, DeepseekVitEncoder

from ..rules import BOOLEAN, Rule, integer, one_of
from .base import register
from .qwen3_vit import TOWER_ARGS, VlmTowerFamily

__all__ = ['DeepseekVitFamily', 'DEEPSEEK_ARGS']

DEEPSEEK_ARGS: Dict[str, Rule] = {
    **TOWER_ARGS,
    'global_pool': one_of('', 'avg', 'align', says="'', avg or align (align: the encoder's projector)"),
    'encoder_pool': one_of('', 'align'),
    'downsample_ratio': integer(1, 8),
    'dynamic_img_pad': BOOLEAN,
}


class DeepseekVitFamily(VlmTowerFamily):
    name = 'DeepseekVit'
    classes = (DeepseekVitClassifier, DeepseekVitEncoder)
    timm_modules = ('timm.models.deepseek_vit',)
    args = DEEPSEEK_ARGS
    encoder_class = DeepseekVitEncoder
    projector_name = 'aligner'

    def final_tokens(self, trunk: nn.Module, tokens: Tensor) -> Tensor:
        return trunk.norm(tokens)

    def geometry(self, model: nn.Module) -> Dict[str, Any]:
        trunk = self.trunk(model)
        geometry = self.tower_geometry(model)
        pool = 'align' if trunk.aligner is not None else ''
        if model is trunk:
            geometry['global_pool'] = pool or trunk.global_pool
        else:
            geometry['encoder_pool'] = pool
        geometry.update(downsample_ratio=int(trunk.downsample_ratio),
                        dynamic_img_pad=bool(getattr(trunk.patch_embed, 'dynamic_img_pad', False)))
        return geometry


register(DeepseekVitFamily())
