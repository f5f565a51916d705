"""Every engine test runs single-threaded (tiny tensors on a shared CPU)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Apply the shared ``one_thread`` fixture to each test in this folder."""
