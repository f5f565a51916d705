"""Evaluation metrics (segmentation: :class:`ConfusionMatrix`)."""

from distkd.metrics.segmentation import ConfusionMatrix

__all__ = ["ConfusionMatrix"]
