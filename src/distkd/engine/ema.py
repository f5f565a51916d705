"""Exponential moving average of a model's weights (evaluated and checkpointed with the run)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * value`` after each step, for the parameters and the floating-point
    buffers (BatchNorm running mean and variance) alike, as timm's ``ModelEmaV2`` (whose ``.module`` /
    ``update(model)`` interface the DIST authors' training script uses); integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.module.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1 - self.decay)
        for ema_b, b in zip(self.module.buffers(), model.buffers(), strict=True):
            if ema_b.is_floating_point():
                ema_b.lerp_(b.to(ema_b.dtype), 1 - self.decay)
            else:
                ema_b.copy_(b)
