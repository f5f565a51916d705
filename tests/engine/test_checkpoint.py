"""Checkpoint files: atomic writes (the target is always the old or the new file) and safe reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distkd.engine.checkpoint import load_state, save_atomic
from distkd.errors import CheckpointError


class Unpicklable:
    """Pickling this raises, after torch.save has already written part of the file."""

    def __reduce__(self) -> tuple:
        raise RuntimeError("cannot pickle this")


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    state = {"model": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "best": {"epoch": 2, "value": 50.0}}
    path = tmp_path / "deeper" / "last.pt"
    save_atomic(state, path)
    loaded = load_state(path)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["epoch"] == 3
    assert loaded["best"] == state["best"]
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]


def test_a_failed_write_leaves_the_old_file_intact_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"model": {"w": torch.ones(1000)}, "epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle this"):
        save_atomic({"model": {"w": torch.zeros(1000)}, "epoch": 2, "junk": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert load_state(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_a_failed_first_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        save_atomic({"model": {}, "epoch": 0, "junk": Unpicklable()}, tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []


def test_missing_unreadable_and_foreign_files_are_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*junk.pt") as err:
        load_state(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="is not a distkd training checkpoint"):
        load_state(tmp_path / "plain.pt")


def test_reading_executes_nothing(tmp_path: Path) -> None:
    torch.save({"model": {}, "epoch": 0, "obj": Path("x")}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_state(tmp_path / "code.pt")
