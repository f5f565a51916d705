"""Run these tests single-threaded: their tensors are tiny, and on a shared CPU OpenMP threads that
busy-wait for each other make every small op 100x slower than one thread does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
