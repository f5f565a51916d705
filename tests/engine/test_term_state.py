"""Trainable distillation state: the shape probe, one optimizer group per term, clipping, checkpoints, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from distkd.config import RunConfig, TrainConfig
from distkd.data.base import Split
from distkd.data.batch import Batch
from distkd.data.loaders import TensorLoader
from distkd.distill import Distiller, SingleInputStep, Term
from distkd.engine.trainer import Trainer, TrainSetup
from distkd.losses import build_loss
from distkd.models import create_model
from distkd.tasks.classification import evaluate

ADAPTER_LR = 0.05


def cross_entropy(output: Tensor, target: Tensor) -> dict[str, Tensor]:
    return {"ce": F.cross_entropy(output.float(), target)}


def fitnet_setup(step: SingleInputStep | None = None) -> TrainSetup:
    """64 random 12x12 images, 4 steps of 16 per epoch; CE + FitNet from small_cnn3_w2's stage 2 to a w4 teacher's."""
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (64,), generator=gen))
    stats = {"mean": (0.5,), "std": (0.25,)}
    train = TensorLoader(split, batch_size=16, shuffle=True, drop_last=True, **stats)
    val = TensorLoader(split, batch_size=32, **stats)
    torch.manual_seed(0)
    student, teacher = create_model("small_cnn3_w2", 10), create_model("small_cnn3_w4", 10)
    term = Term("fitnet", build_loss("fitnet"), 2.0, "features.7", "features.7", lr=ADAPTER_LR, weight_decay=0.0)
    distiller = Distiller(student, teacher, [term], step or SingleInputStep(cross_entropy))
    return TrainSetup(distiller, train, val, None, evaluate, metric="top1")


def config(epochs: int = 2, **train: object) -> RunConfig:
    return RunConfig(train=TrainConfig(epochs=epochs, device="cpu", progress="none", **train))


def regressor(trainer: Trainer) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in trainer.distiller.term_state_dict().items()}


def test_the_probe_sizes_the_adapter_without_touching_the_models_or_the_random_state() -> None:
    setup = fitnet_setup()
    distiller, batch = setup.distiller, next(iter(setup.train))
    buffers = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    distiller.eval()
    distiller.probe(batch)
    assert torch.equal(torch.get_rng_state(), states[0]) and np.array_equal(np.random.get_state()[1], states[1])
    assert random.getstate() == states[2]
    assert all(torch.equal(v, distiller.student.state_dict()[k]) for k, v in buffers.items())  # BN stats too
    assert not distiller.training  # the mode it was in
    conv = distiller.term_losses[0][0].regressor.conv
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (4, 8, (1, 1))  # w2 stage 2 -> w4 stage 2
    ((term, params),) = distiller.term_parameters()
    assert term.name == "fitnet" and sum(p.numel() for p in params) == 4 * 8 + 8 + 2 * 8


def test_the_adapter_trains_in_its_own_group_is_clipped_and_is_saved_beside_the_student(tmp_path: Path) -> None:
    trainer = Trainer(config(grad_clip=1e-3), fitnet_setup(), torch.device("cpu"), tmp_path)
    start = regressor(trainer)
    adapter = {id(p) for _, params in trainer.distiller.term_parameters() for p in params}
    (group,) = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} & adapter]
    assert {id(p) for p in group["params"]} == adapter  # the term's own group: its lr and weight decay
    assert group["lr"] == ADAPTER_LR * trainer.scheduler.lr_lambdas[0](0) and group["weight_decay"] == 0.0
    seen: list[float] = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):  # noqa: ANN001, ANN202 - records what the trainer clips
        params = list(params)
        assert adapter <= {id(p) for p in params}  # adapters are clipped with the student
        seen.append(max_norm)
        return clip(params, max_norm)

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        summary = trainer.fit()
    finally:
        torch.nn.utils.clip_grad_norm_ = clip
    assert len(seen) == 8 and seen[0] == 1e-3
    end = regressor(trainer)
    assert not torch.equal(start["0.0.regressor.conv.weight"], end["0.0.regressor.conv.weight"])
    assert not torch.equal(start["0.0.regressor.bn.running_mean"], end["0.0.regressor.bn.running_mean"])
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert all(torch.equal(last["terms"][k], v) for k, v in end.items())
    assert set(best["terms"]) == set(end)
    bare = create_model("small_cnn3_w2", 10)
    bare.load_state_dict(best["model"], strict=True)  # the student alone, no adapter keys
    bare.load_state_dict(last["model"], strict=True)
    assert summary["term_parameters"] == 4 * 8 + 8 + 2 * 8 and summary["student_parameters"] > 0
    assert "distillation terms: 56 trainable parameters" in (tmp_path / "report.md").read_text()


class Stop(Exception):
    """Raised inside a training step to stand in for a killed process."""


def failing_step(after: int) -> SingleInputStep:
    """The usual step, raising Stop in the training forward number ``after + 1`` (probe calls do not count)."""
    calls = {"n": 0}

    def task_loss(output: Tensor, target: Tensor) -> dict[str, Tensor]:
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] > after:
                raise Stop
        return cross_entropy(output, target)

    return SingleInputStep(task_loss)


def test_a_run_stopped_mid_epoch_resumes_from_its_step_checkpoint_bit_identical(tmp_path: Path) -> None:
    train = {"checkpoint_every": 3, "log_every": 1}
    reference = Trainer(config(**train), fitnet_setup(), torch.device("cpu"), tmp_path / "ref")
    reference.fit()
    # 4 steps per epoch: the checkpoint of step 6 lands after batch 2 of epoch 2; the run dies in step 7.
    with pytest.raises(Stop):
        Trainer(config(**train), fitnet_setup(failing_step(6)), torch.device("cpu"), tmp_path / "run").fit()
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["batch"]) == (1, 6, 2)
    resumed = Trainer(config(**train), fitnet_setup(), torch.device("cpu"), tmp_path / "run")
    resumed.fit(resume=True)
    pairs = ((resumed.student, reference.student), (resumed.distiller.term_losses, reference.distiller.term_losses))
    for got, want in pairs:
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [r["step"] for r in ref_lines]  # each step's record once
    for got, want in zip(lines, ref_lines, strict=True):
        assert {k: v for k, v in got.items() if "_s" not in k} == {k: v for k, v in want.items() if "_s" not in k}


def test_a_checkpoint_without_the_terms_state_this_config_needs_is_a_one_line_error(tmp_path: Path) -> None:
    Trainer(config(epochs=1), fitnet_setup(), torch.device("cpu"), tmp_path).fit()
    path = tmp_path / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    state["terms"] = {}
    torch.save(state, path)
    from distkd.errors import CheckpointError

    with pytest.raises(CheckpointError, match="the distillation terms' state does not fit this config"):
        Trainer(config(epochs=2), fitnet_setup(), torch.device("cpu"), tmp_path).fit(resume=True)


def test_batches_carry_their_sample_indices_into_the_term_context() -> None:
    setup = fitnet_setup()
    seen: list[Tensor] = []

    class Spy(torch.nn.Module):
        def forward(self, student: Tensor, teacher: Tensor, *, return_parts: bool = False, **context: object):
            seen.append(context["index"])
            assert torch.equal(context["target"], setup.train.labels[context["index"]])
            loss = (student - teacher).pow(2).mean()
            return (loss, {}) if return_parts else loss

    distiller = Distiller(setup.distiller.student, setup.distiller.teacher, [Term("spy", Spy(), 1.0)])
    batches = list(setup.train)
    for batch in batches:
        distiller(batch)
    assert torch.equal(torch.sort(torch.cat(seen)).values, torch.sort(torch.cat([b.index for b in batches])).values)
    assert len(set(torch.cat(seen).tolist())) == 64 == setup.train.dataset_size


def test_an_unknown_term_transform_lists_the_known_ones() -> None:
    from distkd.errors import UnknownNameError

    student, teacher = create_model("small_cnn3_w2", 10), create_model("small_cnn3_w2", 10)
    with pytest.raises(UnknownNameError, match="unknown term transform 'flaten' .did you mean 'flatten'.*known:"):
        Distiller(student, teacher, [Term("kd", build_loss("kd"), 1.0, transform="flaten")])
    batch = Batch(torch.randn(4, 1, 12, 12), torch.tensor([0, 1, 2, 3]))
    pooled = Distiller(student, teacher, [Term("kd", build_loss("kd"), 1.0, "features.7", "features.7", "pool")])
    step = pooled(batch)
    with torch.no_grad():
        expected = build_loss("kd")(student.features[:8](batch.inputs).mean((2, 3)),
                                    teacher.features[:8](batch.inputs).mean((2, 3)))
    torch.testing.assert_close(step.losses["kd"], expected)
