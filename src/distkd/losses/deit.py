"""DeiT: distillation through a distillation token (Touvron et al., ICML 2021, "Training data-efficient image
transformers & distillation through attention").

A DeiT student carries a second token beside the class token; its own linear head (timm's ``head_dist``) is
trained to match the teacher while the class-token head (``head``) is trained on the labels. This loss is the
distillation half, computed as the authors' ``DistillationLoss`` (facebookresearch/deit, ``losses.py``) does on
the distillation head's logits ``z_s`` and the teacher's logits ``z_t``:

- ``kind="hard"`` (the paper's best): ``CE(z_s, argmax z_t)``, the mean over instances of the cross-entropy
  against the teacher's top-1 class (ties go to the lowest class index, as ``torch.argmax``).
- ``kind="soft"``: ``tau**2 * sum KL(softmax(z_t / tau) || softmax(z_s / tau)) / numel(z_s)``. The reference
  divides the summed KL by the number of logits ``N * C`` (PyTorch's legacy ``size_average``), not by ``N``, so
  this is ``1 / C`` of :class:`~distkd.losses.kd.KD` at the same ``tau``. The paper's soft setting is
  ``tau = 3`` with ``lambda = 0.1``; the authors' ``main.py`` defaults to ``--distillation-tau 1.0``.

The loss is unweighted. DeiT's ``(1 - alpha) * CE(class head, y) + alpha * distillation`` (``alpha = 0.5``,
``--distillation-alpha``) is two config weights: ``loss.ce_weight: 0.5`` and the term's ``weight: 0.5``.

With timm's distilled ViTs (``timm_deit_*_distilled_*``) the term reads the distillation head through a forward
hook, ``{loss: deit, weight: 0.5, student: head_dist, teacher: logits}``: the tapped ``nn.Linear``'s output is
exactly the distillation head's logits (``head_drop`` comes before it). The task's CE reads what the model
returns in training mode: distkd's ``timm_`` adapter makes a distilled ViT return the class head's logits there
(as DeiT trains it), and in eval timm's average of the two heads (DeiT's "class + distillation" inference).

Logits may also be dense ``(N, C, d1, ..., dk)`` (one instance per position, with an optional ``mask``); the
soft kind then divides by ``C`` times the number of kept instances, which is ``numel`` without a mask.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distkd.errors import ConfigError
from distkd.losses import LOSSES
from distkd.losses._inputs import as_instances, check_positive, instance_mask, masked_mean, zero_masked

KINDS = ("hard", "soft")


@LOSSES.register("deit")
class DeiT(nn.Module):
    """DeiT's distillation-token loss: ``CE(z_s, argmax z_t)`` (hard) or ``tau**2 * KL / C`` (soft).

    ``student`` is the *distillation head's* logits, ``teacher`` the teacher's. fp16/bf16 inputs are computed in
    fp32; the teacher is detached (the hard target carries no gradient in any case).

    Args:
        kind: ``"hard"`` (default, the paper's best) or ``"soft"``.
        tau: the soft kind's temperature (> 0; the paper's 3.0); the hard kind does not use it.
    """

    def __init__(self, kind: str = "hard", tau: float = 3.0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ConfigError(f"deit: kind must be 'hard' or 'soft', got {kind!r}; set e.g. kind: hard")
        self.kind = kind
        self.tau = check_positive("tau", tau)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}" + (f", tau={self.tau}" if self.kind == "soft" else "")

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        return_parts: bool = False,
        mask: Tensor | None = None,
        **context: object,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """The DeiT distillation loss (a scalar).

        Args:
            student: the distillation head's logits ``(N, C)`` (or dense ``(N, C, d1, ..., dk)``).
            teacher: the teacher's logits, same shape (no gradient reaches it).
            return_parts: also return, detached, ``{"agree": fraction of instances whose student top-1 is the
                teacher's}`` and, for the soft kind, ``"kl"`` (the mean per-instance KL, without ``tau**2 / C``).
            mask: bool ``(N, d1, ..., dk)`` (``(N,)`` for 2-D logits); False positions take no part. A mask
                keeping nothing gives 0.
            context: other keys (``target``, ``epoch``, ...) are ignored.
        """
        z_s, z_t = as_instances(student, teacher)
        keep = instance_mask(mask, student.shape)
        z_s, z_t = zero_masked(z_s, keep), zero_masked(z_t, keep)
        weights = None if keep is None else keep.to(z_s.dtype)
        teacher_class = z_t.argmax(1, keepdim=True)  # (N, 1, S)
        parts: dict[str, Tensor] = {}
        if self.kind == "hard":
            nll = -z_s.log_softmax(1).gather(1, teacher_class)
            loss = masked_mean(nll, weights)
        else:
            log_p_s = (z_s / self.tau).log_softmax(1)
            log_p_t = (z_t / self.tau).log_softmax(1)
            divergence = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1, keepdim=True)
            kl = masked_mean(divergence, weights)
            loss = self.tau**2 * kl / z_s.shape[1]
            parts["kl"] = kl.detach()
        if not return_parts:
            return loss
        agree = (z_s.detach().argmax(1, keepdim=True) == teacher_class).to(z_s.dtype)
        return loss, {"agree": masked_mean(agree, weights), **parts}
