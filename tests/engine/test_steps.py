"""Step-based runs: max_steps, gradient accumulation, evaluation / checkpoints / metrics every N steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.config import RunConfig, TrainConfig
from distkd.data.base import Split
from distkd.data.loaders import TensorLoader
from distkd.distill import Distiller, SingleInputStep
from distkd.engine.trainer import Trainer, TrainSetup
from distkd.tasks.classification import evaluate


def cross_entropy(output: Tensor, target: Tensor) -> dict[str, Tensor]:
    return {"ce": F.cross_entropy(output, target)}


def setup(batch_size: int) -> TrainSetup:
    """64 random 6x6 images, a BatchNorm-free linear student (so half batches give the same mean gradient)."""
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 1, 6, 6), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (64,), generator=gen))
    stats = {"mean": (0.5,), "std": (0.25,)}
    train = TensorLoader(split, batch_size=batch_size, shuffle=True, drop_last=True, **stats)
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(36, 10))
    distiller = Distiller(student, step=SingleInputStep(cross_entropy))
    return TrainSetup(distiller, train, TensorLoader(split, batch_size=64, **stats), None, evaluate, "top1")


def config(**train: object) -> RunConfig:
    cfg = RunConfig(train=TrainConfig(device="cpu", progress="none", channels_last=False, **train))
    cfg.optim.weight_decay = 0.0
    return cfg


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_accumulating_two_half_batches_takes_the_full_batch_step(tmp_path: Path) -> None:
    full = Trainer(config(epochs=2), setup(16), torch.device("cpu"), tmp_path / "full")
    full.fit()
    halves = Trainer(config(epochs=2, accumulate=2), setup(8), torch.device("cpu"), tmp_path / "halves")
    assert halves.steps_per_epoch == full.steps_per_epoch == 4
    halves.fit()
    assert halves.step == full.step == 8
    for (name, a), b in zip(halves.student.state_dict().items(), full.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [r["lr"] for r in records(tmp_path / "halves")] == [r["lr"] for r in records(tmp_path / "full")]


def test_an_uneven_last_group_is_averaged_over_its_own_batches(tmp_path: Path) -> None:
    trainer = Trainer(config(epochs=1, accumulate=3), setup(16), torch.device("cpu"), tmp_path)
    assert trainer.steps_per_epoch == 2  # groups of 3 and 1 batches
    trainer.fit()
    assert trainer.step == 2


def test_max_steps_ends_mid_epoch_with_the_schedule_spanning_it(tmp_path: Path) -> None:
    cfg = config(epochs=100, max_steps=6, eval_every=4, log_every=2, checkpoint_every=5)
    cfg.schedule.name, cfg.schedule.warmup_epochs = "cosine", 0.0
    trainer = Trainer(cfg, setup(16), torch.device("cpu"), tmp_path)
    summary = trainer.fit()
    assert summary["steps"] == trainer.step == 6 and summary["epochs"] == 2  # 4 steps per epoch
    lines = records(tmp_path)
    steps = [r["step"] for r in lines if "train_step/loss" in r]
    evals = [r["step"] for r in lines if "val/top1" in r]
    epochs = [(r["epoch"], r["step"]) for r in lines if "train/loss" in r]
    assert steps == [2, 4, 6] and evals == [4, 6] and epochs == [(1, 4), (2, 6)]  # the last evaluation: the end
    assert [r for r in lines if "train/loss" in r][-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ends at 6
    assert all("val/top1" not in r for r in lines if "train/loss" in r)  # step-based evaluation has its own records
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch"]) == (6, 2, 0)
    assert summary["best_step"] in (4, 6)
