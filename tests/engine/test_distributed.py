"""Two processes under torchrun (gloo on CPU): one set of records, and metrics that belong to the checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
