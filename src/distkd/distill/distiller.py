"""The Distiller: one student step's outputs and losses, with a frozen teacher and distillation terms.

How the models are called is the task's business (a :class:`TaskStep`); what is compared, how it is
weighted and what state the terms own is the Distiller's. The trainer sees only :class:`StepOutput`.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from distkd.data.batch import Batch
from distkd.distill.taps import FeatureTaps, preact_batchnorm
from distkd.distill.transforms import get_transform
from distkd.errors import ConfigError, ShapeError

LOGITS = "logits"
TaskLoss = Callable[[Any, Any], dict[str, Tensor]]
ContextFn = Callable[[Any, Any], dict[str, Any]]


@dataclass
class Term:
    """``weight * sum_l loss_l(student[student_key][l], teacher[teacher_key][l], **context)``, logged as ``name``.

    ``student_key``/``teacher_key``: ``logits`` (the model output, or its ``"out"`` entry), another entry of a
    dict output (e.g. ``aux``), or a module path tapped by a forward hook. A module called L times in one
    forward (a head shared across FPN levels) gives L pairs; each pair gets its own copy of ``loss`` (its own
    adapter, if the loss has one) and the L values are summed. A *list* of keys gives one pair of lists (the
    outputs of every listed path, in order) for losses that take several features at once (e.g. ReviewKD).
    ``transform`` names a :mod:`distkd.distill.transforms` entry applied to both sides first.
    ``lr``/``weight_decay``: the optimizer settings of the loss's own parameters (None: the student's).
    ``objective``: ``loss`` (the method's criterion) or ``pretrain``: a loss with a pre-training criterion (a
    ``set_objective(name)`` method, e.g. FT's paraphraser reconstruction) computes that instead; for the others
    the criterion is their pre-training objective too. A term of weight 0 is not computed.
    """

    name: str
    loss: nn.Module
    weight: float
    student_key: str | list[str] = LOGITS
    teacher_key: str | list[str] = LOGITS
    transform: str = "none"
    lr: float | None = None
    weight_decay: float | None = None
    objective: str = "loss"


OBJECTIVES = ("loss", "pretrain")


@dataclass
class StepOutput:
    """What one forward returns: the student's output, the weighted losses the trainer sums (task parts
    and terms, by name), and unweighted parts for logging only (e.g. ``dist/inter``)."""

    output: Any
    losses: dict[str, Tensor]
    parts: dict[str, Tensor] = field(default_factory=dict)


class TaskStep(Protocol):
    """How a task calls its student and teacher in a training step, and what its task losses are."""

    def student(self, model: nn.Module, batch: Batch) -> tuple[Any, dict[str, Tensor]]:
        """The student's output in training mode and its named, weighted task losses."""
        ...

    def teacher(self, model: nn.Module, batch: Batch, student_output: Any) -> Any:
        """The teacher's output for the same batch (called without gradient, in eval mode)."""
        ...

    def context(self, batch: Batch, student_output: Any) -> dict[str, Any]:
        """Keyword arguments the terms receive (``target``, ``mask``, ...)."""
        ...


class SingleInputStep(nn.Module):
    """The step of models called as ``model(batch.inputs)`` (classification, segmentation).

    ``task_loss(output, batch.target)`` returns the named, weighted task losses (e.g. ``{"ce": ...}``; None: no
    task loss). ``teacher_input`` maps the
    student's input batch to the teacher's (e.g. :class:`~distkd.distill.renormalize.Renormalize`), in training
    and in the teacher's evaluation alike (:meth:`teacher_for_eval`). ``context_fn(output, target)`` adds term
    context (e.g. a segmentation mask).
    """

    def __init__(
        self,
        task_loss: TaskLoss | None = None,
        teacher_input: Callable[[Tensor], Tensor] | None = None,
        context_fn: ContextFn | None = None,
    ) -> None:
        super().__init__()
        self.task_loss = task_loss
        self.teacher_input = teacher_input
        self.context_fn = context_fn

    def student(self, model: nn.Module, batch: Batch) -> tuple[Any, dict[str, Tensor]]:
        output = model(batch.inputs)
        return output, self.task_loss(output, batch.target) if self.task_loss is not None else {}

    def teacher(self, model: nn.Module, batch: Batch, student_output: Any) -> Any:
        x = batch.inputs
        return model(self.teacher_input(x) if self.teacher_input is not None else x)

    def context(self, batch: Batch, student_output: Any) -> dict[str, Any]:
        extra = self.context_fn(student_output, batch.target) if self.context_fn is not None else {}
        return {"target": batch.target, **extra}

    def teacher_for_eval(self, model: nn.Module) -> nn.Module:
        """The teacher as it sees the student's inputs (re-normalised when configured)."""
        return model if self.teacher_input is None else MappedInput(model, self.teacher_input)


class MappedInput(nn.Module):
    """``model(fn(x))``: a model behind an input mapping such as re-normalisation."""

    def __init__(self, model: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x: Tensor) -> Any:
        return self.model(self.fn(x))


class Distiller(nn.Module):
    """Wraps a student, an optional teacher, distillation terms and the task's step.

    ``forward(batch, epoch)`` runs the student through ``step`` (and the teacher, frozen, in eval mode, without
    gradient) and returns a :class:`StepOutput` whose ``losses`` are the step's task losses plus one weighted
    entry per term. Terms may own trainable state (adapters, projection heads, memory buffers): call
    :meth:`probe` once on a real batch before training so they can size it; :meth:`term_parameters` and
    :meth:`term_state_dict` are what the engine trains and saves besides the student.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        terms: Sequence[Term] = (),
        step: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if terms and teacher is None:
            raise ValueError("distillation terms need a teacher")
        self.student = student
        self.teacher = teacher
        self.terms = list(terms)
        for term in self.terms:
            get_transform(term.transform)  # an unknown name fails here, listing the known ones
            if term.objective not in OBJECTIVES:
                raise ValueError(f"term '{term.name}': objective must be one of {OBJECTIVES}, got {term.objective!r}")
            if hasattr(term.loss, "set_objective"):
                term.loss.set_objective(term.objective)
        # one ModuleList per term: one loss per call of what it compares (sized by probe)
        self.term_losses = nn.ModuleList(nn.ModuleList([t.loss]) for t in self.terms)
        self.step = step if step is not None else SingleInputStep()
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.student_taps = FeatureTaps(student, self._tapped("student_key"), "the student")
        self.teacher_taps = FeatureTaps(teacher, self._tapped("teacher_key"), "the teacher") if teacher else None

    def _tapped(self, attr: str) -> list[str]:
        keys = {k for t in self.terms for k in _as_list(getattr(t, attr))}
        return sorted(keys - {LOGITS, "out", "aux"})

    def train(self, mode: bool = True) -> Distiller:
        """Switch the student (and losses) to ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    @torch.no_grad()
    def run_teacher(self, batch: Batch, student_output: Any = None) -> Any:
        """The teacher's output for ``batch`` (through the step: e.g. re-normalised inputs)."""
        return self.step.teacher(self.teacher, batch, student_output)

    def teacher_for_eval(self) -> nn.Module | None:
        """The teacher as evaluation should call it, on the student's inputs (None without a teacher)."""
        if self.teacher is None:
            return None
        return self.step.teacher_for_eval(self.teacher) if hasattr(self.step, "teacher_for_eval") else self.teacher

    # ------------------------------------------------------------------ trainable term state

    def term_parameters(self) -> list[tuple[Term, list[nn.Parameter]]]:
        """Each term with the trainable parameters its losses own (terms without any are left out)."""
        found = []
        for term, losses in zip(self.terms, self.term_losses, strict=True):
            params = [p for p in losses.parameters() if p.requires_grad]
            if params:
                found.append((term, params))
        return found

    def term_state_dict(self) -> dict[str, Tensor]:
        """The terms' own parameters and buffers (never part of the student's weights)."""
        return self.term_losses.state_dict()

    def load_term_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.term_losses.load_state_dict(state)

    @torch.no_grad()
    def probe(self, batch: Batch, **facts: Any) -> None:
        """Size the terms on one real batch, without side effects on the models or the random state.

        Runs the step in training mode (BatchNorm statistics and RNG states are restored afterwards), gives
        each term one loss per call of what it compares, and lets every loss with a ``probe(student, teacher,
        **context)`` method build its state from the tensors it will see. ``facts`` join the context (e.g.
        ``dataset_size``, what a memory bank indexed by ``Batch.index`` needs). When the teacher declares the
        BatchNorm before each of a term's tapped pre-ReLU features (``distill_preact_bn``), the term's context
        also holds ``teacher_bn``: that module, or a list for a list of keys (OFD's margins read it).
        """
        if not self.terms:
            return
        was_training = self.training
        with _preserved(self.student):
            self.train()
            try:
                output, _, teacher_output, context = self._forward_models(batch)
                context |= facts
                for i, term in enumerate(self.terms):
                    pairs = self._pairs(term, output, teacher_output)
                    prototype = self.term_losses[i][0]
                    losses = [prototype] + [copy.deepcopy(prototype) for _ in pairs[1:]]
                    term_context = context | self._teacher_batchnorms(term)
                    for loss, (s, t) in zip(losses, pairs, strict=True):
                        if hasattr(loss, "probe"):
                            loss.probe(s, t, **term_context)
                    self.term_losses[i] = nn.ModuleList(losses)
            finally:
                self._clear_taps()
                self.train(was_training)

    def _teacher_batchnorms(self, term: Term) -> dict[str, Any]:
        """``{"teacher_bn": ...}`` when the teacher declares the BatchNorm of every key the term taps, else {}."""
        keys = _as_list(term.teacher_key)
        bns = [preact_batchnorm(self.teacher, key) for key in keys] if self.teacher is not None else [None]
        if any(bn is None for bn in bns):
            return {}
        return {"teacher_bn": bns if isinstance(term.teacher_key, list) else bns[0]}

    # ------------------------------------------------------------------ the step

    def forward(self, batch: Batch, epoch: int = 1) -> StepOutput:
        """The student's output and losses for ``batch``; ``epoch`` is the 1-based epoch in progress, passed to
        the losses (DKD's warm-up counts from 1, as mdistiller). ``batch.teacher``, when set, is the teacher's
        output from a cache (the teacher is not run)."""
        try:
            output, losses, teacher_output, context = self._forward_models(batch)
            context["epoch"] = epoch
            parts: dict[str, Tensor] = {}
            for term, term_losses in zip(self.terms, self.term_losses, strict=True):
                if term.weight == 0:  # e.g. AB after its pre-training stage (RepDistiller's loss_kd = 0)
                    continue
                pairs = self._pairs(term, output, teacher_output)
                if len(pairs) != len(term_losses):
                    raise ShapeError(f"term '{term.name}' compares {len(pairs)} call(s) now but "
                                     f"{len(term_losses)} when probed; the model's calls must not vary by batch")
                total: Tensor | float = 0.0
                term_parts: dict[str, Tensor] = {}
                for loss, (s, t) in zip(term_losses, pairs, strict=True):
                    value, value_parts = loss(s, t, return_parts=True, **_fitted_mask(context, s))
                    total = total + value
                    for key, part in value_parts.items():
                        term_parts[key] = term_parts.get(key, 0.0) + part.detach()
                losses[term.name] = term.weight * total
                parts.update({f"{term.name}/{k}": v for k, v in term_parts.items()})
            return StepOutput(output, losses, parts)
        finally:
            self._clear_taps()

    def _forward_models(self, batch: Batch) -> tuple[Any, dict[str, Tensor], Any, dict[str, Any]]:
        """Student (with its task losses), then the teacher unless cached or not needed, then the term context."""
        with self.student_taps.recording():
            output, task_losses = self.step.student(self.student, batch)
        if not self.terms:
            return output, dict(task_losses), None, {}
        teacher_output = batch.teacher
        if teacher_output is None:
            with self.teacher_taps.recording():
                teacher_output = self.run_teacher(batch, output)
        context = self.step.context(batch, output)
        if batch.index is not None:
            context["index"] = batch.index
        return output, dict(task_losses), teacher_output, context

    def _pairs(self, term: Term, output: Any, teacher_output: Any) -> list[tuple[Tensor, Tensor]]:
        transform = get_transform(term.transform)
        if isinstance(term.student_key, list) or isinstance(term.teacher_key, list):
            s = [x for key in _as_list(term.student_key) for x in _select(output, self.student_taps, key, "student")]
            t = [x for key in _as_list(term.teacher_key)
                 for x in _select(teacher_output, self.teacher_taps, key, "teacher")]
            return [([transform(x) for x in s], [transform(x) for x in t])]
        s = _select(output, self.student_taps, term.student_key, "student")
        t = _select(teacher_output, self.teacher_taps, term.teacher_key, "teacher")
        if len(s) != len(t):
            raise ShapeError(f"term '{term.name}': the student's '{term.student_key}' was called {len(s)} time(s), "
                             f"the teacher's '{term.teacher_key}' {len(t)}; compare modules called equally often")
        return [(transform(a), transform(b)) for a, b in zip(s, t, strict=True)]

    def _clear_taps(self) -> None:
        self.student_taps.clear()
        if self.teacher_taps is not None:
            self.teacher_taps.clear()


def _select(output: Any, taps: FeatureTaps | None, key: str, role: str) -> list[Tensor]:
    """What a term compares, one entry per call: the logits, an entry of a dict output, or a tapped module."""
    if key == LOGITS:
        return [logits_of(output)]
    if isinstance(output, dict) and key in output:  # a list holds one entry per call (a cached per-level output)
        return list(output[key]) if isinstance(output[key], list) else [output[key]]
    if taps is None or key not in taps.outputs:
        entries = f"has the entries {', '.join(output)}" if isinstance(output, dict) else "is one tensor"
        raise ConfigError(f"the {role}'s output {entries}, not '{key}'; use {role}: logits or a module path")
    calls = taps.outputs[key]
    if not calls:
        raise ConfigError(f"the {role}'s module '{key}' was not called in the forward pass; tap a module it runs")
    return list(calls)


def _fitted_mask(context: dict[str, Any], x: Any) -> dict[str, Any]:
    """``context`` with its dense ``mask`` bool (N, H, W) resampled (nearest) to the spatial size of the compared
    map x (N, C, h, w) when they differ, e.g. one image-level mask for every FPN level; else ``context``."""
    mask = context.get("mask")
    if (not isinstance(mask, Tensor) or not isinstance(x, Tensor) or mask.dim() < 2 or x.dim() != mask.dim() + 1
            or mask.shape[1:] == x.shape[2:]):
        return context
    resized = torch.nn.functional.interpolate(mask[:, None].float(), size=x.shape[2:], mode="nearest")[:, 0]
    return context | {"mask": resized > 0.5}


def _as_list(key: str | list[str]) -> list[str]:
    return key if isinstance(key, list) else [key]


def logits_of(output: Any) -> Tensor:
    """The main prediction of a model output (a tensor, or the ``"out"`` entry of a dict)."""
    return output["out"] if isinstance(output, dict) else output


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s buffers (BatchNorm statistics) and every global RNG state after the block."""
    buffers = [b.clone() for b in model.buffers()]
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        for buffer, saved in zip(model.buffers(), buffers, strict=True):
            buffer.copy_(saved)
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
