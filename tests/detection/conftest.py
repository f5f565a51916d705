"""Detection tests run single-threaded on tiny scenes (a few dozen 64-96 px images)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from distkd.config import RunConfig


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def scenes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for small silhouette-scene datasets (``data.kwargs.folder``; the ``scenes`` dataset writes them)."""
    return tmp_path_factory.mktemp("det_scenes")


class Killed(Exception):
    """Raised by the patched optimizer step: the process "dies" there."""


@pytest.fixture
def kill_and_resume(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[dict, dict, int]]:
    """``kill_and_resume(straight, killed, at_step=5)``: trains ``straight`` through; trains ``killed`` (the same run
    in another folder) until its optimizer step ``at_step`` raises, then resumes it. Returns the two runs' final
    ``last.pt`` student weights and the batch (within its epoch) the killed run's checkpoint stopped at."""
    from distkd.api import train
    from distkd.engine.checkpoint import load_state
    from distkd.engine.trainer import Trainer

    def run(straight: RunConfig, killed: RunConfig, at_step: int = 5) -> tuple[dict, dict, int]:
        train(straight)
        step = Trainer._optimizer_step

        def dies(self: Trainer):  # noqa: ANN202
            if self.step == at_step:
                raise Killed
            return step(self)

        monkeypatch.setattr(Trainer, "_optimizer_step", dies)
        with pytest.raises(Killed):
            train(killed)
        batch = load_state(killed.run_dir / "checkpoints" / "last.pt")["batch"]
        monkeypatch.setattr(Trainer, "_optimizer_step", step)
        train(killed, resume=True)
        weights = [load_state(cfg.run_dir / "checkpoints" / "last.pt")["model"] for cfg in (straight, killed)]
        return weights[0], weights[1], batch

    return run
