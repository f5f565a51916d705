"""Optimizers and learning-rate schedules built from the config."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from distkd.config import OptimConfig, ScheduleConfig
from distkd.errors import ConfigError


def param_groups(parameters: Iterable[nn.Parameter], weight_decay: float, no_decay_norm_bias: bool,
                 exempt: Iterable[nn.Parameter] = ()) -> list[dict]:
    """One group, or two when norm weights, biases (every parameter with ndim <= 1) and the ``exempt``
    parameters (see :func:`decay_exempt`) skip weight decay."""
    params = [p for p in parameters if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    skip = {id(p) for p in exempt}
    decay = [p for p in params if p.ndim > 1 and id(p) not in skip]
    no_decay = [p for p in params if p.ndim <= 1 or id(p) in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decay_exempt(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that modules inside ``model`` exempt from weight decay, as timm's and Swin's optimizer
    factories read them: ``no_weight_decay()`` (parameter names in that module: Swin's relative-position bias
    tables, ViT's position embedding and class token) and ``no_weight_decay_keywords()`` (name substrings)."""
    exempt: dict[int, nn.Parameter] = {}
    for module in model.modules():
        names = module.no_weight_decay() if callable(getattr(module, "no_weight_decay", None)) else ()
        keywords = (module.no_weight_decay_keywords() if callable(getattr(module, "no_weight_decay_keywords", None))
                    else ())
        for name, param in module.named_parameters():
            if name in names or any(k in name for k in keywords):
                exempt[id(param)] = param
    return list(exempt.values())


def build_optimizer(model_or_groups: nn.Module | list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """``cfg``'s optimizer over a model's parameters (split by :func:`param_groups`) or over given groups."""
    groups = (param_groups(model_or_groups.parameters(), cfg.weight_decay, cfg.no_decay_norm_bias,
                           decay_exempt(model_or_groups))
              if isinstance(model_or_groups, nn.Module) else model_or_groups)
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum == 0:
            raise ConfigError("optim.nesterov=true needs optim.momentum > 0; set optim.momentum=0.9 or nesterov=false")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    from timm.optim import RMSpropTF  # importing timm costs seconds; only this optimizer needs it

    return RMSpropTF(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps)


def lr_factor(cfg: ScheduleConfig, base_lr: float, epochs: float,
              steps_per_epoch: int | None = None) -> Callable[[float], float]:
    """The multiplier of the base lr as a function of the (fractional) epoch, ``steps / steps_per_epoch``.

    ``cfg.warmup_per_epoch``: the warm-up factor rises once per epoch (``floor(epoch)``), not every step.
    ``cfg.decay_after_warmup`` (step schedule; needs ``steps_per_epoch``): as the DIST authors' scheduler, the
    lr is the base lr at the end of the warm-up (step ``W``) and after ``t > W`` steps it is
    ``gamma ** ((t - W - 1) // (step_size * steps_per_epoch))``: decays are counted from the end of the
    warm-up, the first ``step_size`` epochs of steps after it.
    """
    if cfg.decay_after_warmup and not steps_per_epoch:
        raise ValueError("decay_after_warmup needs steps_per_epoch")

    def main(epoch: float) -> float:
        if cfg.name == "multistep":
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        if cfg.name == "step" and cfg.decay_after_warmup:
            step, warmup = round(epoch * steps_per_epoch), round(cfg.warmup_epochs * steps_per_epoch)
            return cfg.gamma ** (max(step - warmup - 1, 0) // (cfg.step_size * steps_per_epoch))
        if cfg.name == "step":
            return cfg.gamma ** math.floor(epoch / cfg.step_size)
        span = max(epochs - cfg.warmup_epochs, 1e-8)
        progress = min(max(epoch - cfg.warmup_epochs, 0.0) / span, 1.0)
        floor = cfg.min_lr / base_lr
        if cfg.name == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.name == "poly":
            return floor + (1 - floor) * (1 - progress) ** cfg.power
        return 1.0

    def factor(epoch: float) -> float:
        if epoch < cfg.warmup_epochs:
            done = math.floor(epoch) if cfg.warmup_per_epoch else epoch
            return cfg.warmup_start + (1 - cfg.warmup_start) * done / cfg.warmup_epochs
        return main(epoch)

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float, epochs: float, iters_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; milestones and warm-up are given in (fractional) epochs.

    Every group's lr follows the same factor of its own initial lr (a term's adapters may start elsewhere).
    """
    factor = lr_factor(cfg, base_lr, epochs, iters_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step / iters_per_epoch))
