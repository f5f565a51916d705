"""``timm_<name>`` and ``tv_<name>`` models, and the input normalisation a model expects.

Pretrained weights (``pretrained=True``) come from the timm / torchvision hubs and need network
access; offline, a one-line ``CheckpointError`` suggests ``weights: PATH`` (a local file loaded
strictly by :func:`distkd.models.create_model`). When ``num_classes`` differs from the pretrained
head: timm loads every weight except the classifier, which it re-initialises; for torchvision we load
the full pretrained model and then replace its final ``nn.Linear`` by a freshly initialised one with
``num_classes`` outputs (a model whose head is not a Linear, e.g. SqueezeNet, is refused).

ResNet-family models (timm's and torchvision's ``ResNet`` classes: resnet*, resnext*, wide_resnet*, ...) offer
ready tap names (``distill_taps``): ``stage1..4`` (``layer1..4``) and ``penultimate`` (the global pool: timm's
``global_pool`` gives ``(N, C)``, torchvision's ``avgpool`` ``(N, C, 1, 1)``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from distkd.errors import CheckpointError, ConfigError, UnknownNameError
from distkd.registry import nearest

TIMM_PREFIX = "timm_"
TV_PREFIX = "tv_"
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def create_timm(name: str, num_classes: int, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, num_classes=..., pretrained=..., **kwargs)`` with distkd's errors.

    ``name`` may carry a pretrained tag (``resnet18.a1_in1k``).
    """
    import timm

    if not timm.is_model(name):
        raise UnknownNameError(
            f"unknown timm model '{name}'{nearest(name, timm.list_models())}; timm.list_models() lists them"
        )
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ConfigError(f"timm model '{name}' does not accept these arguments: {err}") from err
    except Exception as err:  # hub errors differ by version (OSError, httpx/requests errors, RuntimeError)
        if pretrained:
            raise _offline_error(f"{TIMM_PREFIX}{name}", err) from err
        raise
    if isinstance(model, timm.models.resnet.ResNet):
        _offer_resnet_taps(model, "global_pool")
    if isinstance(model, timm.models.deit.VisionTransformerDistilled):
        model.set_distilled_training(True)
        model.register_forward_hook(_class_head_in_training)
    return model


def _class_head_in_training(module: nn.Module, args: tuple, output: Any) -> Any:
    """A distilled timm ViT (DeiT) in training returns (class head, distillation head): keep the class head's logits
    for the task's loss (a ``deit`` term reads the distillation head by tapping ``head_dist``). In eval its output
    is the average of the two heads, DeiT's combined prediction, and passes unchanged."""
    return output[0] if isinstance(output, tuple) else output


def create_torchvision(name: str, num_classes: int, *, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=..., num_classes=...)`` with distkd's errors.

    With ``pretrained=True`` the default (best) weights are used; see the module docstring for heads.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownNameError(
            f"unknown torchvision model '{name}'{nearest(name, known)}; torchvision.models.list_models() lists them"
        )
    if not pretrained:
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except TypeError as err:
            raise ConfigError(f"torchvision model '{name}' does not accept these arguments: {err}") from err
        if isinstance(model, torchvision.models.ResNet):
            _offer_resnet_taps(model, "avgpool")
        return model
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except TypeError as err:
        raise ConfigError(f"torchvision model '{name}' does not accept these arguments: {err}") from err
    except Exception as err:  # urllib/hub errors when offline
        raise _offline_error(f"{TV_PREFIX}{name}", err) from err
    pretrained_classes = len(weights.meta["categories"])
    if num_classes != pretrained_classes:
        _replace_head(model, name, pretrained_classes, num_classes)
    if isinstance(model, torchvision.models.ResNet):
        _offer_resnet_taps(model, "avgpool")
    return model


def _offer_resnet_taps(model: nn.Module, pool: str) -> None:
    """Give a timm/torchvision ``ResNet`` its ready tap names: ``layer1..4`` and its global pool ``pool``."""
    model.distill_taps = {f"stage{k}": f"layer{k}" for k in (1, 2, 3, 4)} | {"penultimate": pool}


def input_stats(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` per channel the model expects its input normalised with, or ``None`` if unknown.

    timm models: their ``pretrained_cfg``; torchvision models: the ImageNet statistics; distkd's own
    models: ``None`` (they take whatever normalisation their data pipeline applies).
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and "mean" in cfg and "std" in cfg:
        return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
    if type(model).__module__.startswith("torchvision.models"):
        return IMAGENET_MEAN, IMAGENET_STD
    return None


def _replace_head(model: nn.Module, name: str, old_classes: int, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` with ``old_classes`` outputs for a new one with ``num_classes``."""
    heads = [path for path, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == old_classes]
    if not heads:
        raise ConfigError(
            f"torchvision model '{name}' has no Linear classifier to resize to {num_classes} classes; "
            f"use num_classes={old_classes} with pretrained=True, or pretrained=False"
        )
    parent_path, _, child = heads[-1].rpartition(".")
    parent = model.get_submodule(parent_path)
    old: nn.Linear = getattr(parent, child)
    setattr(parent, child, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))


def _offline_error(full_name: str, err: Exception) -> CheckpointError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return CheckpointError(
        f"cannot fetch the pretrained weights of '{full_name}' (offline? {type(err).__name__}: {first}); "
        "download them elsewhere and pass weights: PATH to load a local file instead"
    )
