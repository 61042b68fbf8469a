"""Top-1, top-5 and per-class accuracy, accumulated batch by batch (the trainer's and the evaluator's count)."""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import Tensor

__all__ = ['Accuracy']


class Accuracy:
    """Counts hits over batches of logits.

    Args:
        num_classes: classes the labels index (per-class accuracy has one entry each).
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.hits1 = self.hits5 = self.total = 0
        self.per_class_hit = torch.zeros(self.num_classes, dtype=torch.long)
        self.per_class_n = torch.zeros(self.num_classes, dtype=torch.long)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        top = logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()
        labels = labels.cpu()
        hit = top[:, 0] == labels
        self.hits1 += int(hit.sum())
        self.hits5 += int((top == labels[:, None]).any(-1).sum())
        self.total += len(labels)
        self.per_class_hit.index_add_(0, labels, hit.long())
        self.per_class_n.index_add_(0, labels, torch.ones_like(labels))

    def result(self) -> Dict[str, Any]:
        """``top1``, ``top5`` (fractions), ``n`` and ``per_class`` (a list, 0 for classes never seen)."""
        total = max(self.total, 1)
        return dict(top1=self.hits1 / total, top5=self.hits5 / total, n=self.total,
                    per_class=(self.per_class_hit.float() / self.per_class_n.clamp_min(1)).tolist())
