"""Feature taps: capture intermediate outputs by module path with forward hooks (no model edits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from distkd.errors import ConfigError
from distkd.registry import nearest


class FeatureTaps:
    """Records the output of each named submodule of ``model`` on every call while :meth:`recording`.

    ``taps.outputs[path]`` lists the outputs of ``model.get_submodule(path)`` in call order: one entry for
    a module called once per forward, one per call for a shared one (e.g. a detection head run on every
    FPN level). Outside :meth:`recording` nothing is kept, so evaluation passes hold no extra memory.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], role: str) -> None:
        self.outputs: dict[str, list[Any]] = {}
        self._active = False
        names = [name for name, _ in model.named_modules() if name]
        for path in paths:
            if path not in names:
                raise ConfigError(
                    f"{role} has no module '{path}'{nearest(path, names)} to tap; "
                    f"use 'logits' or a module path such as {', '.join(names[:4])}"
                )
            self.outputs[path] = []
            model.get_submodule(path).register_forward_hook(self._recorder(path))

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list[Any]]]:
        """Record from empty lists for the duration of the block (one forward pass)."""
        for calls in self.outputs.values():
            calls.clear()
        self._active = True
        try:
            yield self.outputs
        finally:
            self._active = False

    def clear(self) -> None:
        """Drop the recorded outputs (and the graphs they hold)."""
        for calls in self.outputs.values():
            calls.clear()

    def _recorder(self, path: str):  # noqa: ANN202 - hook signature is torch's
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if self._active:
                self.outputs[path].append(output)

        return hook
