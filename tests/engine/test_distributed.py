"""Two processes under torchrun (gloo on CPU): one set of records, metrics that belong to the checkpoint, the
one-process trajectory, exact resume after a kill, exact sharded evaluation, and rank 0's initial weights."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distkd.api import evaluate_checkpoint


@pytest.mark.slow
def test_two_process_run_logs_once_and_its_metrics_are_the_checkpoints(
    tmp_path: Path, fast_overrides: tuple[str, ...]
) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "distkd", "train", "demo/student.yaml", *fast_overrides, f"out_dir={tmp_path}", "train.epochs=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "student"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]  # rank 0 alone writes the records
    summary = json.loads((run_dir / "summary.json").read_text())
    last, best = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    # Each rank evaluated its half of val/test with the same weights and BatchNorm statistics: those saved.
    assert evaluate_checkpoint(last, "val")["top1"] == lines[-1]["val/top1"] == summary["last_val"]
    assert evaluate_checkpoint(last, "test")["top1"] == summary["last_test"]
    assert evaluate_checkpoint(best, "test")["top1"] == summary["best_test"]


# ------------------------------------------------------------------------------------------------------------
# One process vs two, and a killed two-process run resumed.
#
# A BatchNorm model cannot give the same trajectory with half the batch per rank (each rank normalises with
# its own half's statistics), so these runs use a BN-free student: a one-block timm ViT (LayerNorm is per
# sample). Augmentation is off because each rank draws its own crops; the sample order is shared by design.
# data.batch_size is the global batch: each rank takes half of it, at positions r, r + 2, ... of the same
# permutation, so every step sees the same global batch and DDP's mean of the two half-batch gradients is the
# full-batch one.
VIT = ("model.name=timm_vit_tiny_patch16_224", "model.kwargs.img_size=28", "model.kwargs.patch_size=7",
       "model.kwargs.in_chans=1", "model.kwargs.depth=1", "model.kwargs.embed_dim=32", "model.kwargs.num_heads=2",
       "data.crop_padding=0", "data.flip=false", "train.epochs=3")
GLOBAL_BATCH = 128


def torchrun(run_root: Path, fast: tuple[str, ...], *extra: str, resume: bool = False) -> subprocess.Popen:
    """Start ``torchrun --nproc_per_node 2 -m distkd train`` of the ViT student under ``run_root``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "distkd",
           "train", "demo/student.yaml", *fast, *VIT, f"data.batch_size={GLOBAL_BATCH}", f"out_dir={run_root}",
           *extra, *(["--resume"] if resume else [])]
    log = (run_root.parent / f"{run_root.name}.log").open("a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=run_root.parent)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (torchrun puts its workers in sessions of their own), children first."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory: pytest.TempPathFactory, fast_overrides: tuple[str, ...]) -> Path:
    """The uninterrupted 2-process run (3 epochs), shared by the tests below."""
    root = tmp_path_factory.mktemp("ddp") / "whole"
    root.mkdir()
    proc = torchrun(root, fast_overrides)
    assert proc.wait(timeout=300) == 0, (root.parent / "whole.log").read_text()[-3000:]
    return root / "student"


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory(
    tmp_path: Path, fast_overrides: tuple[str, ...], two_process_run: Path, run_train
) -> None:
    from distkd.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path("demo/student.yaml"),
                      [*fast_overrides, *VIT, f"data.batch_size={GLOBAL_BATCH}", f"out_dir={tmp_path}"])
    one = run_train(cfg)
    single, double = records(cfg.run_dir), records(two_process_run)
    assert [r["epoch"] for r in double] == [1, 2, 3]
    for a, b in zip(single, double, strict=True):
        # the same sums in another order (all-reduce of half-batch gradients): 1e-7 apart after epoch 1,
        # about 5e-4 relative by epoch 3 as training at lr 0.1 amplifies the rounding differences
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=3e-3)
        assert b["val/loss"] == pytest.approx(a["val/loss"], rel=3e-3)
        assert abs(b["val/top1"] - a["val/top1"]) <= 0.5  # at most five of 1000 images flip
    assert double[0]["train/loss"] == pytest.approx(single[0]["train/loss"], rel=1e-5)
    assert json.loads((two_process_run / "summary.json").read_text())["last_test"] == pytest.approx(
        one["last_test"], abs=0.5)
    w1 = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    w2 = torch.load(two_process_run / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key, value in w1.items():
        assert torch.allclose(w2[key], value, rtol=1e-2, atol=1e-2), key


@pytest.mark.slow
def test_killed_two_process_run_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, fast_overrides: tuple[str, ...], two_process_run: Path
) -> None:
    root = tmp_path / "killed"
    root.mkdir()
    run_dir = root / "student"
    last = run_dir / "checkpoints" / "last.pt"
    proc = torchrun(root, fast_overrides)
    deadline = time.monotonic() + 240
    while not last.exists():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.01)
    for pid in [*descendants(proc.pid), proc.pid]:  # the workers first, then torchrun: nothing exits cleanly
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    epoch = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= epoch < 3, f"the run was not stopped before its end (checkpoint of epoch {epoch})"

    resumed = torchrun(root, fast_overrides, resume=True)
    assert resumed.wait(timeout=300) == 0, (tmp_path / "killed.log").read_text()[-3000:]
    got = torch.load(last, weights_only=True)
    want = torch.load(two_process_run / "checkpoints" / "last.pt", weights_only=True)
    assert got["epoch"] == want["epoch"] == 3
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), key
    for a, b in zip(want["optimizer"]["state"].values(), got["optimizer"]["state"].values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert [r["epoch"] for r in records(run_dir)] == [1, 2, 3]
    assert records(run_dir)[-1]["val/top1"] == records(two_process_run)[-1]["val/top1"]


# ------------------------------------------------------------------------------------------------------------
# Evaluation counts each sample once; DDP gives every rank rank 0's initial student.

WORKER = """
import json, sys, torch
from distkd.config import RunConfig
from distkd.data.base import InMemoryData, Split
from distkd.engine import distributed
from distkd.errors import ConfigError
from distkd.models import create_model
from distkd.tasks import classification

device = distributed.init_from_env("cpu")
rank = distributed.rank()
torch.manual_seed(rank)  # as api.train seeds: cfg.seed + rank
student = create_model("small_cnn3_w2", num_classes=3)
before = float(sum(p.sum() for p in student.parameters()))
wrapped = distributed.wrap(student, device)
after = float(sum(p.sum() for p in student.parameters()))
torch.manual_seed(0)
images, labels = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2, 0])
data = InMemoryData(Split(images, labels), Split(images, labels), None, 3, (0.5,), (0.25,))
cfg = RunConfig()
cfg.data.batch_size, cfg.data.eval_batch_size, cfg.train.channels_last = 4, 2, False  # global batches
train, val, _ = classification.build_loaders(cfg, data, device)
train_batches = [len(b.index) for b in train]
model = create_model("small_cnn3_w2", num_classes=3)
model.load_state_dict(torch.load(sys.argv[1], weights_only=True))
metrics = classification.evaluate(model, val)
try:
    distributed.sync_batchnorm(model, device)
    sync_error = None
except ConfigError as exc:
    sync_error = str(exc)
print(json.dumps({"rank": rank, "before": before, "after": after, "seen": val.num_samples, "train": train_batches,
                  "eval_batch": val.batch_size, "sync_error": sync_error, **metrics}))
distributed.close()
"""


def test_the_global_batch_divides_over_the_processes_or_is_a_one_line_error() -> None:
    from distkd.engine.distributed import process_batch, process_eval_batch
    from distkd.errors import ConfigError

    assert [process_batch(256, w) for w in (1, 2, 8)] == [256, 128, 32]  # ImageNet B1: the authors' 32 x 8
    assert process_batch(16, 8) == 2  # Cityscapes: 2 per GPU
    assert [process_eval_batch(9, w) for w in (1, 2, 4, 9, 16)] == [9, 5, 3, 1, 1]
    with pytest.raises(ConfigError, match=r"^data.batch_size=64 \(the global batch\) does not divide over 3 "
                       r"processes; set data.batch_size to a multiple of 3") as info:
        process_batch(64, 3)
    assert "\n" not in str(info.value)


def test_sync_bn_converts_every_batchnorm_keeping_weights_keys_and_outputs() -> None:
    from distkd.engine.distributed import convert_batchnorm, sync_batchnorm
    from distkd.models import create_model

    torch.manual_seed(0)
    model = create_model("small_cnn3_w2", num_classes=3).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    x = torch.randn(4, 1, 8, 8)
    want, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert sync_batchnorm(model, torch.device("cpu")) is model  # one process: nothing to synchronise
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert convert_batchnorm(model) is model
    kinds = [type(m) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert kinds and all(k is torch.nn.SyncBatchNorm for k in kinds)
    assert [id(p) for p in model.parameters()] == params  # the optimizer's parameters stay the same objects
    assert model.state_dict().keys() == state.keys() and all(torch.equal(model.state_dict()[k], v)
                                                             for k, v in state.items())
    assert torch.equal(model(x), want)
    model.train()(x).sum().backward()  # without a process group SyncBatchNorm normalises like BatchNorm


def test_two_processes_evaluate_each_sample_once_and_share_rank_zero_initial_weights(tmp_path: Path) -> None:
    from distkd.config import RunConfig
    from distkd.data.base import InMemoryData, Split
    from distkd.models import create_model
    from distkd.tasks import classification

    torch.manual_seed(0)
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    model = create_model("small_cnn3_w2", num_classes=3).eval()
    with torch.no_grad():  # non-trivial BN statistics, so predictions differ between samples
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    cfg = RunConfig()
    cfg.data.batch_size, cfg.data.eval_batch_size, cfg.train.channels_last = 2, 2, False
    data = InMemoryData(Split(images, labels), Split(images, labels), None, 3, (0.5,), (0.25,))
    want = classification.evaluate(model, classification.build_loaders(cfg, data, torch.device("cpu"))[1])

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "model.pt")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert [g["seen"] for g in got] == [4, 3]  # 7 samples: no padding sample on rank 1
    # data.batch_size 4 is global: each rank trains on 2 (7 samples -> 3 per rank, drop_last), evaluates on 1
    assert [g["train"] for g in got] == [[2], [2]] and [g["eval_batch"] for g in got] == [1, 1]
    # torch's SyncBatchNorm synchronises CUDA tensors only: several CPU processes get a one-line error
    assert all(g["sync_error"].startswith("train.sync_bn needs CUDA") and "\n" not in g["sync_error"] for g in got)
    for g in got:
        for key in ("top1", "top5", "loss"):
            assert g[key] == pytest.approx(want[key], rel=1e-6), key
    assert got[0]["before"] != got[1]["before"]  # seeded by rank, the two students start apart...
    assert got[0]["after"] == got[1]["after"] == got[0]["before"]  # ...and DDP gives both rank 0's weights


@pytest.mark.slow
def test_two_processes_keep_an_adapter_identical_on_both_ranks(
    tmp_path: Path, fast_overrides: tuple[str, ...], teacher_run: tuple[Path, dict]
) -> None:
    # FitNet's regressor is created by each rank's shape probe with its own random state, and each rank sees other
    # images: only rank 0's initial state sent to all, and gradients averaged over ranks, keep the two equal.
    teacher_ckpt = teacher_run[0] / "checkpoints" / "best.pt"
    script = Path(__file__).with_name("ddp_term_state.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), "demo/fitnet.yaml", *fast_overrides, f"out_dir={tmp_path}", "train.epochs=1",
           "teacher.name=small_cnn3_w4", f"teacher.checkpoint={teacher_ckpt}", "loss.distill.0.teacher=features.7",
           "data.batch_size=64"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["terms"].keys() == rank1["terms"].keys() and len(rank0["terms"]) > 0
    for key, value in rank0["terms"].items():
        assert torch.equal(value, rank1["terms"][key]), key
        assert torch.equal(rank0["initial"][key], rank1["initial"][key]), key  # rank 0's initial state
    assert not torch.equal(rank0["terms"]["0.0.regressor.conv.weight"], rank0["initial"]["0.0.regressor.conv.weight"])
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key
    saved = torch.load(tmp_path / "fitnet" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(saved["terms"][k], v) for k, v in rank0["terms"].items())
