"""The CIFAR-100 benchmark zoo of CRD/RepDistiller (also used by DKD and DIST), registered as ``cifar_*``.

Every model maps ``(N, 3, 32, 32) -> (N, num_classes)`` logits and keeps the reference module names,
so released teacher checkpoints load with ``strict=True`` and hooks can tap e.g. ``layer3``/``block3``.
"""

from distkd.models.cifar import mobilenetv2, resnet, resnetv2, shufflenetv1, shufflenetv2, vgg, wrn

__all__ = ["mobilenetv2", "resnet", "resnetv2", "shufflenetv1", "shufflenetv2", "vgg", "wrn"]
