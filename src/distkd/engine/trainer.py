"""The training loop, shared by teachers and students, for every task.

The trainer knows no loss or task by name: it sums the ``losses`` dict the Distiller returns and trains
everything trainable the Distiller holds (the student, and the terms' own state in groups of their own).
Everything random in a run is seeded; checkpoints are written atomically at the end of every epoch (and every
``train.checkpoint_every`` steps) and hold all the state needed to continue (``--resume``), so a killed run
that is resumed ends with the same weights, even when it was killed in the middle of an epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from distkd.config import RunConfig, dump_config, to_dict
from distkd.data.batch import Batch
from distkd.distill import Distiller
from distkd.distill.taps import tap_names
from distkd.engine import cpu, distributed
from distkd.engine.checkpoint import load_state, remove_stale_temp_files, save_atomic
from distkd.engine.ema import EMA
from distkd.engine.logging import MetricsLog, Progress, environment
from distkd.engine.optim import build_optimizer, build_scheduler, decay_exempt, param_groups
from distkd.engine.plot import plot_run
from distkd.errors import CheckpointError, ConfigError, DistkdError, first_line
from distkd.registry import nearest


class Loader(Protocol):
    """What the trainer iterates: :class:`~distkd.data.batch.Batch` es already on the device."""

    def set_epoch(self, epoch: int, start: int = 0) -> None: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    @property
    def num_samples(self) -> int: ...
    @property
    def dataset_size(self) -> int: ...


Evaluate = Callable[[nn.Module, Loader], dict[str, float]]


@dataclass
class TrainSetup:
    """What a task builds for the trainer. ``metric`` (higher is better) selects the best checkpoint on val.

    ``meta``: what a deployed model needs to know (class names, preprocessing), stored in every checkpoint.
    ``test_is_val``: the test split is the val split itself (the report says so).
    ``ddp``: under torchrun the student is wrapped in DistributedDataParallel. False when the task's step calls
    the student's parts (a detector's backbone and heads), which DDP's forward would never see: the trainer then
    gives every rank rank 0's weights and averages the student's gradients itself, in one all-reduce per
    optimizer step.
    """

    distiller: Distiller
    train: Loader
    val: Loader
    test: Loader | None
    evaluate: Evaluate
    metric: str
    meta: dict[str, Any] = field(default_factory=dict)
    test_is_val: bool = False
    ddp: bool = True


EXTREME_GRAD_NORM = 100.0  # at the first step; cross-entropy and KD give about 1 on fresh students


class TrainingDiverged(DistkdError):
    """The loss became NaN or infinite."""


class Trainer:
    """Trains ``setup`` for ``train.epochs`` epochs (or ``train.max_steps`` steps) on ``device`` into ``run_dir``."""

    def __init__(self, cfg: RunConfig, setup: TrainSetup, device: torch.device, run_dir: Path,
                 start_from: Path | None = None) -> None:
        """``start_from``: a checkpoint (e.g. a pre-training stage's last.pt) whose student and term state a
        fresh run starts from; its optimizer and schedule are not taken."""
        self.cfg, self.setup, self.device, self.run_dir = cfg, setup, device, run_dir
        self.is_main = distributed.is_main()
        self.distiller = setup.distiller.to(device)
        self.student = self.distiller.student
        memory_format = torch.channels_last if cfg.train.channels_last else torch.preserve_format
        self.distiller.to(memory_format=memory_format)
        if self.distiller.terms:  # the shape probe: terms build their state (adapters, memory banks) from a batch
            self.distiller.probe(next(iter(setup.train)), dataset_size=setup.train.dataset_size)
            self.distiller.to(device, memory_format=memory_format)
        if start_from is not None:
            self._load_weights(start_from)
        self.frozen = frozen_modules(self.student, cfg.train.freeze)
        for module in self.frozen:
            module.requires_grad_(False)
        self.term_params = [p for _, params in self.distiller.term_parameters() for p in params]
        distributed.broadcast_state(self.distiller.term_state_dict())  # every rank starts from rank 0's state
        if cfg.train.sync_bn:  # before DDP wraps the student, as DDP requires
            distributed.sync_batchnorm(self.student, device)
        if setup.ddp:
            runner = distributed.wrap(self.student, device)  # DDP gives all ranks rank 0's weights
        else:  # the trainer averages the student's gradients in _optimizer_step
            runner = self.student
            distributed.broadcast_state(self.student.state_dict())
        self.ddp = runner if runner is not self.student else None
        self.synced_params = self.term_params if setup.ddp else [
            *(p for p in self.student.parameters() if p.requires_grad), *self.term_params]
        # compiled for training steps only; weights, checkpoints and evaluation use the plain module
        self.distiller.student = torch.compile(runner) if cfg.train.compile else runner
        self.ema = EMA(self.student, cfg.train.ema_decay) if cfg.train.ema_decay else None  # so copy them after
        self.optimizer = build_optimizer(self._param_groups(), cfg.optim)
        self.accumulate = cfg.train.accumulate
        self.steps_per_epoch = math.ceil(len(setup.train) / self.accumulate)
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.optim.lr,
                                         self.total_steps / self.steps_per_epoch, self.steps_per_epoch)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
        self.epoch = 0  # epochs finished
        self.step = 0  # optimizer steps taken
        self.batch = 0  # batches of the current epoch done (a mid-epoch checkpoint continues from there)
        self.sums: dict[str, Tensor] = {}  # the current epoch's running sums of the logged losses
        self.best: dict[str, Any] = {"epoch": -1, "step": -1, "value": -math.inf}
        self.evaluated_at = -1  # the step of the latest evaluation
        self.first_step_checked = False
        self.progress = Progress(cfg.train.progress, self.epochs, enabled=self.is_main)
        if self.is_main and device.type == "cpu" and self.amp_dtype is torch.bfloat16 and not cpu.native_bf16():
            print("warning: train.amp=bf16 on a CPU without native bfloat16 (AVX512-BF16/AMX) is emulated: a training "
                  "step ran about 12x slower than fp32 on such a CPU; set train.amp=none", file=sys.stderr, flush=True)

    def _param_groups(self) -> list[dict]:
        """The student's groups, then each term's own (its ``lr``/``weight_decay``, or the optimizer's)."""
        optim = self.cfg.optim
        groups = param_groups(self.student.parameters(), optim.weight_decay, optim.no_decay_norm_bias,
                              decay_exempt(self.student))
        for term, params in self.distiller.term_parameters():
            decay = optim.weight_decay if term.weight_decay is None else term.weight_decay
            for group in param_groups(params, decay, optim.no_decay_norm_bias):
                groups.append(group | {"lr": optim.lr if term.lr is None else term.lr})
        return [g for g in groups if g["params"]]

    # ------------------------------------------------------------------ the loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train (from scratch, or from ``checkpoints/last.pt`` when ``resume``) and return the summary."""
        if self.is_main:
            for path in remove_stale_temp_files(self.run_dir / "checkpoints"):
                self.progress.message(f"removed {path.name}, left by a process killed while writing a checkpoint")
        if resume:
            self._load(self.run_dir / "checkpoints" / "last.pt")
        elif self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "env.json").write_text(json.dumps(environment(self.device), indent=2))
        self.log = MetricsLog(self.run_dir, enabled=self.is_main, resume_step=self.step if resume else None)
        self.progress.message(_sizes_line(self._sizes()))
        teacher_val = self._teacher_metrics(record=not resume)
        while self.step < self.total_steps:
            self._end_epoch(*self._train_epoch())
        if self.evaluated_at != self.step:  # the last step-based evaluation fell before the end
            self._evaluate({"step": self.step})
        summary = self._summary(teacher_val)
        self.log.close()
        return summary

    def _train_epoch(self) -> tuple[int, float]:
        """Train the rest of epoch ``self.epoch`` (from batch ``self.batch``), up to ``total_steps``; return the
        number of images this process trained on and the seconds it took."""
        loader, train_cfg = self.setup.train, self.cfg.train
        loader.set_epoch(self.epoch, self.batch)
        self.distiller.train()
        for module in self.frozen:  # frozen parts keep their BatchNorm statistics (RepDistiller's pre-training)
            module.eval()
        self.progress.start_epoch(self.epoch, len(loader) - self.batch)
        start, images, group = time.perf_counter(), 0, {}  # group: this step's losses, for log_every lines
        for batch in loader:
            size = min(self.accumulate, len(loader) - self.batch // self.accumulate * self.accumulate)
            last_of_group = (self.batch + 1) % self.accumulate == 0 or self.batch + 1 == len(loader)
            sync = self.ddp.no_sync() if self.ddp is not None and not last_of_group else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    out = self.distiller(batch, self.epoch + 1)
                loss = sum(out.losses.values())
                self.scaler.scale(loss / size if size > 1 else loss).backward()
            for key, value in {"loss": loss, **out.losses, **out.parts}.items():
                value = value.detach().float()
                self.sums[key] = self.sums.get(key, 0.0) + value
                if train_cfg.log_every:
                    group[key] = group.get(key, 0.0) + (value / size if size > 1 else value)
            self.batch += 1
            images += len(batch)
            if self.progress.shows_steps:
                rate = images / (time.perf_counter() - start)
                parts = " ".join(f"{k} {v.item():.3f}" for k, v in {"loss": loss, **out.losses}.items())
                self.progress.step(f"{parts} lr {self.scheduler.get_last_lr()[0]:.3g} {rate:.0f} img/s")
            if not last_of_group:
                continue
            grad_norm = self._optimizer_step()
            self.sums["grad_norm"] = self.sums.get("grad_norm", 0.0) + grad_norm * size  # a mean over batches
            if not self.first_step_checked:
                self._check_first_step(loss, grad_norm)
            if train_cfg.log_every and self.step % train_cfg.log_every == 0:
                group["grad_norm"] = grad_norm
                self._log_step(group)
            group = {}
            if train_cfg.eval_every and self.step % train_cfg.eval_every == 0:
                self._evaluate({"step": self.step})
            done = self.batch == len(loader) or self.step == self.total_steps
            if train_cfg.checkpoint_every and self.step % train_cfg.checkpoint_every == 0 and not done:
                self._save("last.pt")
            if self.step == self.total_steps:
                break
        return images, time.perf_counter() - start

    def _optimizer_step(self) -> Tensor:
        """Average the terms' gradients over ranks (and the student's, unless DDP did), clip, step, schedule, EMA;
        return the gradient norm before clipping (a device tensor: no host sync)."""
        if self.synced_params and distributed.world_size() > 1:
            distributed.average_gradients(self.synced_params)
        self.scaler.unscale_(self.optimizer)
        params = [*self.student.parameters(), *self.term_params]
        grad_norm = nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip or math.inf).detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.student)
        self.step += 1
        return grad_norm

    def _check_first_step(self, loss: Tensor, grad_norm: Tensor) -> None:
        """After this process's first step: stop at once on a non-finite loss; warn about an extreme gradient."""
        self.first_step_checked = True
        _check_finite(loss.item(), f"at step {self.step}")
        norm = grad_norm.item()
        if norm > EXTREME_GRAD_NORM and self.is_main:
            guards = [g for g, on in (("train.grad_clip", self.cfg.train.grad_clip),
                                      ("schedule.warmup_epochs", self.cfg.schedule.warmup_epochs)) if on]
            advice = (f"{' and '.join(guards)} {'are' if len(guards) > 1 else 'is'} set" if guards else
                      "set train.grad_clip (e.g. 5) and/or schedule.warmup_epochs (e.g. 1)")
            print(f"warning: the gradient norm at step {self.step} is {norm:.4g} (cross-entropy alone gives about 1): "
                  f"a term's gradient is large (DIST's is while the student's predictions are near uniform); {advice}",
                  file=sys.stderr, flush=True)

    def _log_step(self, group: dict[str, Tensor]) -> None:
        """A ``train_step/*`` record of this step's losses (means over its batches); stop at once on NaN/inf."""
        values = {f"train_step/{k}": v.item() for k, v in distributed.mean(group).items()}
        _check_finite(values["train_step/loss"], f"at step {self.step}")
        self.log.write({"step": self.step, **values, "lr": self.scheduler.get_last_lr()[0]}, step=self.step)

    def _end_epoch(self, images: int, seconds: float) -> None:
        """The epoch's record (train means; val unless evaluation is step-based), best.pt, last.pt."""
        epoch = self.epoch + 1
        stats = {f"train/{k}": v.item() / self.batch for k, v in distributed.mean(self.sums).items()}
        _check_finite(stats["train/loss"], f"in epoch {epoch}")
        self.epoch, self.batch, self.sums = epoch, 0, {}
        throughput = images * distributed.world_size() / seconds
        record = {"epoch": epoch, "step": self.step, **stats, "lr": self.scheduler.get_last_lr()[0],
                  "images_per_s": throughput, "epoch_s": seconds}
        if not self.cfg.train.eval_every:
            self._evaluate(record)
        else:
            self.log.write(record, step=self.step)
        self._save("last.pt")
        self.progress.end_epoch(_epoch_line(record, self.setup.metric, self.epochs))

    def _evaluate(self, record: dict[str, Any]) -> None:
        """Evaluate on val, write ``record`` with the metrics, keep best.pt. Every rank calls."""
        distributed.broadcast_buffers(self.student)  # evaluate and save the same model on every rank
        distributed.broadcast_buffers(self.distiller.term_losses)  # adapters' BatchNorm statistics too
        val = self.setup.evaluate(self.student, self.setup.val)
        record |= {f"val/{k}": v for k, v in val.items()}
        selected, score = self.student, val[self.setup.metric]
        if self.ema is not None:
            distributed.broadcast_buffers(self.ema.module)
            ema_val = self.setup.evaluate(self.ema.module, self.setup.val)
            record |= {f"ema_val/{k}": v for k, v in ema_val.items()}
            if self.cfg.train.select_ema:  # the EMA's metric chooses best.pt, which then holds the EMA weights
                selected, score = self.ema.module, ema_val[self.setup.metric]
        self.evaluated_at = self.step
        self.log.write(record, step=self.step)  # before last.pt: a resume drops it if last.pt is older
        if score > self.best["value"]:
            self.best = {"epoch": self.epoch, "step": self.step, "value": score}
            self._save("best.pt", weights_only=True, model=selected)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ evaluation and summary

    def _sizes(self) -> dict[str, int]:
        """Parameter counts: the student's, and the trainable state the distillation terms add."""
        sizes = {"student_parameters": sum(p.numel() for p in self.student.parameters())}
        sizes["term_parameters"] = sum(p.numel() for p in self.term_params)
        return sizes

    def _teacher_metrics(self, record: bool) -> dict[str, float] | None:
        """The teacher on val, fed as in training; ``record``: log it at step 0 (a resumed run has already)."""
        teacher = self.distiller.teacher_for_eval()
        if teacher is None:
            return None
        val = self.setup.evaluate(teacher, self.setup.val)
        self.progress.message(f"teacher val: {_format(val)}")
        if record:
            self.log.write({"epoch": 0, "step": 0, **{f"teacher_val/{k}": v for k, v in val.items()}}, step=0)
        return val

    def _summary(self, teacher_val: dict[str, float] | None) -> dict[str, Any]:
        metric, test = self.setup.metric, self.setup.test
        summary: dict[str, Any] = {"metric": metric, "epochs": self.epochs, "steps": self.step,
                                   "best_epoch": self.best["epoch"], "best_step": self.best["step"],
                                   "best_val": self.best["value"], "teacher_val": teacher_val, **self._sizes()}
        summary["last_val"] = self.setup.evaluate(self.student, self.setup.val)[metric]
        if test is not None:
            summary["test_is_val"] = self.setup.test_is_val
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
            plot_run(self.run_dir, metric, teacher_val[metric] if teacher_val else None)
        return summary

    # ------------------------------------------------------------------ checkpoints

    def _save(self, name: str, weights_only: bool = False, model: nn.Module | None = None) -> None:
        """Rank 0 writes; every rank calls (each rank's RNG state is gathered into the checkpoint). ``model``: the
        weights saved as ``model`` (the student unless given: best.pt under ``train.select_ema`` holds the EMA's)."""
        rng = None if weights_only else [_plain(r) for r in distributed.gather_objects(_rng_state())]
        if not self.is_main:
            return
        state: dict[str, Any] = {
            "model": (model or self.student).state_dict(),  # the student alone: loads strictly into the bare model
            "terms": self.distiller.term_state_dict(),  # the distillation terms' own state (adapters, ...)
            "ema": self.ema.module.state_dict() if self.ema else None,
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "config": to_dict(self.cfg),
            "meta": self.setup.meta,  # class names and preprocessing: eval, export and predict need nothing else
        }
        if not weights_only:
            state |= {
                "batch": self.batch,  # > 0: saved in the middle of epoch ``epoch + 1``
                "sums": self.sums,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,  # one state per rank
            }
        save_atomic(state, self.run_dir / "checkpoints" / name)

    def _load_weights(self, path: Path) -> dict[str, Any]:
        """Load the student and the term state of checkpoint ``path``; return the whole checkpoint."""
        state = load_state(path)
        self.student.load_state_dict(state["model"])
        try:
            self.distiller.load_term_state_dict(state.get("terms", {}))  # absent from checkpoints before 0.2
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: the distillation terms' state does not fit this config: "
                                  f"{first_line(exc)}") from None
        return state

    def _load(self, path: Path) -> None:
        state = self._load_weights(path)
        if "optimizer" not in state:
            raise CheckpointError(f"{path} holds weights only and cannot resume a run; use checkpoints/last.pt")
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # the lr at the saved step, by this run's schedule: the saved one, or recomputed for a run extended to more
        # epochs (the same numbers otherwise: LambdaLR computes base_lr * factor(step) either way)
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(self.scheduler.last_epoch)
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best = state["epoch"], {"step": -1} | state["best"]
        # checkpoints before step-based runs were written at epoch ends only
        self.step, self.batch = state.get("step", self.epoch * self.steps_per_epoch), state.get("batch", 0)
        self.sums = {k: v.to(self.device) for k, v in state.get("sums", {}).items()}
        self.evaluated_at = self.step if not self.cfg.train.eval_every else self.best["step"]
        per_rank, rank = state["rng"], distributed.rank()  # one state per rank of the run that saved it
        _set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
        where = f"epoch {self.epoch}" + (f", batch {self.batch} of epoch {self.epoch + 1}" if self.batch else "")
        self.progress.message(f"resumed from {path} at step {self.step} ({where})")


def frozen_modules(student: nn.Module, freeze: str | list[str]) -> list[nn.Module]:
    """The student modules ``train.freeze`` names: none, the whole student, its classifier (the last ``nn.Linear``
    it holds, the layer that maps features to logits), or a list of module paths or ready tap names."""
    if isinstance(freeze, list):
        aliases = tap_names(student)
        found = []
        for key in freeze:
            try:
                found.append(student.get_submodule(aliases.get(key, key)))
            except AttributeError:
                ready = f"ready names {', '.join(aliases)} or " if aliases else ""
                children = ", ".join(name for name, _ in student.named_children())
                raise ConfigError(f"train.freeze: the student has no module '{key}'{nearest(key, list(aliases))}; "
                                  f"name {ready}module paths (top level: {children})") from None
        return found
    if freeze == "none":
        return []
    if freeze == "all":
        return [student]
    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"train.freeze=classifier but the student ({type(student).__name__}) has no nn.Linear "
                          "classifier; use train.freeze=none or all")
    return linears[-1:]


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


def _check_finite(loss: float, where: str) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"the training loss became {loss} {where}; "
            "lower optim.lr, set train.grad_clip, or use train.amp=bf16 instead of fp16"
        )


def _sizes_line(sizes: dict[str, int]) -> str:
    line = f"student: {sizes['student_parameters']:,} parameters"
    if sizes["term_parameters"]:
        line += f"; distillation terms: {sizes['term_parameters']:,} trainable parameters (not exported)"
    return line


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _epoch_line(record: dict[str, Any], metric: str, epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['train/loss']:.4f}"]
    parts += [f"{k[6:]} {v:.4f}" for k, v in record.items() if k.startswith("train/") and k != "train/loss"]
    if f"val/{metric}" in record:
        parts.append(f"val {metric} {record[f'val/{metric}']:.4f}")
    parts += [f"lr {record['lr']:.4g}", f"{record['images_per_s']:.0f} img/s"]
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
    chosen = " (the EMA weights, chosen by the EMA's val metric)" if cfg.train.select_ema else ""
    if summary.get("test_is_val"):
        selection = ("the dataset has no separate test split: the test figures are the val figures, on the very "
                     "images the best checkpoint was selected on")
    else:
        selection = "test is never used to select" if "best_test" in summary else "there is no test split"
    lines += ["", f"best on val{chosen}: epoch {summary['best_epoch']} of {summary['epochs']}, step "
              f"{summary['best_step']} of {summary['steps']} ({selection}).",
              _sizes_line(summary) + "."]
    if summary.get("teacher_val"):
        lines.append(f"teacher on val: {_format(summary['teacher_val'])}")
    return "\n".join(lines) + "\n"
