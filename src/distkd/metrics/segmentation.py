"""Semantic-segmentation metrics accumulated in a confusion matrix.

Convention for the mean IoU: a class whose union is empty (it appears in neither the targets nor the
predictions seen so far) has an undefined IoU (NaN in :meth:`ConfusionMatrix.iou`) and is left out of
:meth:`ConfusionMatrix.miou`; every other class counts, including classes that were predicted but never
present in the target (their IoU is 0). This is the standard Cityscapes/VOC evaluation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from distkd.errors import ShapeError


class ConfusionMatrix:
    """A ``(K, K)`` count matrix, rows = target class, columns = predicted class.

    Pixels whose target equals ``ignore_index`` are not counted; any other target outside ``[0, K)`` is
    an error, as is a prediction outside ``[0, K)``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self.matrix.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Count predicted labels ``pred`` (N, H, W) int against ``target`` (N, H, W) int."""
        if pred.shape != target.shape:
            raise ShapeError(
                f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}; "
                "upsample the logits to the label size and take argmax over classes first"
            )
        k = self.num_classes
        keep = target != self.ignore_index
        pred, target = pred[keep].long(), target[keep].long()
        if target.numel() and (target.min() < 0 or target.max() >= k):
            raise ShapeError(
                f"target labels must lie in [0, {k}) or equal {self.ignore_index}; check the label mapping"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ShapeError(
                f"predicted labels must lie in [0, {k}); the model has the wrong number of classes"
            )
        counts = torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)
        self.matrix = self.matrix.to(counts.device) + counts

    def all_reduce(self) -> None:
        """Sum the matrix over all processes when torch.distributed is initialised (no-op otherwise)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)

    def iou(self) -> torch.Tensor:
        """Per-class intersection over union, float64 (K,); NaN for classes with an empty union."""
        m = self.matrix.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))

    def miou(self) -> float:
        """Mean IoU over the classes with a nonzero union (present in target or prediction); NaN if none."""
        iou = self.iou()
        valid = ~iou.isnan()
        return float(iou[valid].mean()) if valid.any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Fraction of counted (non-ignored) pixels predicted correctly; NaN if none were counted."""
        total = self.matrix.sum()
        return float(self.matrix.diag().sum().double() / total) if total > 0 else float("nan")
