"""Feature taps: capture intermediate outputs by module path with forward hooks (no model edits)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.registry import nearest


class FeatureTaps:
    """Records the output of each named submodule of ``model`` on every forward pass.

    ``taps.outputs[path]`` holds the latest output of ``model.get_submodule(path)``.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], role: str) -> None:
        self.outputs: dict[str, Tensor] = {}
        names = [name for name, _ in model.named_modules() if name]
        for path in paths:
            if path not in names:
                raise ConfigError(
                    f"{role} has no module '{path}'{nearest(path, names)} to tap; "
                    f"use 'logits' or a module path such as {', '.join(names[:4])}"
                )
            model.get_submodule(path).register_forward_hook(self._recorder(path))

    def _recorder(self, path: str):  # noqa: ANN202 - hook signature is torch's
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.outputs[path] = output

        return hook
