"""Re-normalise a batch from the student's input statistics to the teacher's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Renormalize(nn.Module):
    """``(x * std_s + mean_s - mean_t) / std_t`` per channel, for x of shape (N, C, H, W)."""

    def __init__(
        self, mean_s: Sequence[float], std_s: Sequence[float], mean_t: Sequence[float], std_t: Sequence[float]
    ) -> None:
        super().__init__()
        shape = (1, -1, 1, 1)
        std_s_, std_t_ = torch.tensor(std_s).view(shape), torch.tensor(std_t).view(shape)
        self.register_buffer("scale", std_s_ / std_t_)
        self.register_buffer("shift", (torch.tensor(mean_s).view(shape) - torch.tensor(mean_t).view(shape)) / std_t_)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
