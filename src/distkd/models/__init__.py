"""Model registry: every teacher and student is created by name.

Names: ``small_*`` (demo nets for small images), ``cifar_*`` (the CIFAR-100 benchmark zoo, with the
module names and state_dict keys of the CRD/RepDistiller definitions), ``mobilenetv1`` (ImageNet
MobileNet-V1), ``seg_*``/``tvseg_*`` (segmentation nets), ``timm_<name>`` (any timm model) and
``tv_<name>`` (any torchvision classification model).
"""

from __future__ import annotations

import os

from torch import nn

from distkd.errors import ConfigError
from distkd.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")


def create_model(
    name: str, num_classes: int, *, weights: str | os.PathLike[str] | None = None, **kwargs: object
) -> nn.Module:
    """Create the model called ``name`` with a ``num_classes``-way output.

    ``weights``: a local checkpoint loaded strictly (see :func:`distkd.models.weights.load_weights`).
    ``kwargs`` go to the model's constructor; ``timm_*``/``tv_*`` also take ``pretrained: bool`` (hub
    weights, needs network access). The model remembers its name as ``model.distkd_name``.
    """
    from distkd.models import adapters
    from distkd.models.weights import load_weights

    if weights is not None and kwargs.get("pretrained"):
        raise ConfigError(f"model '{name}': give either pretrained=True or weights=PATH, not both")
    _register_all()
    if name.startswith(adapters.TIMM_PREFIX):
        model = adapters.create_timm(name.removeprefix(adapters.TIMM_PREFIX), num_classes, **kwargs)
    elif name.startswith(adapters.TV_PREFIX):
        model = adapters.create_torchvision(name.removeprefix(adapters.TV_PREFIX), num_classes, **kwargs)
    else:
        factory = MODELS.get(name)
        try:
            model = factory(num_classes=num_classes, **kwargs)
        except TypeError as err:
            raise ConfigError(f"model '{name}' does not accept these arguments: {err}") from err
    model.distkd_name = name
    if weights is not None:
        load_weights(model, weights, strict=True)
    return model


def list_models() -> list[str]:
    """All registered names; ``timm_<name>`` and ``tv_<name>`` are accepted besides these."""
    _register_all()
    return MODELS.names()


def _register_all() -> None:
    """Import the model families so their ``@MODELS.register`` decorators run (idempotent)."""
    from distkd.models import cifar, detection, mobilenet_v1, segmentation, small  # noqa: F401
