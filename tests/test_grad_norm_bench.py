"""``benchmarks/grad_norm_init.py``: its core function in quick mode on a tiny student.

The property checked is the one the benchmark documents: DIST's step-0 gradient grows like
``1 / ||z - mean(z)||`` as the student's head (and so its logits) is initialised smaller, while CE's does not.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grad_norm_init.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grad_norm_init", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def result(bench: ModuleType) -> dict:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny = bench.Student("small_cnn3_w4", 32, 0.05, {"in_chans": 3})
        return bench.run_benchmark([tiny], bench.VARIANTS, bench.QUICK_STEPS, bench.QUICK_SCALES,
                                   teacher="cifar_resnet8")
    finally:
        torch.set_num_threads(before)


def test_structure(bench: ModuleType, result: dict) -> None:
    teacher = result["teacher"]
    assert teacher["name"] == "cifar_resnet8" and teacher["scale"] > 0
    assert abs(teacher["top1_prob"] - bench.TEACHER_TOP1) < 0.01
    (entry,) = result["students"]
    assert entry["student"]["name"] == "small_cnn3_w4"
    assert list(entry["runs"]) == [v.label for v in bench.VARIANTS]
    for records in entry["runs"].values():
        assert [r["step"] for r in records] == list(range(bench.QUICK_STEPS))
        for r in records:
            assert set(r) == {"step", "lr", "grad_norm", "loss", "ce", "logit_norm"}
            assert all(math.isfinite(v) for v in r.values())
    assert [row["scale"] for row in entry["sweep"]] == list(bench.QUICK_SCALES)
    summary = bench.summary_table(result)
    assert len(summary) == 3 and summary[2].startswith("| small_cnn3_w4 (32², lr 0.05) |")
    lines = bench.trajectory_table(result, [0, bench.QUICK_STEPS - 1]) + bench.sweep_table(result)
    assert sum(line.startswith("| ") for line in lines) == 1 + len(bench.VARIANTS) + 1 + len(bench.QUICK_SCALES)


def test_variants_share_step_zero_and_apply_the_mitigations(bench: ModuleType, result: dict) -> None:
    runs = result["students"][0]["runs"]
    lr = result["students"][0]["student"]["lr"]
    dist = [v.label for v in bench.VARIANTS if v.loss == "DIST(2,2,4)"]
    # Same weights, same batch, same loss: the same gradient before any mitigation acts.
    step0 = [runs[label][0]["grad_norm"] for label in dist]
    assert max(step0) == pytest.approx(min(step0), rel=1e-5)
    assert runs["CE + DIST(2,2,4)"][0]["grad_norm"] > 5 * runs["CE"][0]["grad_norm"]
    # distkd's warm-up starts at warmup_start = 0.1 of the lr and rises linearly over one 782-step epoch.
    warm = runs["CE + DIST(2,2,4), warm-up"]
    assert warm[0]["lr"] == pytest.approx(0.1 * lr)
    assert warm[1]["lr"] == pytest.approx(lr * (0.1 + 0.9 / bench.ITERS_PER_EPOCH))
    assert all(r["lr"] == pytest.approx(lr) for r in runs["CE + DIST(2,2,4), clip 5"])


def test_dist_gradient_grows_as_the_initial_logits_shrink(bench: ModuleType, result: dict) -> None:
    rows = result["students"][0]["sweep"]  # scales ascending: 1e-3, 1e-1, 1
    norms = [row["logit_norm"] for row in rows]
    assert norms[0] < norms[1] < norms[2]
    dist = [row["grad DIST(2,2,4)"] for row in rows]
    assert dist[0] > dist[1] > dist[2]
    # A head 100x smaller: DIST's gradient w.r.t. the logits about 100x larger (1 / ||z - mean z||) ...
    logit_grad = [row["logit_grad DIST(2,2,4)"] for row in rows]
    assert 50 < logit_grad[0] / logit_grad[1] < 200
    assert bench.loglog_slope(norms[:2], logit_grad[:2]) == pytest.approx(-1, abs=0.15)
    # ... and w.r.t. the parameters it grows too, while CE's does not.
    assert dist[0] / dist[1] > 20
    ce = [row["grad CE"] for row in rows]
    assert ce[0] <= ce[2] * 1.01
    assert dist[0] > 1000 * ce[0]
