"""The Distiller: one student step's outputs and losses, with a frozen teacher."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distkd.distill.taps import FeatureTaps
from distkd.errors import ConfigError

LOGITS = "logits"
TaskLoss = Callable[[Any, Tensor], Tensor]
ContextFn = Callable[[Any, Tensor], dict[str, Any]]


@dataclass
class Term:
    """``weight * loss(student[student_key], teacher[teacher_key], **context)``, logged as ``name``."""

    name: str
    loss: nn.Module
    weight: float
    student_key: str = LOGITS
    teacher_key: str = LOGITS


@dataclass
class StepOutput:
    """What one forward returns: the student's output, the weighted losses the trainer sums,
    and unweighted parts for logging only (e.g. ``dist/inter``)."""

    output: Any
    losses: dict[str, Tensor]
    parts: dict[str, Tensor] = field(default_factory=dict)


class Distiller(nn.Module):
    """Wraps a student, an optional teacher and distillation terms.

    ``forward(x, target, epoch)`` runs the student (and the teacher, frozen, in eval mode, without
    gradient), and returns a :class:`StepOutput` with ``losses = {"ce": w * task_loss, term.name: ...}``.
    A term compares ``logits`` (the model output, or its ``"out"`` entry for dict outputs), another key of a
    dict output (e.g. ``aux``), or a module path tapped by a forward hook.
    ``teacher_input`` maps the student's input batch to the teacher's (e.g. re-normalisation).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: Sequence[Term] = (),
        task_loss: TaskLoss | None = None,
        task_weight: float = 1.0,
        teacher_input: Callable[[Tensor], Tensor] | None = None,
        context_fn: ContextFn | None = None,
    ) -> None:
        super().__init__()
        if terms and teacher is None:
            raise ValueError("distillation terms need a teacher")
        self.student = student
        self.teacher = teacher
        self.terms = list(terms)
        self.term_modules = nn.ModuleList(t.loss for t in self.terms)
        self.task_loss = task_loss
        self.task_weight = task_weight
        self.teacher_input = teacher_input
        self.context_fn = context_fn
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.student_taps = FeatureTaps(student, self._tapped("student_key"), "the student")
        self.teacher_taps = FeatureTaps(teacher, self._tapped("teacher_key"), "the teacher") if teacher else None

    def _tapped(self, attr: str) -> list[str]:
        return sorted({getattr(t, attr) for t in self.terms} - {LOGITS, "out", "aux"})

    @torch.no_grad()
    def run_teacher(self, x: Tensor) -> Any:
        """The teacher's output for the student's input batch ``x`` (re-normalised when configured)."""
        return self.teacher(self.teacher_input(x) if self.teacher_input else x)

    def train(self, mode: bool = True) -> Distiller:
        """Switch the student (and losses) to ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: Tensor, target: Tensor, epoch: int = 1, teacher_output: Tensor | None = None) -> StepOutput:
        """x: the student's input batch (N, ...); target: labels (N,) / (N, K) soft / (N, H, W) dense;
        epoch: the 1-based epoch in progress, passed to the losses (DKD's warm-up counts from 1, as mdistiller).

        ``teacher_output``: the teacher's logits for ``x`` when they come from a cache (the teacher is not run).
        """
        output = self.student(x)
        losses: dict[str, Tensor] = {}
        if self.task_loss is not None and self.task_weight > 0:
            losses["ce"] = self.task_weight * self.task_loss(output, target)
        parts: dict[str, Tensor] = {}
        if self.teacher is not None and self.terms:
            if teacher_output is None:
                teacher_output = self.run_teacher(x)
            context = {"target": target, "epoch": epoch}
            if self.context_fn is not None:
                context.update(self.context_fn(output, target))
            for term in self.terms:
                s = _select(output, self.student_taps.outputs, term.student_key, "student")
                t = _select(teacher_output, self.teacher_taps.outputs, term.teacher_key, "teacher")
                value, term_parts = term.loss(s, t, return_parts=True, **context)
                losses[term.name] = term.weight * value
                parts.update({f"{term.name}/{k}": v.detach() for k, v in term_parts.items()})
        return StepOutput(output, losses, parts)


def _select(output: Any, tapped: dict[str, Tensor], key: str, role: str) -> Tensor:
    """What a term compares: the logits, an entry of a dict output, or a tapped module's output."""
    if key == LOGITS:
        return logits_of(output)
    if isinstance(output, dict) and key in output:
        return output[key]
    if key not in tapped:
        entries = f"has the entries {', '.join(output)}" if isinstance(output, dict) else "is one tensor"
        raise ConfigError(f"the {role}'s output {entries}, not '{key}'; use {role}: logits or a module path")
    return tapped[key]


def logits_of(output: Any) -> Tensor:
    """The main prediction of a model output (a tensor, or the ``"out"`` entry of a dict)."""
    return output["out"] if isinstance(output, dict) else output
