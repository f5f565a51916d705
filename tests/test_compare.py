"""`distkd compare`: the teacher once, every method's student on equal terms, one table and one plot, reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distkd.cli import main
from distkd.compare import METHODS, resolve_methods
from distkd.errors import ConfigError
from distkd.losses import list_losses

TINY = ["train.max_steps=3", "train.threads=1", "train.amp=none", "data.eval_batch_size=1000"]


def test_bundled_methods_name_registered_losses_and_the_student_alone_comes_first(tmp_path: Path) -> None:
    for task, methods in METHODS.items():
        assert methods["alone"]["distill"] == []
        assert {t["loss"] for m in methods.values() for t in m["distill"]} <= set(list_losses()), task
    assert list(resolve_methods("dist,kd", "classification")) == ["alone", "dist", "kd"]
    with pytest.raises(ConfigError, match="no bundled classification method 'dits' .did you mean 'dist'.*YAML file"):
        resolve_methods("dits", "classification")
    (tmp_path / "mine.yaml").write_text("mine: {ce_weight: 0.5, distill: [{loss: kd, weight: 0.5}]}\n")
    assert resolve_methods(str(tmp_path / "mine.yaml"), "classification")["mine"]["ce_weight"] == 0.5


@pytest.mark.slow
def test_compare_writes_one_table_and_plot_and_reuses_finished_runs(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "kd,fitnet", "--seeds", "2", "--out", str(out), "--set", *TINY]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
        first = capsys.readouterr().out
        report = (out / "report.md").read_text()
        rows = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| method")]
        assert [r.split("|")[1].strip() for r in rows] == ["alone", "kd", "fitnet"]
        assert int(rows[2].split("|")[4].replace(",", "")) > 0  # FitNet's regressor: extra trainable parameters
        assert rows[1].split("|")[4].strip() == "0"
        assert "±" in rows[1].split("|")[2] and "±" in rows[1].split("|")[3]  # two seeds: mean ± std, paired Δ
        assert (out / "compare.png").stat().st_size > 0
        assert "reused" not in first and first.count("[") >= 7  # teacher + 3 methods x 2 seeds
        assert main(argv) == 0
        assert capsys.readouterr().out.count("(reused)") == 7
        # Student-only overrides leave the teacher's run as it was (reused); a finished student run made with
        # another recipe is refused in one line, never reported as this one's.
        assert main([*argv, "--student-set", "optim.lr=0.05"]) != 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr()
    assert printed.out.count("(reused)") == 1 and "teacher" in printed.out
    error = printed.err.strip()
    assert error.count("\n") == 0
    assert "alone_seed0 holds a finished run with another config (differs in optim.lr)" in error
