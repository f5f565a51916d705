"""What every loader yields: one batch of inputs and targets, with optional sample indices and cached outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class Batch:
    """One batch, already on the training device.

    ``inputs``: what the task feeds the model, e.g. images float (N, C, H, W), or a list of N images
    (C, H_i, W_i) for detection. ``target``: labels int64 (N,), soft targets float (N, K), dense labels
    (N, H, W), or a list of N per-image target dicts. ``index``: int64 (N,) positions of the samples in
    the training split (for terms with per-sample state, e.g. a memory bank); None where not tracked.
    ``teacher``: the teacher's output for ``inputs`` when it comes from a cache (then the teacher is not run).
    """

    inputs: Any
    target: Any
    index: Tensor | None = None
    teacher: Any = None

    def __len__(self) -> int:
        """The number of samples (images) in the batch."""
        return len(self.inputs)
