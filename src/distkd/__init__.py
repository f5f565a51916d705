"""distkd: knowledge distillation from a stronger teacher (DIST, KD, DKD) in PyTorch.

Use a loss in your own loop::

    from distkd import DIST
    criterion = DIST(beta=2.0, gamma=2.0, tau=4.0)
    loss = ce + criterion(student_logits, teacher_logits)

or the whole engine: ``distkd train CONFIG`` / :func:`distkd.train`.
"""

from distkd.api import evaluate_checkpoint, train
from distkd.config import RunConfig, load_config
from distkd.distill import Distiller, Term
from distkd.errors import DistkdError
from distkd.losses import DIST, DKD, KD, build_loss, list_losses
from distkd.models import create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "DIST", "DKD", "KD", "Distiller", "DistkdError", "RunConfig", "Term", "build_loss", "create_model",
    "evaluate_checkpoint", "list_losses", "list_models", "load_config", "train",
]
