"""DeiT's distillation-token loss against float64 re-computations of the authors' formulas, and the token
distillation of a timm distilled ViT through the Distiller and through `distkd.api.train` (demo/deit.yaml)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loss_inputs import logits, random_mask
from losses_reference import instances, softmax

import distkd.losses.deit  # noqa: F401 - registers "deit" (also when distkd.losses does not import it yet)
from distkd.config import load_config
from distkd.data.batch import Batch
from distkd.distill import Distiller, SingleInputStep, Term, logits_of
from distkd.errors import ConfigError
from distkd.losses import build_loss
from distkd.losses.deit import DeiT
from distkd.models import create_model

VIT = "timm_deit_tiny_distilled_patch16_224"
VIT_KWARGS = {"img_size": 28, "patch_size": 7, "in_chans": 1, "depth": 2, "embed_dim": 32, "num_heads": 2}


def hard_reference(student, teacher) -> float:
    """mean_i -log softmax(s_i)[argmax t_i]: DeiT's ``F.cross_entropy(outputs_kd, teacher.argmax(dim=1))``."""
    rows_s, rows_t = instances(student), instances(teacher)
    total = sum(-math.log(softmax(s, 1.0)[t.index(max(t))]) for s, t in zip(rows_s, rows_t, strict=True))
    return total / len(rows_s)


def soft_reference(student, teacher, tau) -> float:
    """tau^2 * sum_i KL(p_t,i || p_s,i) / (N * C): DeiT's ``kl_div(..., reduction='sum') * T * T / numel``."""
    rows_s, rows_t = instances(student), instances(teacher)
    total = 0.0
    for s, t in zip(rows_s, rows_t, strict=True):
        p_s, p_t = softmax(s, tau), softmax(t, tau)
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(p_s, p_t, strict=True))
    return tau**2 * total / (len(rows_s) * len(rows_s[0]))


@pytest.mark.parametrize("shape", [(6, 5), (8, 10), (3, 2)])
def test_hard_and_soft_match_the_published_formulas(shape):
    student, teacher = logits(shape, 0), logits(shape, 1)
    hard, parts = DeiT()(student, teacher, return_parts=True, target=torch.zeros(shape[0], dtype=torch.long))
    assert hard.item() == pytest.approx(hard_reference(student, teacher), rel=1e-10)
    agree = (student.argmax(1) == teacher.argmax(1)).double().mean().item()
    assert set(parts) == {"agree"} and parts["agree"].item() == pytest.approx(agree)
    for tau in (3.0, 1.0, 0.5):
        soft, parts = DeiT(kind="soft", tau=tau)(student, teacher, return_parts=True)
        assert soft.item() == pytest.approx(soft_reference(student, teacher, tau), rel=1e-10)
        kl = soft_reference(student, teacher, tau) * shape[1] / tau**2
        assert parts["kl"].item() == pytest.approx(kl, rel=1e-10)
        # the authors' own expression, in float64
        theirs = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                          reduction="sum", log_target=True) * (tau * tau) / student.numel()
        torch.testing.assert_close(soft, theirs, rtol=1e-12, atol=0)
    torch.testing.assert_close(hard, F.cross_entropy(student, teacher.argmax(dim=1)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_only_the_student_gets_a_gradient_and_half_precision_runs_in_float32(kind):
    student, teacher = logits((5, 7), 2).requires_grad_(), logits((5, 7), 3).requires_grad_()
    loss = DeiT(kind=kind)
    loss(student, teacher).backward()
    assert teacher.grad is None and torch.count_nonzero(student.grad) > 0
    fixed = teacher.detach()
    assert torch.autograd.gradcheck(lambda s: loss(s, fixed), (student.detach().requires_grad_(),))
    s16, t16 = logits((8, 6), 4, dtype=torch.bfloat16), logits((8, 6), 5, dtype=torch.bfloat16)
    value = loss(s16, t16)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(loss(s16.float(), t16.float()).item(), rel=1e-6)


def test_a_mask_keeps_only_its_instances():
    student, teacher = logits((9, 4), 6), logits((9, 4), 7)
    mask = random_mask((9, 4), 8)
    for kind in ("hard", "soft"):
        masked = DeiT(kind=kind)(student, teacher, mask=mask)
        assert masked.item() == pytest.approx(DeiT(kind=kind)(student[mask], teacher[mask]).item(), rel=1e-10)
    assert DeiT()(student, teacher, mask=torch.zeros(9, dtype=torch.bool)).item() == 0.0


def test_built_by_name_with_defaults_and_bad_arguments_are_one_line_config_errors():
    loss = build_loss("deit")
    assert (loss.kind, loss.tau) == ("hard", 3.0)
    assert build_loss("deit", kind="soft", tau=1.0).tau == 1.0
    for kwargs, match in [({"kind": "medium"}, "kind must be 'hard' or 'soft'"), ({"tau": 0}, "tau must be"),
                          ({"tau": "3"}, "tau must be"), ({"alpha": 0.5}, "no argument 'alpha'")]:
        with pytest.raises(ConfigError, match=match) as error:
            build_loss("deit", **kwargs)
        assert "\n" not in str(error.value)


def test_timm_distilled_vit_returns_the_average_of_both_heads_unless_set_to_distilled_training():
    """What the task's CE sees: timm's own behaviour, independent of distkd's adapter."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(VIT.removeprefix("timm_"), num_classes=10, **VIT_KWARGS)
    x = torch.randn(4, 1, 28, 28)
    model.train()
    tokens = model.forward_features(x)
    head, head_dist = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
    torch.testing.assert_close(model(x), (head + head_dist) / 2)
    model.set_distilled_training(True)
    out = model(x)
    assert isinstance(out, tuple) and torch.equal(out[0], head) and torch.equal(out[1], head_dist)
    model.eval()
    torch.testing.assert_close(model(x), (head + head_dist) / 2)


def test_a_distiller_step_distils_the_distillation_head_from_the_teacher_logits():
    torch.manual_seed(0)
    student = create_model(VIT, num_classes=10, **VIT_KWARGS)
    teacher = create_model("small_cnn6_w32", num_classes=10)

    def task_loss(output, target):
        return {"ce": 0.5 * F.cross_entropy(logits_of(output), target)}

    term = Term("deit", DeiT(), 0.5, student_key="head_dist", teacher_key="logits")
    distiller = Distiller(student, teacher, [term], SingleInputStep(task_loss)).train()
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 7, 9])
    distiller.probe(Batch(x, y))
    out = distiller(Batch(x, y))

    with torch.no_grad():
        dist_logits = student.head_dist(student.forward_features(x)[:, 1])
        expected = 0.5 * F.cross_entropy(dist_logits, teacher(x).argmax(1))
        ce = 0.5 * F.cross_entropy(student.head(student.forward_features(x)[:, 0]), y)  # the class head, as DeiT
    torch.testing.assert_close(out.losses["deit"], expected)
    torch.testing.assert_close(out.losses["ce"], ce)
    assert set(out.parts) == {"deit/agree"}

    out.losses["deit"].backward(retain_graph=True)  # the term trains the distillation head and token, not the class
    assert torch.count_nonzero(student.head_dist.weight.grad) > 0 and torch.count_nonzero(student.dist_token.grad)
    assert student.head.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)
    out.losses["ce"].backward()  # the task's CE trains the class head only (distkd's adapter)
    assert student.head_dist.weight.grad is None and torch.count_nonzero(student.head.weight.grad) > 0
    student.eval()
    with torch.no_grad():
        tokens = student.forward_features(x)
        torch.testing.assert_close(student(x), (student.head(tokens[:, 0]) + student.head_dist(tokens[:, 1])) / 2)


def test_the_demo_config_trains_and_writes_a_checkpoint(tmp_path: Path, run_train):
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(create_model("small_cnn6_w32", num_classes=10).state_dict(), teacher)
    cfg = load_config("demo/deit.yaml", [f"teacher.checkpoint={teacher}", "train.max_steps=2", "train.threads=1",
                                         "train.progress=none", f"out_dir={tmp_path}"])
    assert (cfg.loss.ce_weight, cfg.loss.distill[0].weight, cfg.loss.distill[0].kwargs) == (0.5, 0.5, {"kind": "hard"})
    summary = run_train(cfg)
    assert summary["steps"] == 2
    last = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)
    create_model(VIT, num_classes=10, **VIT_KWARGS).load_state_dict(last["model"], strict=True)
    record = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"train/deit_head_dist":' in record and '"train/ce":' in record
