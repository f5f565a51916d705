"""Model registry: every teacher and student is created by name.

Names: ``small_*`` (demo nets for small images), ``cifar_*`` (the CIFAR-100 benchmark zoo, with the
module names and state_dict keys of the CRD/RepDistiller definitions), ``timm_<name>`` (any timm
model) and ``tv_<name>`` (any torchvision classification model).
"""

from __future__ import annotations

from torch import nn

from distkd.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def create_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Create the model registered as ``name`` with a ``num_classes``-way output.

    ``kwargs`` go to the model's constructor (e.g. ``in_chans``, ``width``, ``pretrained``).
    """
    _register_all()
    return MODELS.build(name, num_classes=num_classes, **kwargs)


def list_models() -> list[str]:
    """All registered names; ``timm_<name>`` and ``tv_<name>`` are accepted besides these."""
    _register_all()
    return MODELS.names()


def _register_all() -> None:
    """Import the model families so their ``@MODELS.register`` decorators run (idempotent)."""
    from distkd.models import small  # noqa: F401
