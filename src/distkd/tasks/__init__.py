"""Tasks, found by name: each builds what the trainer needs (models, data, the task's step, metrics).

A task module provides ``DATASETS`` (a registry of ``reader(data_cfg, seed)``), ``load_dataset(data_cfg, seed)``,
``build_loaders(cfg, data, device)``, ``build(cfg, device) -> TrainSetup`` and ``evaluate(model, loader) -> dict``.
A new task is one module plus a :func:`register_task` line; the trainer does not change.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from distkd.errors import UnknownNameError
from distkd.registry import nearest

_TASKS: dict[str, str] = {
    "classification": "distkd.tasks.classification",
    "segmentation": "distkd.tasks.segmentation",
    "detection": "distkd.tasks.detection",
}


def register_task(name: str, module: str) -> None:
    """Make ``task: name`` run the task module importable as ``module`` (imported on first use)."""
    if name in _TASKS:
        raise ValueError(f"task '{name}' is registered twice")
    _TASKS[name] = module


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> ModuleType:
    """The module implementing task ``name``; an unknown name lists the known ones."""
    if name not in _TASKS:
        raise UnknownNameError(f"unknown task '{name}'{nearest(name, list(_TASKS))}; known: {', '.join(list_tasks())}")
    return importlib.import_module(_TASKS[name])
