"""The Trainer on a tiny synthetic dataset: AMP, EMA, gradient clipping, divergence, what one epoch records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from distkd.config import RunConfig, TrainConfig
from distkd.data.augment import CropFlip
from distkd.data.base import Split
from distkd.data.loaders import TensorLoader
from distkd.distill import Distiller, SingleInputStep, Term
from distkd.engine import cpu
from distkd.engine.trainer import Trainer, TrainingDiverged, TrainSetup
from distkd.errors import ConfigError
from distkd.losses import build_loss
from distkd.models import create_model
from distkd.tasks.classification import evaluate


def cross_entropy(output: Tensor, target: Tensor) -> dict[str, Tensor]:
    return {"ce": F.cross_entropy(output.float(), target)}


def tiny_setup(teacher: bool = False) -> TrainSetup:
    """64 random 12x12 grey images in 10 classes: 4 training steps of 16 per epoch; a KD term if ``teacher``."""
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (64,), generator=gen))
    stats = {"mean": (0.5,), "std": (0.25,)}
    train = TensorLoader(split, batch_size=16, shuffle=True, drop_last=True, augment=CropFlip(2, True), **stats)
    val = TensorLoader(split, batch_size=32, **stats)
    torch.manual_seed(0)
    student = create_model("small_cnn3_w2", num_classes=10)
    if teacher:
        kd = Term("kd", build_loss("kd"), 1.0)
        distiller = Distiller(student, create_model("small_cnn3_w2", 10), [kd], SingleInputStep(cross_entropy))
    else:
        distiller = Distiller(student, step=SingleInputStep(cross_entropy))
    return TrainSetup(distiller, train, val, None, evaluate, metric="top1")


def tiny_config(epochs: int = 1, **train: object) -> RunConfig:
    return RunConfig(train=TrainConfig(epochs=epochs, device="cpu", progress="none", **train))


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_autocast_step_on_cpu_gives_finite_losses(tmp_path: Path) -> None:
    setup = tiny_setup()
    dtypes: list[torch.dtype] = []
    setup.distiller.student.fc.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    trainer = Trainer(tiny_config(amp="bf16"), setup, torch.device("cpu"), tmp_path)
    assert not trainer.scaler.is_enabled()
    trainer.fit()
    (record,) = records(tmp_path)
    assert dtypes[0] == torch.bfloat16  # training steps ran under autocast
    assert dtypes[-1] == torch.float32  # evaluation does not
    assert math.isfinite(record["train/loss"]) and record["train/loss"] == record["train/ce"]
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in setup.distiller.student.parameters())


def test_fp16_builds_an_enabled_grad_scaler(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(amp="fp16"), tiny_setup(), torch.device("cpu"), tmp_path)
    assert trainer.amp_dtype == torch.float16 and trainer.scaler.is_enabled()
    assert trainer.scaler.get_scale() == 2.0**16


def movement(tmp_path: Path, **train: object) -> tuple[Trainer, float]:
    """Train 2 epochs (8 SGD steps, no weight decay); return the trainer and how far the weights moved."""
    cfg = tiny_config(epochs=2, **train)
    cfg.optim.weight_decay = 0.0
    trainer = Trainer(cfg, tiny_setup(), torch.device("cpu"), tmp_path)
    start = [p.detach().clone() for p in trainer.student.parameters()]
    trainer.fit()
    moved = [(p.detach() - s).flatten() for p, s in zip(trainer.student.parameters(), start, strict=True)]
    return trainer, torch.cat(moved).norm().item()


def test_grad_clip_bounds_each_step(tmp_path: Path) -> None:
    # With gradients clipped to norm c, an SGD step with momentum 0.9 moves at most lr * c / (1 - 0.9).
    _, clipped = movement(tmp_path / "clipped", grad_clip=1e-3)
    _, free = movement(tmp_path / "free")
    assert 0 < clipped <= 8 * 0.1 * 1e-3 / (1 - 0.9) < free


def test_ema_is_updated_evaluated_and_checkpointed(tmp_path: Path) -> None:
    trainer, _ = movement(tmp_path, ema_decay=0.5)
    lines = records(tmp_path)
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all("ema_val/top1" in r and "val/top1" in r for r in lines)
    pairs = zip(trainer.ema.module.parameters(), trainer.student.parameters(), strict=True)
    assert not any(torch.equal(a, b) for a, b in pairs)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(state["ema"][k], v) for k, v in trainer.ema.module.state_dict().items())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "last_test" not in summary and summary["best_epoch"] in (1, 2)


@pytest.mark.parametrize("select_ema", [False, True])
def test_select_ema_ranks_epochs_by_the_ema_and_keeps_its_weights(tmp_path: Path, select_ema: bool) -> None:
    # Scripted val top-1 per epoch (student, EMA): the student peaks in epoch 1, the EMA in epoch 2.
    scripted = iter([0.9, 0.1, 0.1, 0.5, 0.2, 0.3])
    seen: list[dict[str, Tensor]] = []  # the weights of each evaluated module, in call order

    def scripted_evaluate(model: torch.nn.Module, loader: object) -> dict[str, float]:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"top1": next(scripted, 0.0)}

    setup = tiny_setup()
    setup.evaluate = scripted_evaluate
    trainer = Trainer(tiny_config(epochs=3, ema_decay=0.5, select_ema=select_ema), setup, torch.device("cpu"),
                      tmp_path)
    summary = trainer.fit()
    assert [r["ema_val/top1"] for r in records(tmp_path)] == [0.1, 0.5, 0.3]
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    epoch, call = (2, 3) if select_ema else (1, 0)  # call 3: the EMA evaluated after epoch 2
    assert summary["best_epoch"] == epoch and summary["best_val"] == (0.5 if select_ema else 0.9)
    assert best["model"].keys() == trainer.student.state_dict().keys()  # loads into the bare student
    assert all(torch.equal(best["model"][k], v) for k, v in seen[call].items())
    assert not all(torch.equal(best["model"][k], v) for k, v in seen[call - 1 if select_ema else 1].items())
    assert ("EMA weights" in (tmp_path / "report.md").read_text()) == select_ema


def test_select_ema_without_an_ema_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.select_ema .* train.ema_decay is not set"):
        TrainConfig(select_ema=True)


def test_a_nan_loss_stops_the_run_with_advice(tmp_path: Path) -> None:
    setup = tiny_setup()
    setup.distiller.step.task_loss = lambda output, target: {"ce": output.sum() * float("nan")}
    with pytest.raises(TrainingDiverged, match="training loss became nan at step 1; lower optim.lr"):
        Trainer(tiny_config(), setup, torch.device("cpu"), tmp_path / "first").fit()  # the first step is checked
    later = tiny_setup()
    calls = {"n": 0}

    def nan_from_step_3(output: Tensor, target: Tensor) -> dict[str, Tensor]:
        calls["n"] += torch.is_grad_enabled()
        return {"ce": F.cross_entropy(output, target) * (float("nan") if calls["n"] >= 3 else 1.0)}

    later.distiller.step.task_loss = nan_from_step_3
    with pytest.raises(TrainingDiverged, match="training loss became nan in epoch 1; lower optim.lr"):
        Trainer(tiny_config(), later, torch.device("cpu"), tmp_path / "later").fit()  # then each epoch's mean


def test_lr_is_stepped_every_iteration(tmp_path: Path) -> None:
    cfg = tiny_config(epochs=2)
    cfg.schedule.name, cfg.schedule.warmup_epochs = "cosine", 0.0
    Trainer(cfg, tiny_setup(), torch.device("cpu"), tmp_path).fit()
    lrs = [r["lr"] for r in records(tmp_path)]
    # The lr logged after epoch e is the one the next step would use: 0.1 * (1 + cos(pi * e / 2)) / 2.
    assert lrs == pytest.approx([0.05, 0.0], abs=1e-12)


def test_resume_drops_records_written_after_the_last_checkpoint(tmp_path: Path) -> None:
    Trainer(tiny_config(epochs=1), tiny_setup(teacher=True), torch.device("cpu"), tmp_path).fit()
    assert [r["epoch"] for r in records(tmp_path)] == [0, 1]
    # A run killed after logging epoch 2 (and in the middle of a line) but before saving its checkpoint:
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"epoch": 2, "step": 8, "val/top1": -1.0}) + "\n" + '{"epoch": 3, "step": 12, "val/to')
    with SummaryWriter(str(tmp_path / "tensorboard")) as writer:
        writer.add_scalar("val/top1", -1.0, 8)  # records and events are keyed by the optimizer step (4 per epoch)
    # TensorBoard reads event files in name order: creation second, then a per-process counter. Processes
    # started one after the other get ordered names; in this one process, give the old files older names.
    old = sorted((tmp_path / "tensorboard").iterdir(), key=lambda path: path.stat().st_mtime_ns)
    for index, path in enumerate(old):
        path.rename(path.with_name(f"events.out.tfevents.{index:010d}.earlier"))
    Trainer(tiny_config(epochs=2), tiny_setup(teacher=True), torch.device("cpu"), tmp_path).fit(resume=True)
    lines = records(tmp_path)
    assert [r["epoch"] for r in lines] == [0, 1, 2]  # the teacher's line once, each epoch once
    assert lines[2]["val/top1"] >= 0
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/top1")] == [(r["step"], r["val/top1"]) for r in lines[1:]]
    assert [r["step"] for r in lines] == [0, 4, 8]
    assert [e.step for e in events.Scalars("teacher_val/top1")] == [0]


def test_an_extreme_first_gradient_is_warned_about_and_every_epoch_logs_the_gradient_norm(tmp_path: Path,
                                                                                          capsys) -> None:
    setup = tiny_setup()
    setup.distiller.step.task_loss = lambda output, target: {"ce": 1e4 * F.cross_entropy(output, target)}
    Trainer(tiny_config(), setup, torch.device("cpu"), tmp_path / "steep").fit()
    warning = capsys.readouterr().err
    assert "warning: the gradient norm at step 1 is" in warning and "set train.grad_clip" in warning
    Trainer(tiny_config(), tiny_setup(), torch.device("cpu"), tmp_path / "plain").fit()
    assert "warning" not in capsys.readouterr().err
    (record,) = records(tmp_path / "plain")
    assert 0 < record["train/grad_norm"] < 100


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_warned_about(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], native: bool) -> None:
    monkeypatch.setattr(cpu, "native_bf16", lambda: native)
    Trainer(tiny_config(amp="bf16"), tiny_setup(), torch.device("cpu"), tmp_path)
    warned = "train.amp=bf16 on a CPU without native bfloat16" in capsys.readouterr().err
    assert warned is not native


def test_native_bf16_reports_a_bool() -> None:
    assert isinstance(cpu.native_bf16(), bool)
