"""Pieces shared by the CIFAR zoo: channel shuffle, the ready tap names, and the reference initialisation."""

from __future__ import annotations

from torch import Tensor, nn


class ChannelShuffle(nn.Module):
    """Interleave channels across ``groups``: ``(N, C, H, W) -> (N, C, H, W)`` (ShuffleNet)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def ready_taps(stem: str, stages: list[str], preacts: list[str], penultimate: str) -> dict[str, str]:
    """The ``distill_taps`` of a zoo model, RepDistiller's ``forward(x, is_feat=True, preact=...)`` features:
    ``stem`` is ``feats[0]``, ``stage{k}`` is ``feats[k]`` (``stage{k}_preact`` its ``preact=True`` version) and
    ``penultimate`` the pooled, flattened ``feats[-1]`` that the classifier takes. Values are module paths."""
    taps = {"stem": stem}
    taps.update({f"stage{k}": path for k, path in enumerate(stages, 1)})
    taps["penultimate"] = penultimate
    taps.update({f"stage{k}_preact": path for k, path in enumerate(preacts, 1)})
    return taps


def preact_batchnorms(paths: list[str]) -> dict[str, str]:
    """A zoo model's ``distill_preact_bn``: for each ``stage{k}_preact`` tap, the BatchNorm whose affine parameters
    model that pre-ReLU value (the authors' ``get_bn_before_relu``, which OFD's margins read). Module paths."""
    return {f"stage{k}_preact": path for k, path in enumerate(paths, 1)}


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
