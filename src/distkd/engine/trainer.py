"""The training loop, shared by teachers and students.

The trainer knows no loss by name: it sums the ``losses`` dict the Distiller returns. Everything
random in a run is seeded; checkpoints are written atomically at the end of every epoch and hold all
the state needed to continue (``--resume``), so a killed run that is resumed ends with the same weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from distkd.config import RunConfig, dump_config, to_dict
from distkd.distill import Distiller
from distkd.engine import distributed
from distkd.engine.checkpoint import load_state, save_atomic
from distkd.engine.ema import EMA
from distkd.engine.logging import MetricsLog, Progress, environment
from distkd.engine.optim import build_optimizer, build_scheduler
from distkd.errors import CheckpointError, DistkdError


class Loader(Protocol):
    """What the trainer iterates: batches ``(x, y)`` already on the device."""

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self): ...  # noqa: ANN204
    def __len__(self) -> int: ...
    @property
    def num_samples(self) -> int: ...


Evaluate = Callable[[nn.Module, Loader], dict[str, float]]


@dataclass
class TrainSetup:
    """What a task builds for the trainer. ``metric`` (higher is better) selects the best epoch on val."""

    distiller: Distiller
    train: Loader
    val: Loader
    test: Loader | None
    evaluate: Evaluate
    metric: str


class TrainingDiverged(DistkdError):
    """The loss became NaN or infinite."""


class Trainer:
    """Runs ``cfg.train.epochs`` epochs of ``setup`` on ``device``, writing everything to ``run_dir``."""

    def __init__(self, cfg: RunConfig, setup: TrainSetup, device: torch.device, run_dir: Path) -> None:
        self.cfg, self.setup, self.device, self.run_dir = cfg, setup, device, run_dir
        self.is_main = distributed.is_main()
        self.distiller = setup.distiller.to(device)
        self.student = self.distiller.student
        if cfg.train.channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        runner = distributed.wrap(self.student, device)  # DDP gives all ranks rank 0's weights
        # compiled for training steps only; weights, checkpoints and evaluation use the plain module
        self.distiller.student = torch.compile(runner) if cfg.train.compile else runner
        self.ema = EMA(self.student, cfg.train.ema_decay) if cfg.train.ema_decay else None  # so copy them after
        self.optimizer = build_optimizer(self.student, cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.schedule, cfg.optim.lr, cfg.train.epochs, len(setup.train)
        )
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        self.epoch = 0
        self.best: dict[str, Any] = {"epoch": -1, "value": -math.inf}
        self.progress = Progress(cfg.train.progress, cfg.train.epochs, enabled=self.is_main)

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (from scratch, or from ``checkpoints/last.pt`` when ``resume``) and return the summary."""
        if resume:
            self._load(self.run_dir / "checkpoints" / "last.pt")
        elif self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "env.json").write_text(json.dumps(environment(self.device), indent=2))
        self.log = MetricsLog(self.run_dir, enabled=self.is_main, resume_epoch=self.epoch if resume else None)
        teacher_val = self._teacher_metrics(record=not resume)
        for epoch in range(self.epoch, self.cfg.train.epochs):
            self.epoch = epoch
            train_stats = self._train_epoch(epoch)
            distributed.broadcast_buffers(self.student)  # evaluate and save the same model on every rank
            if self.ema is not None:
                distributed.broadcast_buffers(self.ema.module)
            val = self.setup.evaluate(self.student, self.setup.val)
            record = {"epoch": epoch + 1, **train_stats, **{f"val/{k}": v for k, v in val.items()}}
            if self.ema is not None:
                record |= {f"ema_val/{k}": v for k, v in self.setup.evaluate(self.ema.module, self.setup.val).items()}
            self.epoch = epoch + 1
            self.log.write(record, step=self.epoch)  # before last.pt: a resume drops it if last.pt is older
            if val[self.setup.metric] > self.best["value"]:
                self.best = {"epoch": epoch + 1, "value": val[self.setup.metric]}
                self._save("best.pt", weights_only=True)
            self._save("last.pt")
            self.progress.end_epoch(_epoch_line(record, self.setup.metric, self.cfg.train.epochs))
        summary = self._summary(teacher_val)
        self.log.close()
        return summary

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        loader = self.setup.train
        loader.set_epoch(epoch)
        self.distiller.train()
        self.progress.start_epoch(epoch, len(loader))
        sums: dict[str, Tensor] = {}
        start, clip = time.perf_counter(), self.cfg.train.grad_clip
        for x, y, *cached_teacher in loader:
            with self._autocast():
                step = self.distiller(x, y, epoch + 1, *cached_teacher)
            loss = sum(step.losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.student.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.student)
            for key, value in {"loss": loss, **step.losses, **step.parts}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float()
            if self.progress.shows_steps:
                rate = (len(x) * self.progress.steps_done) / (time.perf_counter() - start)
                parts = " ".join(f"{k} {v.item():.3f}" for k, v in {"loss": loss, **step.losses}.items())
                self.progress.step(f"{parts} lr {self.scheduler.get_last_lr()[0]:.3g} {rate:.0f} img/s")
        seconds = time.perf_counter() - start
        stats = {f"train/{k}": v.item() / len(loader) for k, v in distributed.mean(sums).items()}
        if not math.isfinite(stats["train/loss"]):
            raise TrainingDiverged(
                f"the training loss became {stats['train/loss']} in epoch {epoch + 1}; "
                "lower optim.lr, set train.grad_clip, or use train.amp=bf16 instead of fp16"
            )
        images = loader.num_samples * distributed.world_size()
        return stats | {"lr": self.scheduler.get_last_lr()[0], "images_per_s": images / seconds, "epoch_s": seconds}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ evaluation and summary

    def _teacher_metrics(self, record: bool) -> dict[str, float] | None:
        """The teacher on val; ``record``: log it as epoch 0 (a resumed run has logged it already)."""
        teacher = self.distiller.teacher
        if teacher is None:
            return None
        val = self.setup.evaluate(teacher, self.setup.val)
        self.progress.message(f"teacher val: {_format(val)}")
        if record:
            self.log.write({"epoch": 0, **{f"teacher_val/{k}": v for k, v in val.items()}}, step=0)
        return val

    def _summary(self, teacher_val: dict[str, float] | None) -> dict[str, Any]:
        metric, test = self.setup.metric, self.setup.test
        summary: dict[str, Any] = {"metric": metric, "epochs": self.cfg.train.epochs, "best_epoch": self.best["epoch"],
                                   "best_val": self.best["value"], "teacher_val": teacher_val}
        summary["last_val"] = self.setup.evaluate(self.student, self.setup.val)[metric]
        if test is not None:
            summary["last_test"] = self.setup.evaluate(self.student, test)[metric]
            last_weights = {k: v.clone() for k, v in self.student.state_dict().items()}
            # rank 0 reads best.pt and sends it: the other machines need not see its file system
            saved = load_state(self.run_dir / "checkpoints" / "best.pt")["model"] if self.is_main else last_weights
            best = {k: saved[k].to(v.device, copy=True) for k, v in last_weights.items()}
            self.student.load_state_dict(distributed.broadcast_state(best))
            summary["best_test"] = self.setup.evaluate(self.student, test)[metric]
            self.student.load_state_dict(last_weights)
            if self.ema is not None:
                summary["ema_last_test"] = self.setup.evaluate(self.ema.module, test)[metric]
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            (self.run_dir / "report.md").write_text(_report(self.cfg, summary))
            self.progress.message(f"summary: {json.dumps(summary)}")
        return summary

    # ------------------------------------------------------------------ checkpoints

    def _save(self, name: str, weights_only: bool = False) -> None:
        """Rank 0 writes; every rank calls (each rank's RNG state is gathered into the checkpoint)."""
        rng = None if weights_only else [_plain(r) for r in distributed.gather_objects(_rng_state())]
        if not self.is_main:
            return
        state: dict[str, Any] = {
            "model": self.student.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "best": self.best,
            "config": to_dict(self.cfg),
        }
        if not weights_only:
            state |= {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,  # one state per rank
            }
        save_atomic(state, self.run_dir / "checkpoints" / name)

    def _load(self, path: Path) -> None:
        state = load_state(path)
        if "optimizer" not in state:
            raise CheckpointError(f"{path} holds weights only and cannot resume a run; use checkpoints/last.pt")
        self.student.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best = state["epoch"], state["best"]
        per_rank, rank = state["rng"], distributed.rank()  # one state per rank of the run that saved it
        _set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
        self.progress.message(f"resumed from {path} at epoch {self.epoch}")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) once at the start of a run."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as NumPy and Python objects (gathered across ranks by pickling)."""
    state = {"torch": torch.get_rng_state().numpy(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = [s.numpy() for s in torch.cuda.get_rng_state_all()]
    return state


def _plain(value: Any) -> Any:
    """Convert RNG states to types ``torch.load(weights_only=True)`` accepts (lists, not tuples/ndarrays)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _epoch_line(record: dict[str, Any], metric: str, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train/loss']:.4f}"]
    parts += [f"{k[6:]} {v:.4f}" for k, v in record.items() if k.startswith("train/") and k != "train/loss"]
    parts += [f"val {metric} {record[f'val/{metric}']:.4f}", f"lr {record['lr']:.4g}",
              f"{record['images_per_s']:.0f} img/s"]
    return " | ".join(parts)


def _report(cfg: RunConfig, summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    lines = [
        f"# {cfg.name}",
        "",
        f"student `{cfg.model.name}`" + (f", teacher `{cfg.teacher.name}`" if cfg.teacher else ""),
        f"; distillation: {', '.join(f'{t.weight} x {t.loss} {t.kwargs}' for t in cfg.loss.distill) or 'none'}",
        "",
        f"| {metric} | value |",
        "|---|---|",
    ]
    for key in ("best_val", "best_test", "last_val", "last_test", "ema_last_test"):
        if key in summary:
            lines.append(f"| {key} | {summary[key]:.4f} |")
    lines += ["", f"best epoch on val: {summary['best_epoch']} of {summary['epochs']} (test is never used to select)."]
    if summary.get("teacher_val"):
        lines.append(f"teacher on val: {_format(summary['teacher_val'])}")
    return "\n".join(lines) + "\n"
