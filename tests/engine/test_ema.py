"""The EMA of a model's weights: a lerp per parameter and floating-point buffer after each update (BatchNorm
statistics averaged, as timm's ModelEmaV2); integer buffers copied."""

from __future__ import annotations

import torch
from torch import nn

from distkd.engine.ema import EMA


def test_ema_is_the_hand_computed_lerp_of_parameters_and_bn_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    expected = [p.detach().clone() for p in model.parameters()]
    stats = [model[1].running_mean.clone(), model[1].running_var.clone()]
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 3))  # train-mode forward: BatchNorm running stats move
        ema.update(model)
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, model.parameters(), strict=True)]
        now = [model[1].running_mean, model[1].running_var]
        stats = [0.9 * e + 0.1 * b for e, b in zip(stats, now, strict=True)]
    for got, want in zip(ema.module.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ema.module[1].running_mean, stats[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ema.module[1].running_var, stats[1], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ema.module[1].running_mean, model[1].running_mean)  # averaged, not copied
    assert model[1].num_batches_tracked.item() == 3 and ema.module[1].num_batches_tracked.item() == 3


def test_ema_holds_its_own_copy() -> None:
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert torch.equal(ema.module.weight, start)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.5 * start + 0.5)
    assert model.weight.requires_grad and torch.equal(model.weight, torch.ones(2, 2))
