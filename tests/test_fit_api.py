"""``distkd.fit``: your own modules and datasets through distkd's loop; the README's Python example as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import distkd
from distkd.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")
README = Path(__file__).resolve().parents[1] / "README.md"
QUICK = ["train.epochs=2", "data.num_workers=0", "data.batch_size=32", "train.progress=none", "train.threads=1"]


class Net(nn.Module):
    """A module no registry knows."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _data(count: int, seed: int) -> TensorDataset:
    labels = torch.arange(count) % 2
    x = torch.randn(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) + 2 * labels[:, None, None, None]
    return TensorDataset(x, labels)


def test_fit_trains_a_teacher_then_distils_a_student_of_unregistered_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train, val, test = _data(128, 0), _data(40, 1), _data(40, 2)
    teacher = Net(16)
    teacher_summary = distkd.fit(teacher, train, val, overrides=[*QUICK, f"out_dir={tmp_path}", "name=t"])
    assert teacher_summary["teacher_val"] is None
    student = Net(2)
    summary = distkd.fit(student, train, val, teacher=teacher, test_data=test, terms=[{"loss": "kd", "weight": 0.9,
                         "kwargs": {"tau": 4.0}}], overrides=[*QUICK, f"out_dir={tmp_path}", "name=s"])
    # the teacher's val accuracy as distkd measured it is the frozen teacher's, computed here by hand
    x, y = val.tensors
    with torch.no_grad():
        assert summary["teacher_val"]["top1"] == pytest.approx(100 * (teacher.eval()(x).argmax(1) == y).float().mean())
    best = torch.load(tmp_path / "s" / "checkpoints" / "best.pt", weights_only=True)
    assert set(best["model"]) == set(Net(2).state_dict())  # the student alone
    fresh = Net(2)
    fresh.load_state_dict(best["model"])
    with torch.no_grad():
        assert summary["best_val"] == pytest.approx(100 * (fresh.eval()(x).argmax(1) == y).float().mean())
        xt, yt = test.tensors
        assert summary["best_test"] == pytest.approx(100 * (fresh(xt).argmax(1) == yt).float().mean())
    records = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/ce", "train/kd"} <= set(records[-1])
    assert "student `python:Net`, teacher `python:Net`" in (tmp_path / "s" / "report.md").read_text()


def test_fit_refuses_terms_without_teacher_and_bad_terms_in_one_line(tmp_path: Path) -> None:
    data = _data(8, 0)
    with pytest.raises(ConfigError, match="terms need a teacher"):
        distkd.fit(Net(2), data, data, terms=[{"loss": "kd"}], overrides=[f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="a teacher is given but no terms use it"):
        distkd.fit(Net(2), data, data, teacher=Net(2), overrides=[f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"config: unknown key 'terms.0.los' \(did you mean 'loss'\?\)"):
        distkd.fit(Net(2), data, data, teacher=Net(2), terms=[{"los": "kd"}], overrides=[f"out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_the_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch) -> None:
    text = README.read_text()
    start = text.index("### Your own model and data, from Python")
    block = re.search(r"```python\n(.*?)```", text[start:], flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - our own README's example
    summary = json.loads((tmp_path / "runs" / "py" / "student" / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["teacher_val"]["top1"] > 0
    assert (tmp_path / "runs" / "py" / "teacher" / "checkpoints" / "best.pt").is_file()
