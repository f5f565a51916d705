"""Pieces every task builds the same way: models from the config, distillation terms, an input check."""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from distkd.config import DataConfig, ModelConfig, RunConfig, TermConfig
from distkd.data.base import Split
from distkd.distill import Term
from distkd.distill.transforms import get_transform
from distkd.engine import distributed
from distkd.engine.trainer import Loader
from distkd.errors import CheckpointError, ConfigError, first_line
from distkd.losses import build_loss
from distkd.models import create_model
from distkd.models.weights import load_pretrained, load_weights


def build_model(cfg: ModelConfig, num_classes: int, role: str) -> nn.Module:
    """Create ``cfg.name`` and load ``cfg.checkpoint`` strictly, or start from ``cfg.weights`` (pretrained, with a
    new head when the classes differ: the dropped classifier keys are printed).

    A teacher needs trained weights: a checkpoint, or hub weights (``kwargs.pretrained: true``), or pretrained
    weights whose classifier fits.
    """
    key = "teacher" if role == "teacher" else "model"
    if cfg.weights is not None and cfg.kwargs.get("pretrained"):
        raise ConfigError(f"{key}.weights and {key}.kwargs.pretrained=true both give pretrained weights; keep one")
    model = create_model(cfg.name, num_classes=num_classes, **cfg.kwargs)
    if cfg.checkpoint is not None:
        load_weights(model, cfg.checkpoint, origin=f"{key}.checkpoint '{cfg.checkpoint}'")
    elif cfg.weights is not None:
        dropped = load_pretrained(model, cfg.weights, f"{key}.weights")
        if dropped and role == "teacher":
            raise ConfigError(f"teacher.weights: the classifier of {cfg.weights} does not fit {num_classes} classes, "
                              "so the teacher's head would be untrained; fine-tune it first (distkd train with "
                              "model.weights=...) and give its run's best.pt as teacher.checkpoint")
        if dropped and distributed.is_main():
            shapes = ", ".join(f"{k} {shape}" for k, shape in dropped.items())
            print(f"{key}.weights: loaded {cfg.weights} except its classifier ({shapes}): a new {num_classes}-class "
                  "head, initialised afresh", file=sys.stderr, flush=True)
    elif role == "teacher" and not cfg.kwargs.get("pretrained"):
        raise ConfigError(
            "teacher.checkpoint is required (or teacher.kwargs.pretrained=true for hub weights): train the teacher "
            "first (distkd train with no teacher) and pass teacher.checkpoint=RUN_DIR/checkpoints/best.pt"
        )
    return model


def teacher_cache_dir(cfg: RunConfig) -> Path:
    """Where ``cfg``'s teacher-output cache lives: ``teacher_cache.dir``, else ``<run_dir>/teacher_cache``."""
    return Path(cfg.teacher_cache.dir) if cfg.teacher_cache.dir else cfg.run_dir / "teacher_cache"


def resolve_teacher(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``teacher.name`` (and, when not given, ``teacher.kwargs``) filled in from ``teacher.checkpoint``
    when the config leaves the name out: a distkd checkpoint records the model of its run."""
    teacher = cfg.teacher
    if teacher is None or teacher.name is not None:
        return cfg
    if teacher.checkpoint is None:
        raise ConfigError("teacher.name is required (e.g. teacher.name=timm_resnet50) unless teacher.checkpoint is a "
                          "distkd checkpoint, which records its model")
    from distkd.engine.checkpoint import load_state

    try:
        model = load_state(Path(teacher.checkpoint))["config"]["model"]
    except (CheckpointError, KeyError, TypeError):
        raise ConfigError(f"teacher.name is required: teacher.checkpoint {teacher.checkpoint} is not a distkd "
                          "checkpoint that records its model; set teacher.name (and teacher.kwargs) to the model it "
                          "holds") from None
    kwargs = teacher.kwargs or {k: v for k, v in model.get("kwargs", {}).items() if k != "pretrained"}
    if distributed.is_main():
        arguments = f" {kwargs}" if kwargs else ""
        print(f"teacher: {model['name']}{arguments} (recorded in {teacher.checkpoint})", file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, teacher=dataclasses.replace(teacher, name=model["name"], kwargs=kwargs))


def build_teacher_and_terms(cfg: RunConfig, num_classes: int) -> tuple[nn.Module | None, list[Term]]:
    """The teacher (None without one) and the weighted distillation terms of ``cfg.loss.distill``.

    A term is named after its loss (``dist``), plus the student output it reads when that is not the
    logits (``dist_aux``, ``kd_layer3``), plus its index when two terms would share a name.
    """
    if cfg.teacher is not None and not cfg.loss.distill:
        raise ConfigError("a teacher is configured but loss.distill has no terms, so it would be loaded and never "
                          "used; add a term (e.g. loss.distill=[{loss: dist}]) or set teacher=null")
    if cfg.loss.ce_weight == 0 and not cfg.loss.distill:
        raise ConfigError("the loss is empty: loss.ce_weight is 0 and loss.distill has no terms; set one of them")
    if cfg.loss.distill and cfg.teacher is None:
        raise ConfigError("loss.distill has terms but no teacher is configured; set teacher.name and "
                          "teacher.checkpoint, or remove loss.distill")
    terms = build_terms(cfg.loss.distill)  # before the teacher: a mistake in a term is reported before weights load
    teacher = build_model(cfg.teacher, num_classes, "teacher") if cfg.teacher is not None else None
    return teacher, terms


def build_terms(specs: list[TermConfig]) -> list[Term]:
    """The weighted distillation terms of ``loss.distill``: see :func:`build_teacher_and_terms` for their names."""
    names = [t.loss if t.student == "logits" else f"{t.loss}_{'+'.join(_keys(t.student))}" for t in specs]
    terms = []
    for i, (name, t) in enumerate(zip(names, specs, strict=True)):
        get_transform(t.transform)
        terms.append(Term(name if names.count(name) == 1 else f"{name}{i}", build_loss(t.loss, **t.kwargs), t.weight,
                          t.student, t.teacher, t.transform, t.lr, t.weight_decay, t.objective))
    return terms


# DataConfig options that only some datasets read; the others (name, batch sizes) every dataset uses
DATASET_OPTIONS = ("root", "download", "val_size", "preset", "image_size", "num_workers", "skip_unreadable",
                   "crop_padding", "flip", "kwargs", "in_memory")


def check_data_options(cfg: DataConfig, uses: Iterable[str]) -> None:
    """An option set away from its default that dataset ``cfg.name`` does not read is an error, not ignored; a
    dataset read from files needs ``data.root``."""
    defaults, used = DataConfig(), set(uses)
    if "root" in used and cfg.root is None:
        raise ConfigError(f"data.root is required for dataset '{cfg.name}' (e.g. data.root=~/data/{cfg.name})")
    for option in DATASET_OPTIONS:
        if option not in used and getattr(cfg, option) != getattr(defaults, option):
            reads = ", ".join(f"data.{o}" for o in DATASET_OPTIONS if o in used) or "none of them"
            raise ConfigError(f"data.{option} is not used by dataset '{cfg.name}' (it reads {reads}); remove it")


DEFAULT_WORKERS = 4


def data_workers(cfg: DataConfig) -> int:
    """Loader worker processes of file datasets: ``data.num_workers``, or when unset ``DEFAULT_WORKERS`` but no more
    than the CPU cores this process may use (more only compete for them, and torch warns)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(DEFAULT_WORKERS, cores)


def process_batches(cfg: DataConfig) -> tuple[int, int]:
    """``(train, eval)`` batch of this process: ``data.batch_size`` and ``data.eval_batch_size`` are global
    batches, shared by the processes (training: evenly, or a ConfigError; evaluation: rounded up)."""
    world = distributed.world_size()
    return distributed.process_batch(cfg.batch_size, world), distributed.process_eval_batch(cfg.eval_batch_size, world)


def _keys(key: str | list[str]) -> list[str]:
    return key if isinstance(key, list) else [key]


def check_input(model: nn.Module, loader: Loader, role: str) -> None:
    """Fail early, in one line, when the model cannot take the dataset's images (e.g. wrong in_chans)."""
    x = next(iter(loader)).inputs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x[:2].to(next(model.parameters()).device))
    except RuntimeError as exc:
        raise ConfigError(
            f"{role} cannot take inputs of shape {tuple(x.shape[1:])}: {first_line(exc)}; "
            f"set {role}.kwargs (e.g. in_chans={x.shape[1]}) or pick another model"
        ) from None
    finally:
        model.train(was_training)


def eval_shard(split: Split | Dataset) -> Split | Dataset:
    """This rank's unpadded strided share ``split[rank::world_size]`` of an evaluation split.

    Training loaders pad or trim their shards to divide evenly; evaluation must not, so that metrics summed
    over ranks count every sample exactly once. One process gets the whole split.
    """
    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return split
    if isinstance(split, Split):
        return Split(split.images[rank::world], split.labels[rank::world])
    return Subset(split, range(rank, len(split), world))
