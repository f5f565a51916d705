"""Tasks: each builds what the trainer needs (models, data, task loss, metrics) from a config.

A task module provides ``load_dataset(data_cfg, seed)``, ``build_loaders(cfg, data, device)``,
``build(cfg, device) -> TrainSetup`` and ``evaluate(model, loader) -> dict``.
"""

from __future__ import annotations

from types import ModuleType


def get_task(name: str) -> ModuleType:
    """The module implementing task ``name`` (``classification`` or ``segmentation``)."""
    if name == "segmentation":
        from distkd.tasks import segmentation

        return segmentation
    from distkd.tasks import classification

    return classification
