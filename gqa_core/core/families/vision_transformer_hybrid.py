"""timm's hybrid ViTs (vision_transformer_hybrid.py): ``VisionTransformer`` over the feature map of a
convolutional stem (``HybridEmbed``): R50+ViT, R26+ViT, R+ViT-Ti and MobileCLIP's image encoder (``vit_base_mci``,
a three-convolution stem and no projection). The blocks are timm's ViT blocks, so everything but the patch
embedding is :class:`~.vision_transformer.VisionTransformerFamily`'s."""
from __future__ import annotations

from typing import Optional, Tuple

from timm.layers import HybridEmbed
from timm.models.vision_transformer import VisionTransformer

from .base import register
from .vision_transformer import BACKBONE_ARGS, VisionTransformerFamily

__all__ = ['HybridFamily']


class HybridFamily(VisionTransformerFamily):
    """The constructor is VisionTransformer's (the stem is the architecture's own, built by its entrypoint), so
    are the geometry keys; ``patch_size`` is the patch on the stem's feature map (1 for most: a token per
    feature-map cell), ``img_size`` the image's."""
    name = 'VisionTransformerHybrid'
    classes = (VisionTransformer,)
    embed_classes = (HybridEmbed,)
    timm_modules = ('timm.models.vision_transformer_hybrid',)
    args = BACKBONE_ARGS

    def token_pixels(self, model: VisionTransformer) -> Tuple[int, int]:
        """The stem's stride times the patch on its feature map."""
        return tuple(int(r) for r in self.patch_embed(model).feat_ratio(as_scalar=False))

    def in_chans(self, model: VisionTransformer) -> Optional[int]:
        """The stem's input (the projection reads the feature map)."""
        return int(self.patch_embed(model).in_chans)


register(HybridFamily())
