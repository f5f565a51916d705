"""Session-wide test settings and the small training runs several test files share.

``HF_HUB_OFFLINE=1`` is set at import, before any test (or subprocess a test starts) could reach a hub:
nothing here may download. The shared runs use the smallest demo CNNs on the embedded silhouettes,
single-threaded (on a shared CPU, OpenMP threads that wait on each other make tiny ops far slower).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub, which reads it once

if TYPE_CHECKING:
    from distkd.config import RunConfig

# Settings that make a run small and quick; the bundled demo config supplies the rest.
FAST = ("train.threads=1", "train.amp=none", "train.progress=none", "model.name=small_cnn3_w2")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run a test with one torch thread; restore the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def demo_config(name: str, out_dir: Path, *overrides: str) -> RunConfig:
    """A bundled demo config (e.g. ``demo/student.yaml``) made small by FAST, writing under ``out_dir``."""
    from distkd.config import load_config, resolve_config_path

    return load_config(resolve_config_path(name), [*FAST, f"out_dir={out_dir}", *overrides])


def train_quietly(cfg: RunConfig, resume: bool = False) -> dict:
    """``distkd.api.train`` with the caller's torch thread count restored afterwards."""
    from distkd.api import train

    before = torch.get_num_threads()
    try:
        return train(cfg, resume=resume)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 2-epoch teacher (small_cnn3_w4) trained once per session: ``(run_dir, summary)``."""
    cfg = demo_config("demo/teacher.yaml", tmp_path_factory.mktemp("runs"), "model.name=small_cnn3_w4",
                      "train.epochs=2")
    return cfg.run_dir, train_quietly(cfg)


@pytest.fixture(scope="session")
def make_config() -> Callable[..., RunConfig]:
    """``make_config(name, out_dir, *overrides)``: see :func:`demo_config`."""
    return demo_config


@pytest.fixture(scope="session")
def fast_overrides() -> tuple[str, ...]:
    """The overrides that make a bundled demo config small and quick (what ``make_config`` applies)."""
    return FAST


@pytest.fixture(scope="session")
def run_train() -> Callable[..., dict]:
    """``run_train(cfg, resume=False)``: see :func:`train_quietly`."""
    return train_quietly
