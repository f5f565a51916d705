"""Detection tests run single-threaded on tiny scenes (a few dozen 64-96 px images)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


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
