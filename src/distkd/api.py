"""Run-level entry points used by the CLI and by Python users: train a config, evaluate a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from distkd.config import RunConfig, from_dict, to_dict
from distkd.engine import distributed
from distkd.engine.checkpoint import load_state
from distkd.engine.trainer import Trainer, seed_everything
from distkd.errors import CheckpointError, ConfigError
from distkd.tasks import get_task
from distkd.tasks.common import build_model


def train(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.run_dir`` (continue its ``checkpoints/last.pt`` when ``resume``); return the summary."""
    device = _device(cfg.train)
    try:
        return _train(cfg, device, resume)
    finally:
        distributed.close()  # leave the process group _device joined under torchrun


def _train(cfg: RunConfig, device: torch.device, resume: bool) -> dict[str, Any]:
    task = get_task(cfg.task)  # an unknown task fails before anything is written
    run_dir = cfg.run_dir
    last = run_dir / "checkpoints" / "last.pt"
    if resume:
        _check_same_config(cfg, last)
    elif last.exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or set name=... for a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + distributed.rank())  # differs by rank; DDP then gives every rank rank 0's student
    setup = task.build(cfg, device)
    return Trainer(cfg, setup, device, run_dir).fit(resume=resume)


def evaluate_checkpoint(path: str | Path, split: str = "val") -> dict[str, float]:
    """The task's metrics (top-1/top-5, or mIoU) of a distkd checkpoint (best.pt or last.pt) on ``split``."""
    state = load_state(Path(path))
    cfg = from_dict(RunConfig, state["config"])
    cfg = dataclasses.replace(cfg, teacher=None, loss=dataclasses.replace(cfg.loss, distill=[]))
    task = get_task(cfg.task)
    device = _device(cfg.train)
    data = task.load_dataset(cfg.data, cfg.seed)
    loaders = dict(zip(("train", "val", "test"), task.build_loaders(cfg, data, device), strict=True))
    if loaders.get(split) is None:
        raise ConfigError(f"dataset '{cfg.data.name}' has no '{split}' split; use --split val")
    model = build_model(cfg.model, data.num_classes, "model")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {cfg.model.name}: {str(exc).splitlines()[0]}") from None
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return task.evaluate(model, loaders[split])


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
    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available; use train.device=cpu or auto")
    return distributed.init_from_env(train_cfg.device)
