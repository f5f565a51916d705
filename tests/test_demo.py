"""`distkd demo`: its report, and end to end shortened to one epoch (the real demo's length is measured, not tested)."""

from __future__ import annotations

from pathlib import Path

import pytest

from distkd import demo
from distkd.errors import ConfigError


@pytest.mark.slow
def test_classification_demo_writes_the_table_and_plot_and_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo.QUICK, "classification",
                        ["train.epochs=1", "data.kwargs={train: 4, val: 2, test: 2}"])
    results = demo.run_demo(tmp_path, seeds=2, quick=True)
    assert [len(results[m]) for m in ("teacher", "alone", "kd", "dist")] == [1, 2, 2, 2]
    report = (tmp_path / "report.md").read_text()
    for row in ("| small_cnn6_w32 | teacher | 299,780 |", "| small_cnn3_w4 | alone | 3,232 |",
                "| small_cnn3_w4 | kd |", "| small_cnn3_w4 | dist |"):
        assert row in report
    assert " ± " in report and "| 1 | " in report  # two seeds: mean ± std, a paired-difference row per seed
    assert (tmp_path / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "teacher_cache" / "meta.json").is_file()  # KD and DIST students share one cache
    assert {r.cfg.teacher_cache.views for m in ("kd", "dist") for r in results[m]} == {4}  # --quick: 4 views, not 16
    capsys.readouterr()
    demo.run_demo(tmp_path, seeds=2, quick=True)
    assert capsys.readouterr().out.count("(reused)") == 7
    monkeypatch.setitem(demo.QUICK, "classification", ["train.epochs=2", "data.kwargs={train: 4, val: 2, test: 2}"])
    with pytest.raises(ConfigError, match="teacher holds a finished run with another config .differs in train.epochs"):
        demo.run_demo(tmp_path, seeds=2, quick=True)  # another recipe never reuses this folder's results


@pytest.mark.slow
def test_segmentation_demo_reports_miou(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.QUICK, "segmentation",
                        ["train.epochs=1", "train.amp=none", "data.kwargs={train: 64, val: 32, test: 32}"])
    results = demo.run_demo(tmp_path, seeds=1, quick=True, task="segmentation")
    report = (tmp_path / "report.md").read_text()
    assert "test miou (best-on-val)" in report and "| seg_deeplabv3_tiny | dist |" in report
    assert all(0 <= r.summary["best_test"] <= 100 for runs in results.values() for r in runs)


def _fake_results(scores: dict[str, list[float]]) -> dict[str, list[demo.RunResult]]:
    """RunResults of the bundled classification configs with the given best-on-val test scores (no training)."""
    from distkd.config import load_config, resolve_config_path

    results = {}
    for method, values in scores.items():
        cfg = load_config(resolve_config_path(demo.CONFIGS["classification"][method]))
        params = 299_780 if method == "teacher" else 3_232
        results[method] = [demo.RunResult(cfg, {"metric": "top1", "best_test": v, "last_test": v - 1.0,
                                                "student_parameters": params}, [v], 2.0) for v in values]
    return results


def test_the_report_lists_mean_std_per_method_and_each_seeds_paired_differences():
    results = _fake_results({"teacher": [70.0], "alone": [20.0, 22.0, 21.0], "kd": [24.0, 25.0, 26.0],
                             "dist": [29.0, 30.5, 28.0]})
    report = demo._report(results, seeds=3)
    assert "silhouette pairs (100 ordered-pair classes" in report
    assert "| small_cnn6_w32 | teacher | 299,780 | 15 | 70.00 | 69.00 | 2 s |" in report
    assert "| small_cnn3_w4 | alone | 3,232 | 40 | 21.00 ± 1.00 | 20.00 ± 1.00 | 6 s |" in report
    assert "| small_cnn3_w4 | dist | 3,232 | 40 | 29.17 ± 1.26 |" in report
    assert "| seed | kd − alone | dist − alone | dist − kd |" in report
    assert "| 0 | +4.00 | +9.00 | +5.00 |" in report and "| 2 | +5.00 | +7.00 | +2.00 |" in report
    assert "| mean ± std | +4.00 ± 1.00 | +8.17 ± 1.04 | +4.17 ± 1.89 |" in report


def test_a_one_seed_report_has_no_spread_row():
    report = demo._report(_fake_results({"teacher": [70.0], "alone": [20.0], "kd": [24.0], "dist": [29.0]}), 1)
    assert "| small_cnn3_w4 | kd | 3,232 | 40 | 24.00 | 23.00 | 2 s |" in report
    assert "| 0 | +4.00 | +9.00 | +5.00 |" in report and "mean ± std |" not in report


README = Path(__file__).resolve().parents[1] / "README.md"
QUICK_MARK = "<!-- distkd demo --quick report rows (tests/test_demo.py compares them with what the command prints) -->"
QUICK_END = "<!-- end of the --quick report rows -->"
TOLERANCE = 0.5  # points: seeded runs repeat exactly on one machine; another CPU's float rounding may move a few images


def _rows(text: str) -> list[list[str]]:
    """The cells of the report's table rows: per-method rows and per-seed paired-difference rows."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith(("| small_", "| 0 |"))]
    return [[cell.strip() for cell in row] for row in rows]


@pytest.mark.slow
def test_the_readme_quotes_the_quick_demo_numbers_the_command_prints(tmp_path):
    readme = README.read_text()
    assert QUICK_MARK in readme and QUICK_END in readme, "the README lost the marked --quick rows"
    quoted = _rows(readme.split(QUICK_MARK, 1)[1].split(QUICK_END, 1)[0])
    demo.run_demo(tmp_path, quick=True)
    printed = _rows((tmp_path / "report.md").read_text())
    assert len(quoted) == len(printed) == 5  # teacher, alone, kd, dist, and seed 0's paired differences
    for q, p in zip(quoted[:4], printed[:4], strict=True):
        assert q[:4] == p[:4]  # model, method, params, epochs
        for column in (4, 5):  # test top-1 best-on-val, last epoch (the time column is not compared)
            assert abs(float(q[column]) - float(p[column])) <= TOLERANCE, (q, p)
    for q, p in zip(quoted[4][1:], printed[4][1:], strict=True):
        assert abs(float(q) - float(p)) <= TOLERANCE, (quoted[4], printed[4])


@pytest.mark.slow
def test_runs_side_by_side_in_worker_processes_give_the_sequential_results(tmp_path, monkeypatch):
    # jobs=2: teacher beside the student alone, the shared cache built once, then KD and DIST side by side.
    monkeypatch.setitem(demo.QUICK, "classification", ["train.epochs=1", "data.kwargs={train: 4, val: 2, test: 2}"])
    sequential = demo.run_demo(tmp_path / "one", seeds=1, quick=True, jobs=1)
    parallel = demo.run_demo(tmp_path / "two", seeds=1, quick=True, jobs=2)
    assert list(parallel) == ["teacher", "alone", "kd", "dist"]
    for method, runs in sequential.items():
        assert [r.summary["best_test"] for r in parallel[method]] == [r.summary["best_test"] for r in runs], method
        assert parallel[method][0].val_curve == runs[0].val_curve, method
    assert (tmp_path / "two" / "teacher_cache" / "meta.json").is_file()

