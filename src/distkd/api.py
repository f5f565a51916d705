"""Run-level entry points used by the CLI and by Python users: train a config, evaluate a checkpoint."""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from distkd.config import RunConfig, ScheduleConfig, from_dict, to_dict
from distkd.engine import distributed
from distkd.engine.checkpoint import load_state
from distkd.engine.trainer import Trainer, seed_everything
from distkd.errors import CheckpointError, ConfigError
from distkd.models.weights import load_weights
from distkd.tasks import get_task
from distkd.tasks.common import build_model


def train(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.run_dir`` (continue its ``checkpoints/last.pt`` when ``resume``); return the summary.

    With a ``pretrain`` stage, that stage runs first in ``<run_dir>/pretrain`` (see :func:`pretrain_config`; a
    resume continues whichever stage was running) and the main run starts from its last student and term state.
    """
    device = _device(cfg.train)
    try:
        if cfg.pretrain is None:
            return _train(cfg, device, resume)
        return _train_staged(cfg, device, resume)
    finally:
        distributed.close()  # leave the process group _device joined under torchrun


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """The pre-training stage of ``cfg`` as a run of its own, in ``<run_dir>/pretrain``: ``pretrain.epochs`` at the
    constant lr ``pretrain.lr`` (no warm-up, no EMA, no teacher cache), no task loss, each term weighted by its
    ``pretrain_weight`` through its pre-training objective, the student frozen as ``pretrain.freeze`` says."""
    stage = cfg.pretrain
    assert stage is not None
    terms = [dataclasses.replace(t, weight=t.pretrain_weight, objective="pretrain") for t in cfg.loss.distill]
    return dataclasses.replace(
        cfg, name="pretrain", out_dir=str(cfg.run_dir), pretrain=None,
        loss=dataclasses.replace(cfg.loss, ce_weight=0.0, distill=terms),
        teacher_cache=dataclasses.replace(cfg.teacher_cache, views=0),
        optim=dataclasses.replace(cfg.optim, lr=stage.lr or cfg.optim.lr),
        schedule=ScheduleConfig(name="constant"),
        train=dataclasses.replace(cfg.train, epochs=stage.epochs, max_steps=None, ema_decay=None, select_ema=False,
                                  eval_every=None, freeze=stage.freeze))


def _train_staged(cfg: RunConfig, device: torch.device, resume: bool) -> dict[str, Any]:
    """The pre-training stage (unless finished), then the main run from its last checkpoint."""
    stage_cfg = pretrain_config(cfg)
    stage_dir = stage_cfg.run_dir
    main_started = (cfg.run_dir / "checkpoints" / "last.pt").exists()
    stage_started = (stage_dir / "checkpoints" / "last.pt").exists()
    if not resume and (main_started or stage_started):
        raise ConfigError(f"{cfg.run_dir} already holds a run; pass --resume to continue it, or set name=... for a "
                          "new one")
    if resume and not (main_started or stage_started):
        raise ConfigError(f"nothing to resume in {cfg.run_dir}: neither it nor its pretrain stage has a "
                          "checkpoints/last.pt; run the same command without --resume")
    if not (stage_dir / "summary.json").exists():
        print(f"pretrain stage: {cfg.pretrain.epochs} epoch(s) in {stage_dir}", flush=True)
        _train(stage_cfg, device, resume=stage_started)
        distributed.barrier()  # rank 0 has written the stage's last.pt before any rank reads it
    start = stage_dir / "checkpoints" / "last.pt"
    return _train(cfg, device, resume=main_started, start_from=None if main_started else start)


def _train(cfg: RunConfig, device: torch.device, resume: bool, start_from: Path | None = None) -> dict[str, Any]:
    task = get_task(cfg.task)  # an unknown task fails before anything is written
    run_dir = cfg.run_dir
    last = run_dir / "checkpoints" / "last.pt"
    if resume and not last.exists():
        raise ConfigError(f"nothing to resume in {run_dir}: it has no checkpoints/last.pt (the run stopped before "
                          "its first checkpoint, or never started); run the same command without --resume")
    if resume:
        _check_same_config(cfg, last)
    elif last.exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or set name=... for a new one")
    _check_writable(run_dir)
    seed_everything(cfg.seed + distributed.rank())  # differs by rank; DDP then gives every rank rank 0's student
    setup = task.build(cfg, device)  # a config the task refuses leaves no folder behind
    if not resume and distributed.is_main():
        _remove_unfinished_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, setup, device, run_dir, start_from=start_from).fit(resume=resume)


def build_teacher_cache(cfg: RunConfig) -> Path:
    """Build (or complete) the teacher-output cache ``cfg`` trains with, without training; return its folder.

    Under torchrun every process builds its share of an image-folder cache's shards."""
    if cfg.teacher_cache.views == 0:
        raise ConfigError("the config has no teacher cache (teacher_cache.views is 0); set teacher_cache.views=K")
    device = _device(cfg.train)
    try:
        task = get_task(cfg.task)
        seed_everything(cfg.seed + distributed.rank())
        task.build(cfg, device)  # builds the cache the training loader replays
        return Path(cfg.teacher_cache.dir) if cfg.teacher_cache.dir else cfg.run_dir / "teacher_cache"
    finally:
        distributed.close()


def _check_writable(run_dir: Path) -> None:
    """The run folder can be created (or written): its nearest existing ancestor is a writable folder."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = ("is a file, not a folder" if not existing.is_dir() else
               "is not writable (read-only file system or permissions)" if not os.access(existing, os.W_OK) else "")
    if problem:
        raise ConfigError(f"cannot create the run folder {run_dir}: {existing} {problem}; set out_dir= to a "
                          "writable folder")


RUN_RECORDS = ("metrics.jsonl", "tensorboard", "config.yaml", "env.json", "summary.json", "report.md", "checkpoints")


def _remove_unfinished_run(run_dir: Path) -> None:
    """A fresh start owns its run folder: drop the records of a run that died before its first checkpoint
    (they would otherwise be appended to). A shared teacher cache inside it is kept."""
    found = [run_dir / name for name in RUN_RECORDS if (run_dir / name).exists()]
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if found:
        print(f"starting over in {run_dir}: removed {', '.join(p.name for p in found)} of a run that stopped before "
              "its first checkpoint", flush=True)


def evaluate_checkpoint(path: str | Path, split: str = "val", scales: Sequence[float] | None = None,
                        flip: bool = False) -> dict[str, float]:
    """The task's metrics (top-1/top-5, or mIoU) of a distkd checkpoint (best.pt or last.pt) on ``split``;
    ``scales``/``flip``: multi-scale and flip evaluation (segmentation, see :func:`evaluate_config`)."""
    state = load_state(Path(path))
    if "config" not in state:
        raise CheckpointError(f"{path} holds no run config to rebuild its model and data from; evaluate it with a "
                              "config: distkd eval CONFIG model.checkpoint=PATH")
    try:
        cfg = from_dict(RunConfig, state["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its saved config is not valid for this distkd version ({exc})") from None
    return evaluate_config(cfg, split, weights=state["model"], origin=f"checkpoint '{path}'", scales=scales, flip=flip)


def evaluate_config(cfg: RunConfig, split: str = "val", weights: dict[str, Any] | None = None,
                    origin: str = "", scales: Sequence[float] | None = None, flip: bool = False) -> dict[str, float]:
    """The metrics on ``split`` of the model ``cfg`` describes, with ``weights`` (a state_dict) or, without them,
    the weights ``model.checkpoint`` names (plain state dicts of timm, torchvision or other tools load too).

    ``scales`` (e.g. 0.5 0.75 1.0 1.25 1.5 1.75) and ``flip`` average the predictions over rescaled and mirrored
    inputs, for tasks whose ``evaluate`` takes them (segmentation); None/False: the single-scale evaluation.
    """
    if weights is None and cfg.model.checkpoint is None:
        raise ConfigError("nothing to evaluate: the config names no weights; set model.checkpoint=PATH")
    cfg = dataclasses.replace(cfg, teacher=None, loss=dataclasses.replace(cfg.loss, distill=[]))
    task = get_task(cfg.task)
    options: dict[str, Any] = {}
    if scales is not None or flip:
        if "scales" not in inspect.signature(task.evaluate).parameters:
            raise ConfigError(f"--scales/--flip (multi-scale and flip evaluation) are for segmentation; task "
                              f"'{cfg.task}' evaluates each image once")
        options = {"scales": tuple(scales) if scales is not None else (1.0,), "flip": flip}
    device = _device(cfg.train)
    data = task.load_dataset(cfg.data, cfg.seed)
    loaders = dict(zip(("train", "val", "test"), task.build_loaders(cfg, data, device), strict=True))
    if loaders.get(split) is None:
        raise ConfigError(f"dataset '{cfg.data.name}' has no '{split}' split; use --split val")
    if weights is None:
        model = build_model(cfg.model, data.num_classes, "model")
    else:
        model = build_model(dataclasses.replace(cfg.model, checkpoint=None), data.num_classes, "model")
        load_weights(model, weights, origin=origin)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return task.evaluate(model, loaders[split], **options)


def _check_same_config(cfg: RunConfig, last: Path) -> None:
    """Resuming with another config would silently mix two experiments: refuse, naming the differences."""
    saved = load_state(last)["config"]
    # where the run lives and how it is computed, not what it computes: a run may move, or resume on another device
    ignored = {"train.progress", "out_dir", "train.threads", "train.device"}
    diffs = [k for k in _diff(saved, to_dict(cfg)) if k not in ignored]
    if diffs:
        raise ConfigError(f"cannot resume {last}: the config differs in {', '.join(diffs[:5])}; "
                          "resume with the original config and overrides")


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
    return [] if a == b else [path]


def _device(train_cfg: Any) -> torch.device:
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    if train_cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={train_cfg.device} but no CUDA device is available; "
                              "use train.device=cpu or auto")
        index = int(train_cfg.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={train_cfg.device} but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return distributed.init_from_env(train_cfg.device)
