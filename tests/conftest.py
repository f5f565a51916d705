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


def write_image_folder(root: Path, classes: tuple[str, ...] = ("ant", "bee", "cat"), per_split: dict | None = None,
                       size: int = 40, seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.png``: RGB images tinted by class (a learnable signal) plus noise; ``per_split``
    maps split folder names to images per class (default train 8, val 3)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (per_split or {"train": 8, "val": 3}).items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            tint = np.zeros(3)
            tint[c % 3] = 120
            for i in range(count):
                pixels = np.clip(rng.normal(70, 40, size=(size, size + 6, 3)) + tint, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# a teacher on a generated image folder: 32-pixel inputs, the smallest demo CNN on RGB, one epoch, no workers
FOLDER_TRAIN = ("data.name=imagefolder", "data.image_size=32", "data.num_workers=0", "data.batch_size=6",
                "data.eval_batch_size=16", "model.kwargs.in_chans=3", "train.epochs=1")


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A one-epoch teacher on a generated 3-class image folder (no test/): ``(folder, run_dir, summary)``."""
    base = tmp_path_factory.mktemp("folder_run")
    folder = write_image_folder(base / "images")
    cfg = demo_config("demo/teacher.yaml", base / "runs", "model.name=small_cnn3_w4", f"data.root={folder}",
                      *FOLDER_TRAIN)
    return folder, cfg.run_dir, train_quietly(cfg)


@pytest.fixture(scope="session")
def image_folder() -> Callable[..., Path]:
    """``image_folder(root, classes=..., per_split=..., size=..., seed=...)``: see :func:`write_image_folder`."""
    return write_image_folder


@pytest.fixture(scope="session")
def folder_train() -> tuple[str, ...]:
    """The overrides that train on a generated image folder quickly (with ``data.root=`` added)."""
    return FOLDER_TRAIN
