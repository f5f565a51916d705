"""distkd: knowledge distillation from a stronger teacher (DIST, KD, DKD) in PyTorch.

Use a loss in your own loop::

    from distkd import DIST
    criterion = DIST(beta=2.0, gamma=2.0, tau=4.0)
    loss = ce + criterion(student_logits, teacher_logits)

or the whole engine: ``distkd train CONFIG`` / :func:`distkd.train`.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use, so `distkd --help` and config errors do not wait for torch.
_EXPORTS = {
    "DIST": "distkd.losses", "DKD": "distkd.losses", "KD": "distkd.losses", "build_loss": "distkd.losses",
    "list_losses": "distkd.losses", "create_model": "distkd.models", "list_models": "distkd.models",
    "Distiller": "distkd.distill", "Term": "distkd.distill", "DistkdError": "distkd.errors",
    "RunConfig": "distkd.config", "load_config": "distkd.config", "train": "distkd.api", "fit": "distkd.api",
    "evaluate_checkpoint": "distkd.api",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distkd' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
