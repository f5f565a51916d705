"""Kill a real ``distkd train`` process at random moments, resume it, and get the uninterrupted run's bits."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

EPOCHS = 2
# The session's `teacher_run` (trained in-process) is the uninterrupted run of this command: same config,
# but for out_dir and progress. An epoch of small_cnn3_w4 lasts a second or more: room to kill mid-epoch.
OVERRIDES = ("model.name=small_cnn3_w4", f"train.epochs={EPOCHS}", "train.progress=lines")


def start(run_root: Path, log: Path, fast: tuple[str, ...], resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distkd", "train", "demo/teacher.yaml", *fast, f"out_dir={run_root}", *OVERRIDES]
    with log.open("a") as out:
        return subprocess.Popen([*cmd, "--resume"] if resume else cmd, stdout=out, stderr=subprocess.STDOUT,
                                cwd=run_root.parent)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training exited with {proc.returncode} before writing {path}"
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.02)


def kill(proc: subprocess.Popen) -> bool:
    """SIGKILL ``proc`` if it still runs; True when it was killed (not already finished)."""
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode == -signal.SIGKILL


def checkpoint_epoch(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last.pt"
    return torch.load(last, weights_only=True)["epoch"] if last.exists() else 0


@pytest.mark.slow
def test_killed_and_resumed_run_ends_bit_identical(
    tmp_path: Path, fast_overrides: tuple[str, ...], teacher_run: tuple[Path, dict]
) -> None:
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    note = f"(kill-time seed {seed}; log in {tmp_path / 'train.log'})"
    run_root, log = tmp_path / "killed", tmp_path / "train.log"
    run_root.mkdir()
    run_dir, ref_dir = run_root / "teacher", teacher_run[0]
    last = run_dir / "checkpoints" / "last.pt"

    # 1. The first process dies in the middle of epoch 2, moments after epoch 1's checkpoint landed.
    proc = start(run_root, log, fast_overrides, resume=False)
    wait_for(last, proc, timeout=240)
    time.sleep(rng.uniform(0.0, 0.3))
    assert kill(proc), f"the run ended before it could be killed {note}"
    assert checkpoint_epoch(run_dir) == 1, f"killed after epoch 2 ended, not during it {note}"

    # 2. A resumed process dies at a random moment (while starting, training, evaluating or saving).
    kills = 1
    proc = start(run_root, log, fast_overrides, resume=True)
    time.sleep(rng.uniform(0.5, 8.0))
    kills += kill(proc)
    # 3. The last one runs to the end.
    proc = start(run_root, log, fast_overrides, resume=True)
    assert proc.wait(timeout=300) == 0, f"{log.read_text()[-2000:]} {note}"
    assert log.read_text().count("resumed from") >= 1

    got = torch.load(last, weights_only=True)
    want = torch.load(ref_dir / "checkpoints" / "last.pt", weights_only=True)
    assert got["epoch"] == want["epoch"] == EPOCHS and got["best"] == want["best"], note
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"{key} differs after {kills} kill(s) {note}"
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for index, state in want["optimizer"]["state"].items():
        assert torch.equal(got["optimizer"]["state"][index]["momentum_buffer"], state["momentum_buffer"]), note
    assert got["scheduler"] == want["scheduler"]
    best_got = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    best_want = torch.load(ref_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(best_got[k], v) for k, v in best_want.items()), note

    # metrics.jsonl holds each epoch once, with the uninterrupted run's numbers.
    def records(path: Path) -> list[dict]:
        return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]

    resumed, reference = records(run_dir), records(ref_dir)
    assert [r["epoch"] for r in resumed] == list(range(1, EPOCHS + 1)), note
    for key in ("train/loss", "val/top1", "val/loss", "lr"):
        assert [r[key] for r in resumed] == [r[key] for r in reference], f"{key} {note}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == json.loads((ref_dir / "summary.json").read_text()), note


@pytest.mark.slow
def test_a_killed_distillation_with_an_adapter_resumes_mid_epoch_bit_identical(
    tmp_path: Path, fast_overrides: tuple[str, ...], teacher_run: tuple[Path, dict], make_config, run_train
) -> None:
    # FitNet from the session's teacher: its regressor is trainable term state; checkpoints every 10 of 54 steps.
    teacher_ckpt = teacher_run[0] / "checkpoints" / "best.pt"
    overrides = ("teacher.name=small_cnn3_w4", f"teacher.checkpoint={teacher_ckpt}",
                 "loss.distill.0.teacher=features.7", "train.epochs=1", "train.checkpoint_every=10",
                 "train.progress=lines")
    reference = make_config("demo/fitnet.yaml", tmp_path / "reference", *overrides)
    run_train(reference)
    run_root, log = tmp_path / "killed", tmp_path / "train.log"
    run_root.mkdir()
    cmd = [sys.executable, "-m", "distkd", "train", "demo/fitnet.yaml", *fast_overrides, f"out_dir={run_root}",
           *overrides]
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    last = run_root / "fitnet" / "checkpoints" / "last.pt"
    wait_for(last, proc, timeout=240)
    time.sleep(random.uniform(0.0, 0.3))
    assert kill(proc), "the run ended before it could be killed"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["batch"] > 0, "the kill came after a mid-epoch checkpoint"
    with log.open("a") as out:
        resumed = subprocess.run([*cmd, "--resume"], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, log.read_text()[-2000:]
    where = f"at step {saved['step']} (epoch 0, batch {saved['batch']} of epoch 1)"
    assert f"resumed from {last} {where}" in log.read_text()
    got = torch.load(last, weights_only=True)
    want = torch.load(reference.run_dir / "checkpoints" / "last.pt", weights_only=True)
    for entry in ("model", "terms"):
        assert got[entry].keys() == want[entry].keys() and len(got[entry]) > 0
        for key, value in want[entry].items():
            assert torch.equal(got[entry][key], value), f"{entry}.{key} differs"
    assert got["terms"]["0.0.regressor.conv.weight"].shape == (8, 4, 1, 1)  # w2 stage 2 -> w4 stage 2
