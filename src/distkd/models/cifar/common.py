"""Pieces shared by the CIFAR zoo: channel shuffle, global pooling, and the reference initialisation."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelShuffle(nn.Module):
    """Interleave channels across ``groups``: ``(N, C, H, W) -> (N, C, H, W)`` (ShuffleNet)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def flatten_pool(x: Tensor) -> Tensor:
    """Global average pool ``(N, C, H, W) -> (N, C)``."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def init_reference(model: nn.Module, linear_std: float | None = None) -> None:
    """He-normal (fan-out) convolutions, unit/zero BatchNorm, zero biases, as the reference zoo does.

    ``linear_std``: when given, linear weights are drawn from ``N(0, linear_std^2)`` and linear biases
    zeroed (VGG, MobileNetV2); otherwise linear layers keep PyTorch's default initialisation.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
