import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')

import pytest
import torch
import timm
from timm.models.vision_transformer import VisionTransformer


def tiny_vit(num_heads: int = 6, depth: int = 2, head_dim: int = 8, **kwargs) -> VisionTransformer:
    """A real timm VisionTransformer small enough for exhaustive tests (32 px, patch 8 -> 16 patches)."""
    torch.manual_seed(kwargs.pop('seed', 0))
    args = dict(img_size=32, patch_size=8, embed_dim=num_heads * head_dim, depth=depth, num_heads=num_heads,
                mlp_ratio=2.0, num_classes=10)
    args.update(kwargs)
    return VisionTransformer(**args).eval()


@pytest.fixture(scope='session')
def vit_small():
    torch.manual_seed(0)
    return timm.create_model('vit_small_patch16_224').eval()
