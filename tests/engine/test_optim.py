"""Optimizers and per-iteration learning-rate schedules, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from timm.optim import RMSpropTF
from torch import nn

from distkd.config import OptimConfig, ScheduleConfig
from distkd.engine.optim import build_optimizer, build_scheduler, decay_exempt, lr_factor, param_groups
from distkd.errors import ConfigError
from distkd.models import create_model


@pytest.mark.parametrize(
    ("epoch", "expected"), [(0.0, 1.0), (1.99, 1.0), (2.0, 0.1), (3.5, 0.1), (4.0, 0.01), (9.0, 0.01)]
)
def test_multistep_multiplies_by_gamma_at_each_milestone(epoch: float, expected: float) -> None:
    factor = lr_factor(ScheduleConfig(name="multistep", milestones=[2, 4], gamma=0.1), base_lr=0.1, epochs=10)
    assert factor(epoch) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("epoch", "expected"), [(0.0, 1.0), (2.9, 1.0), (3.0, 0.5), (5.99, 0.5), (6.5, 0.25)])
def test_step_halves_every_step_size_epochs(epoch: float, expected: float) -> None:
    factor = lr_factor(ScheduleConfig(name="step", step_size=3, gamma=0.5), base_lr=0.1, epochs=10)
    assert factor(epoch) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, 0.1),  # warm-up starts at warmup_start
        (1.0, 0.55),  # half-way through a 2-epoch linear warm-up: 0.1 + 0.9 / 2
        (2.0, 1.0),  # the cosine starts at the full lr
        (4.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))),  # progress (4 - 2) / 8 = 1/4
        (6.0, 0.55),  # progress 1/2: min_lr / lr + half the remaining range = 0.1 + 0.45
        (10.0, 0.1),  # ends at min_lr / lr
        (12.0, 0.1),  # and stays there
    ],
)
def test_cosine_with_warmup_and_floor(epoch: float, expected: float) -> None:
    cfg = ScheduleConfig(name="cosine", warmup_epochs=2, warmup_start=0.1, min_lr=0.01)
    assert lr_factor(cfg, base_lr=0.1, epochs=10)(epoch) == pytest.approx(expected, rel=1e-12)


def test_warmup_precedes_multistep_and_constant_stays_flat() -> None:
    cfg = ScheduleConfig(name="multistep", milestones=[3], gamma=0.2, warmup_epochs=1, warmup_start=0.5)
    factor = lr_factor(cfg, base_lr=1.0, epochs=5)
    assert [factor(e) for e in (0.0, 0.5, 1.0, 2.9, 3.0)] == pytest.approx([0.5, 0.75, 1.0, 1.0, 0.2])
    flat = lr_factor(ScheduleConfig(name="constant"), base_lr=1.0, epochs=5)
    assert [flat(e) for e in (0.0, 2.5, 5.0)] == [1.0, 1.0, 1.0]


def test_scheduler_steps_once_per_iteration_with_epochs_as_fractions() -> None:
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, OptimConfig(lr=0.1))
    cfg = ScheduleConfig(name="cosine", warmup_epochs=1, warmup_start=0.1)
    scheduler = build_scheduler(optimizer, cfg, base_lr=0.1, epochs=2, iters_per_epoch=4)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # iteration i is epoch i / 4: warm-up 0.01 -> 0.1 over epoch 1, then half a cosine down to 0 over epoch 2.
    expected = [0.01, 0.0325, 0.055, 0.0775, 0.1, 0.05 * (1 + math.cos(math.pi / 4)), 0.05,
                0.05 * (1 + math.cos(3 * math.pi / 4)), 0.0]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_no_decay_norm_bias_puts_exactly_the_1d_params_in_the_zero_decay_group() -> None:
    model = create_model("small_cnn3_w2", num_classes=10)
    model.features[0].weight.requires_grad_(False)  # frozen params are left out of every group
    decay, no_decay = param_groups(model.parameters(), weight_decay=5e-4, no_decay_norm_bias=True)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert {names[id(p)] for p in decay["params"]} == {
        n for n, p in model.named_parameters() if p.ndim > 1 and n != "features.0.weight"
    }
    assert "fc.bias" in {names[id(p)] for p in no_decay["params"]}
    assert "features.1.weight" in {names[id(p)] for p in no_decay["params"]}  # a BatchNorm weight
    (single,) = param_groups(model.parameters(), weight_decay=5e-4, no_decay_norm_bias=False)
    assert len(single["params"]) == len(list(model.parameters())) - 1 and single["weight_decay"] == 5e-4


def test_swin_relative_position_bias_tables_skip_weight_decay() -> None:
    # Swin's official optimizer.py (set_weight_decay): no decay for 1-d params, biases, model.no_weight_decay() names
    # and names holding a model.no_weight_decay_keywords() entry ({'relative_position_bias_table'}).
    swin = create_model("timm_swin_tiny_patch4_window7_224", num_classes=10, embed_dim=8, depths=(1, 1, 1, 1),
                        num_heads=(1, 1, 1, 1))
    names = {id(p): n for n, p in swin.named_parameters()}
    decay, no_decay = param_groups(swin.parameters(), 0.05, True, decay_exempt(swin))
    tables = {n for n in names.values() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 4 and all(swin.get_parameter(n).ndim == 2 for n in tables)
    assert {names[id(p)] for p in no_decay["params"]} == tables | {n for n, p in swin.named_parameters() if p.ndim <= 1}
    assert not tables & {names[id(p)] for p in decay["params"]}
    optimizer = build_optimizer(swin, OptimConfig(name="adamw", weight_decay=0.05, no_decay_norm_bias=True))
    assert {names[id(p)] for p in optimizer.param_groups[1]["params"]} >= tables

    class Official(nn.Module):  # Swin's own model class declares keywords, matched inside names
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Module()
            self.block.relative_position_bias_table = nn.Parameter(torch.zeros(3, 2))
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, 2))
            self.proj = nn.Linear(2, 2)

        def no_weight_decay(self) -> set[str]:
            return {"absolute_pos_embed"}

        def no_weight_decay_keywords(self) -> set[str]:
            return {"relative_position_bias_table"}

    model = nn.Sequential(Official())  # declared below the top level: names are the declaring module's
    exempt = {id(p) for p in decay_exempt(model)}
    assert exempt == {id(model[0].block.relative_position_bias_table), id(model[0].absolute_pos_embed)}
    assert decay_exempt(create_model("small_cnn3_w2", num_classes=10)) == []


@pytest.mark.parametrize(
    ("name", "kind"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("rmsprop_tf", RMSpropTF)]
)
def test_each_optimizer_builds_with_its_settings_and_steps(name: str, kind: type) -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn3_w2", num_classes=10)
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=1e-4, no_decay_norm_bias=True, betas=[0.8, 0.99], eps=1e-6,
                      nesterov=name == "sgd")
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is kind
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-4, 0.0]
    assert all(g["lr"] == 0.01 for g in optimizer.param_groups)
    if name == "adamw":
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.99) and optimizer.param_groups[0]["eps"] == 1e-6
    else:
        assert optimizer.param_groups[0]["momentum"] == 0.9
    if name == "sgd":
        assert optimizer.param_groups[0]["nesterov"] is True
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 1, 28, 28)).logsumexp(1).mean().backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_nesterov_without_momentum_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="optim.nesterov=true needs optim.momentum > 0"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(nesterov=True, momentum=0.0))


def test_step_size_may_be_fractional_as_in_the_b2_recipe() -> None:
    factor = lr_factor(ScheduleConfig(name="step", step_size=2.4, gamma=0.97), base_lr=0.048, epochs=450)
    assert factor(2.3) == 1.0
    assert factor(2.4) == pytest.approx(0.97)
    assert factor(4.9) == pytest.approx(0.97**2)
