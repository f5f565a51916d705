"""The bundled ImageNet and Cityscapes schedules, step by step, against the authors' schedulers re-computed here
from their definitions (hunto/image_classification_sota lib/utils/scheduler.py: a GradualWarmupScheduler whose
warm-up rises from ``warmup_lr`` once per epoch, around a StepLR stepped with ``t - W - 1`` once the ``W`` warm-up
steps are done; hunto/DIST_KD segmentation/train_kd.py ``adjust_lr``: poly 0.9 with a floor of 1e-4; for B3,
microsoft/Swin-Transformer lr_scheduler.py: timm's CosineLRScheduler per step with a warm-up prefix)."""

from __future__ import annotations

import math

import pytest
import torch

from distkd.config import load_config, resolve_config_path
from distkd.engine.optim import build_optimizer, build_scheduler
from distkd.errors import ConfigError


def our_lrs(config: str, steps_per_epoch: int, steps: int, epochs: float) -> list[float]:
    cfg = load_config(resolve_config_path(config), ["data.root=/d", "teacher.checkpoint=/t.pt"])
    optimizer = build_optimizer(torch.nn.Linear(2, 2), cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.optim.lr, epochs, steps_per_epoch)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def authors_warmup_step(t: int, base: float, warmup_lr: float, warmup_epochs: int, decay_epochs: float,
                        rate: float, per_epoch: int) -> float:
    """The lr of step ``t`` (``t`` steps done) under the authors' ``--sched step`` with warm-up."""
    warmup, decay = warmup_epochs * per_epoch, decay_epochs * per_epoch
    if warmup == 0:  # no warm-up: the StepLR alone, stepped with t
        return base * rate ** (t // decay)
    if t <= warmup:
        return warmup_lr + (base - warmup_lr) * (t // per_epoch * per_epoch) / warmup
    return base * rate ** ((t - warmup - 1) // decay)


@pytest.mark.parametrize("per_epoch", [5, 7])  # 2.4 epochs = 12 steps, or a fractional 16.8
def test_b2_follows_the_authors_warmup_and_step_decay(per_epoch: int) -> None:
    # dist_b2.yaml: lr 0.048 (batch 768), warm-up 3 epochs from 1e-6, x0.97 every 2.4 epochs
    steps = 12 * per_epoch
    got = our_lrs("imagenet/b2_resnet50sb-resnet18.yaml", per_epoch, steps, epochs=450)
    want = [authors_warmup_step(t, 0.048, 1e-6, 3, 2.4, 0.97, per_epoch) for t in range(steps)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert got[0] == pytest.approx(1e-6) and got[3 * per_epoch] == pytest.approx(0.048)


def test_b1_steps_by_ten_every_30_epochs_without_warmup() -> None:
    per_epoch = 3
    got = our_lrs("imagenet/b1_resnet34-resnet18.yaml", per_epoch, 95 * per_epoch, epochs=100)
    want = [authors_warmup_step(t, 0.1, 0.0, 0, 30, 0.1, per_epoch) for t in range(95 * per_epoch)]
    assert got == pytest.approx(want, rel=1e-9)


def swin_cosine_step(t: int, base: float, warmup_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Swin's ``build_scheduler`` (cosine, WARMUP_PREFIX): timm's CosineLRScheduler(t_initial=total - warmup,
    lr_min, warmup_lr_init, warmup_t=warmup, cycle_limit=1, t_in_epochs=False, warmup_prefix=True) at update ``t``."""
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    span = total - warmup
    if t - warmup >= span:  # past its one cycle
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * (t - warmup) / span))


def test_b3_follows_swins_warmup_prefixed_cosine() -> None:
    # Swin config.py: 300 epochs, 20 warm-up, BASE_LR 5e-4, WARMUP_LR 5e-7, MIN_LR 5e-6, each x 1024 / 512 (main.py).
    # Swin's loop calls step_update(epoch * n + idx) after step idx, so its step k runs at f(k - 1): distkd runs
    # f(k), one step earlier (at most one step's change of the lr apart).
    per_epoch, epochs = 3, 300
    total = per_epoch * epochs
    got = our_lrs("imagenet/b3_swinl-swint.yaml", per_epoch, total + 2, epochs=epochs)
    want = [swin_cosine_step(t, 1e-3, 1e-6, 1e-5, 20 * per_epoch, total) for t in range(total + 2)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert got[0] == pytest.approx(1e-6) and got[20 * per_epoch] == pytest.approx(1e-3) and got[-1] == 1e-5


def test_cityscapes_poly_with_the_authors_floor() -> None:
    per_epoch, epochs = 4, 3
    total = per_epoch * epochs
    got = our_lrs("cityscapes/dist_deeplabv3_resnet18.yaml", per_epoch, total, epochs=epochs)
    want = [1e-4 + (0.02 - 1e-4) * (1 - t / total) ** 0.9 for t in range(total)]
    assert got == pytest.approx(want, rel=1e-9)
    alone = our_lrs("cityscapes/student_deeplabv3_resnet18.yaml", per_epoch, total, epochs=epochs)
    assert alone == pytest.approx([0.02 * (1 - t / total) ** 0.9 for t in range(total)], rel=1e-9)


def test_decay_after_warmup_is_for_the_step_schedule_only() -> None:
    with pytest.raises(ConfigError, match="schedule.decay_after_warmup applies to schedule.name=step"):
        load_config(resolve_config_path("demo/student.yaml"), ["schedule.decay_after_warmup=true"])
