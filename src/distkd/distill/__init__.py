"""Distillation wiring: the Distiller, its terms and feature taps."""

from distkd.distill.distiller import Distiller, StepOutput, Term, logits_of

__all__ = ["Distiller", "StepOutput", "Term", "logits_of"]
