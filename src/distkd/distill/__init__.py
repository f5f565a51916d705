"""Distillation wiring: the Distiller, its terms, the task step protocol and feature taps."""

from distkd.distill.distiller import Distiller, SingleInputStep, StepOutput, TaskStep, Term, logits_of

__all__ = ["Distiller", "SingleInputStep", "StepOutput", "TaskStep", "Term", "logits_of"]
