"""Feature taps: capture intermediate outputs by module path with forward hooks (no model edits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from torch import nn

from distkd.errors import ConfigError
from distkd.registry import nearest


def tap_names(model: nn.Module) -> dict[str, str]:
    """The ready names a model offers for its features (e.g. ``stage3`` -> ``layer3``), from its ``distill_taps``
    mapping of name -> module path (empty for models without one)."""
    names = getattr(model, "distill_taps", None)
    return dict(names) if isinstance(names, dict) else {}


def preact_batchnorm(model: nn.Module, key: str) -> nn.Module | None:
    """The BatchNorm a model declares (``distill_preact_bn``: ready name or module path -> BatchNorm path) as the one
    whose affine parameters model tap ``key``'s pre-ReLU value; None when it declares none for ``key``."""
    declared = getattr(model, "distill_preact_bn", None)
    if not isinstance(declared, dict):
        return None
    by_path = {tap_names(model).get(name, name): bn for name, bn in declared.items()}
    path = declared.get(key) or by_path.get(key)
    return model.get_submodule(path) if path else None


class FeatureTaps:
    """Records the output of each named submodule of ``model`` on every call while :meth:`recording`.

    ``paths`` are module paths or the model's ready names (:func:`tap_names`). ``taps.outputs[path]`` lists
    the outputs of that module in call order: one entry for a module called once per forward, one per call for
    a shared one (e.g. a detection head run on every FPN level). Outside :meth:`recording` nothing is kept, so
    evaluation passes hold no extra memory.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], role: str) -> None:
        self.outputs: dict[str, list[Any]] = {}
        self._active = False
        aliases = tap_names(model)
        names = [name for name, _ in model.named_modules() if name]
        for path in paths:
            module_path = aliases.get(path, path)
            if module_path not in names:
                ready = f"its ready names {', '.join(aliases)}, or " if aliases else ""
                raise ConfigError(
                    f"{role} has no module '{path}'{nearest(path, [*aliases, *names])} to tap; "
                    f"use 'logits', {ready}a module path such as {', '.join(names[:4])}"
                )
            self.outputs[path] = []
            model.get_submodule(module_path).register_forward_hook(self._recorder(path))

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
