"""`distkd demo` end to end, shortened to one epoch (the real demo's length is measured, not tested)."""

from __future__ import annotations

import pytest

from distkd import demo

pytestmark = pytest.mark.slow


def test_classification_demo_writes_the_table_and_plot_and_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(demo.QUICK, "classification", ["train.epochs=1", "train.amp=none"])
    results = demo.run_demo(tmp_path, seeds=2, quick=True)
    assert [len(results[m]) for m in ("teacher", "alone", "kd", "dist")] == [1, 2, 2, 2]
    report = (tmp_path / "report.md").read_text()
    for row in ("| small_cnn6_w32 | teacher | 288,170 |", "| small_cnn3_w4 | alone | 1,702 |",
                "| small_cnn3_w4 | kd |", "| small_cnn3_w4 | dist |"):
        assert row in report
    assert " ± " in report  # two seeds: mean ± std
    assert (tmp_path / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "teacher_cache" / "meta.json").is_file()  # KD and DIST students share one cache
    capsys.readouterr()
    demo.run_demo(tmp_path, seeds=2, quick=True)
    assert capsys.readouterr().out.count("(reused)") == 7


def test_segmentation_demo_reports_miou(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.QUICK, "segmentation",
                        ["train.epochs=1", "train.amp=none", "data.kwargs={train: 64, val: 32, test: 32}"])
    results = demo.run_demo(tmp_path, seeds=1, quick=True, task="segmentation")
    report = (tmp_path / "report.md").read_text()
    assert "test miou (best-on-val)" in report and "| seg_deeplabv3_tiny | dist |" in report
    assert all(0 <= r.summary["best_test"] <= 100 for runs in results.values() for r in runs)
