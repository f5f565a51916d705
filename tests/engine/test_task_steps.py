"""Task-owned steps: a model whose training forward takes targets and returns a loss dict, list batches,
per-call taps of a shared head, through the same Trainer as classification."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.config import RunConfig, TrainConfig
from distkd.data.batch import Batch
from distkd.distill import Distiller, Term
from distkd.distill.taps import FeatureTaps
from distkd.engine.trainer import Trainer, TrainSetup
from distkd.errors import UnknownNameError
from distkd.losses import build_loss

CLASSES = 4


class TinyDetector(nn.Module):
    """Images as a list of (1, 16, 16); a head shared by three 'pyramid levels' (16, 8 and 4 pixels).

    Training: ``model(images, targets)`` -> ``{"classification": ..., "box_regression": ...}`` (targets: one dict
    per image with ``labels`` (1,) and ``boxes`` (1, 4)). Evaluation: ``model(images)`` -> scores (N, CLASSES).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, CLASSES, 1)
        self.box = nn.Linear(width, 4)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        feature = self.body(torch.stack(images))
        levels = [feature, F.avg_pool2d(feature, 2), F.avg_pool2d(feature, 4)]
        scores = torch.stack([self.head(level).mean((2, 3)) for level in levels]).mean(0)
        if not self.training:
            return scores
        labels = torch.cat([t["labels"] for t in targets])
        boxes = torch.cat([t["boxes"] for t in targets])
        return {"classification": F.cross_entropy(scores, labels),
                "box_regression": F.smooth_l1_loss(self.box(feature.mean((2, 3))), boxes)}


class DetectionStep:
    """The task's step for TinyDetector: losses from the model itself, the teacher run in eval mode."""

    def student(self, model: nn.Module, batch: Batch) -> tuple[Any, dict[str, Tensor]]:
        return None, model(batch.inputs, batch.target)

    def teacher(self, model: nn.Module, batch: Batch, student_output: Any) -> Any:
        return model(batch.inputs)

    def context(self, batch: Batch, student_output: Any) -> dict[str, Any]:
        return {}


class ListLoader:
    """Batches of variable-length lists: class c is an image of brightness c / CLASSES plus noise."""

    def __init__(self, count: int, batch_size: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, CLASSES, (count,), generator=gen)
        self.images = [torch.full((1, 16, 16), c / CLASSES) + 0.1 * torch.randn(1, 16, 16, generator=gen)
                       for c in self.labels.tolist()]
        self.batch_size, self.epoch, self.start = batch_size, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    @property
    def num_samples(self) -> int:
        return len(self) * self.batch_size

    @property
    def dataset_size(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.epoch))
        for b in range(self.start, len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            targets = [{"labels": self.labels[i : i + 1], "boxes": torch.rand(1, 4)} for i in index.tolist()]
            yield Batch([self.images[i] for i in index.tolist()], targets, index)


@torch.no_grad()
def accuracy(model: nn.Module, loader: ListLoader) -> dict[str, float]:
    was_training = model.training
    model.eval()
    hits = sum((model(b.inputs).argmax(1) == torch.cat([t["labels"] for t in b.target])).sum().item()
               for b in loader)
    model.train(was_training)
    return {"acc": 100 * hits / loader.num_samples}


def test_a_shared_module_called_three_times_gives_a_three_element_tap() -> None:
    model = TinyDetector(4).eval()
    taps = FeatureTaps(model, ["head"], "the student")
    with taps.recording():
        model([torch.rand(1, 16, 16), torch.rand(1, 16, 16)])
        calls = list(taps.outputs["head"])
    assert [tuple(c.shape) for c in calls] == [(2, CLASSES, 16, 16), (2, CLASSES, 8, 8), (2, CLASSES, 4, 4)]
    model([torch.rand(1, 16, 16)])
    assert len(taps.outputs["head"]) == 3  # calls outside a recording are not kept
    taps.clear()
    assert taps.outputs["head"] == []


def fit(distiller: Distiller, run_dir: Path) -> dict[str, Any]:
    """Eight epochs of 12 steps, SGD lr 0.2, through the Trainer."""
    train, val = ListLoader(96, 8, seed=1), ListLoader(64, 16, seed=2)
    cfg = RunConfig(train=TrainConfig(epochs=8, device="cpu", progress="none", channels_last=False))
    cfg.optim.lr = 0.2
    return Trainer(cfg, TrainSetup(distiller, train, val, None, accuracy, "acc"), torch.device("cpu"), run_dir).fit()


def test_a_detector_style_model_with_targets_and_a_loss_dict_trains_through_the_trainer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher, student = TinyDetector(16), TinyDetector(4)
    assert fit(Distiller(teacher, step=DetectionStep()), tmp_path / "teacher")["best_val"] > 90
    # weight 0.1: at lr 0.2 DIST's large gradients near initialisation make weight 1 unstable for this tiny head
    dist = Term("dist_head", build_loss("dist", activation="sigmoid"), 0.1, "head", "head")
    distiller = Distiller(student, teacher, [dist], DetectionStep())
    start = {k: v.clone() for k, v in student.state_dict().items()}
    summary = fit(distiller, tmp_path / "student")
    assert len(distiller.term_losses[0]) == 3  # one DIST term per level of the shared head, summed
    lines = (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in lines][1:]
    parts = {"train/classification", "train/box_regression", "train/dist_head", "train/dist_head/inter"}
    assert parts <= set(epochs[0])
    assert epochs[-1]["train/loss"] == pytest.approx(
        sum(epochs[-1][f"train/{k}"] for k in ("classification", "box_regression", "dist_head")), rel=1e-5)
    assert all(not torch.equal(v, student.state_dict()[k]) for k, v in start.items())
    assert summary["teacher_val"]["acc"] > 90 and summary["best_val"] > 50  # four classes: chance is 25 %


def test_an_unknown_task_is_an_error_naming_the_known_ones(tmp_path: Path) -> None:
    from distkd.api import train
    from distkd.config import load_config

    cfg = load_config(None, ["task=detecton", f"out_dir={tmp_path}"])
    known = r"unknown task 'detecton' \(did you mean 'detection'\?\); known: classification, detection, segmentation"
    with pytest.raises(UnknownNameError, match=known):
        train(cfg)
    assert not any(tmp_path.iterdir())  # nothing written
