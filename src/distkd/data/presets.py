"""Augmentation presets for file datasets (ImageNet and other ImageFolder trees).

The DIST paper trains ImageNet students under three strategies; each is a :class:`Preset`:

* ``b1`` — the standard ResNet recipe: RandomResizedCrop + horizontal flip; eval resize 256 /
  center crop 224 (for ``image_size=224``).
* ``b2`` — B1 + RandAugment ``rand-m9-mstd0.5`` + random erasing (p=0.2), bilinear resizing as the
  authors' code. Label smoothing 0.1 and an EMA of the weights (decay 0.9999) belong to the trainer: see
  ``recommended``.
* ``b3`` — DeiT-like: RandAugment ``rand-m9-mstd0.5-inc1``, mixup 0.8, cutmix 1.0, random erasing
  (p=0.25). AdamW, a cosine schedule and drop-path 0.2 belong to the trainer/model: see ``recommended``.

The image pipelines are timm's (``timm.data.create_transform``) and the batch mixing is timm's
``Mixup``; this module only fixes their arguments. ``recommended`` holds the trainer and model
settings the paper pairs with each strategy, so configs can cite them instead of restating them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from PIL import Image
from timm.data import Mixup, create_transform

from distkd.errors import UnknownNameError
from distkd.registry import nearest

EVAL_CROP_PCT = 0.875  # eval resize = image_size / 0.875 (256 for 224), then center crop image_size

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class MixupSpec:
    """Arguments of timm's ``Mixup`` except the number of classes.

    ``mixup_alpha``/``cutmix_alpha`` are the Beta(alpha, alpha) parameters (0 disables that kind);
    ``prob`` is the chance a batch is mixed at all, ``switch_prob`` the chance of cutmix over mixup
    when both are on, ``mode`` one of ``batch``/``pair``/``elem``, and ``label_smoothing`` is applied
    to the mixed one-hot targets (so the trainer's own label smoothing must then be 0).
    """

    mixup_alpha: float
    cutmix_alpha: float
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    label_smoothing: float = 0.1

    def build(self, num_classes: int) -> Mixup:
        """timm's ``Mixup``: called on ``(x (B, C, H, W) float, y (B,) int64)`` with B even, it mixes
        ``x`` in place and returns it with soft targets float (B, num_classes) whose rows sum to 1."""
        return Mixup(
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.prob,
            switch_prob=self.switch_prob,
            mode=self.mode,
            label_smoothing=self.label_smoothing,
            num_classes=num_classes,
        )


@dataclass(frozen=True)
class Preset:
    """One training strategy: the per-image pipelines, the batch mixing, and the settings that go with it.

    ``auto_augment`` is a timm RandAugment string or None; ``re_prob`` the random-erasing probability
    (per-pixel random fill, one region); ``interpolation`` the resize filter of both pipelines.
    """

    name: str
    description: str
    auto_augment: str | None
    re_prob: float
    interpolation: str
    mixup: MixupSpec | None
    recommended: Mapping[str, object] = field(default_factory=dict)

    def train_transform(
        self, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> Transform:
        """PIL RGB image -> float (3, image_size, image_size), normalised with ``mean``/``std``."""
        return create_transform(
            image_size,
            is_training=True,
            color_jitter=None,  # no preset uses colour jitter (RandAugment replaces it in b2/b3)
            auto_augment=self.auto_augment,
            interpolation=self.interpolation,
            re_prob=self.re_prob,
            re_mode="pixel",
            re_count=1,
            mean=mean,
            std=std,
        )


def _frozen(settings: dict[str, object]) -> Mapping[str, object]:
    return MappingProxyType(settings)


PRESETS: Mapping[str, Preset] = _frozen(
    {
        "b1": Preset(
            name="b1",
            description="standard ResNet recipe: RandomResizedCrop + flip",
            auto_augment=None,
            re_prob=0.0,
            interpolation="bilinear",
            mixup=None,
            recommended=_frozen(
                {
                    "epochs": 100,
                    "optimizer": "sgd",
                    "momentum": 0.9,
                    "lr": 0.1,  # for a total batch of 256; scale linearly
                    "weight_decay": 1e-4,
                    "schedule": "step",  # x0.1 every 30 epochs
                    "label_smoothing": 0.0,
                    "ema_decay": None,
                }
            ),
        ),
        "b2": Preset(
            name="b2",
            description="B1 + RandAugment rand-m9-mstd0.5 + random erasing 0.2",
            auto_augment="rand-m9-mstd0.5",
            re_prob=0.2,
            interpolation="bilinear",  # the DIST authors' code (image_classification_sota --interpolation default)
            mixup=None,
            recommended=_frozen({"label_smoothing": 0.1, "ema_decay": 0.9999}),
        ),
        "b3": Preset(
            name="b3",
            description="DeiT-like: RandAugment rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, random erasing 0.25",
            auto_augment="rand-m9-mstd0.5-inc1",
            re_prob=0.25,
            interpolation="bicubic",
            mixup=MixupSpec(mixup_alpha=0.8, cutmix_alpha=1.0),
            recommended=_frozen(
                {
                    "optimizer": "adamw",
                    "schedule": "cosine",
                    "drop_path_rate": 0.2,
                    "label_smoothing": 0.0,  # already applied to the mixed targets (MixupSpec)
                }
            ),
        ),
    }
)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); an unknown name lists the known ones."""
    key = name.lower()
    if key not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise UnknownNameError(
            f"unknown augmentation preset '{name}'{nearest(key, list(PRESETS))}; known: {known}"
        )
    return PRESETS[key]
