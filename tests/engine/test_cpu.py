"""glibc malloc tuning: applied from inside the process unless the user chose their own settings."""

from __future__ import annotations

import pytest

from distkd.engine.cpu import tune_malloc


def test_tune_malloc_applies_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "DISTKD_NO_MALLOC_TUNING"):
        monkeypatch.delenv(key, raising=False)
    assert tune_malloc() is True


@pytest.mark.parametrize(
    ("key", "value"),
    [("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "0"), ("LD_PRELOAD", "libjemalloc.so"),
     ("DISTKD_NO_MALLOC_TUNING", "1")],
)
def test_the_users_choice_wins(monkeypatch: pytest.MonkeyPatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    assert tune_malloc() is False
