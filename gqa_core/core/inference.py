"""Batch-invariant prediction.

Every default-mode variant decides a sample's grouping from that sample alone, but BLAS does not promise
bit-identical results for one row of a matrix product at different batch sizes (on this CPU timm's own
classifier head differs by ~4e-7 between batch 1 and batch 33). Evaluation that must give the *same bits*
for an image whatever else is in the batch runs it as a batch of one; that is what :func:`predict` does.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ['predict']


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor) -> Tensor:
    """Logits ``(B, num_classes)`` for ``images`` ``(B, C, H, W)``, each image computed on its own."""
    if model.training:
        raise ValueError('predict() needs the model in eval mode (model.eval())')
    if images.dim() != 4:
        raise ValueError(f'expected images of shape (B, C, H, W), got {tuple(images.shape)}')
    return torch.cat([model(image[None]) for image in images]) if len(images) else model(images)
