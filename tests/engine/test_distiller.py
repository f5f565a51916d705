"""The Distiller: a frozen teacher in eval mode, weighted loss terms, feature taps, dict outputs, re-normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.data.batch import Batch as DataBatch
from distkd.distill import Distiller, SingleInputStep, Term, logits_of
from distkd.distill.renormalize import Renormalize
from distkd.errors import ConfigError
from distkd.losses import build_loss
from distkd.models import create_model

Models = tuple[nn.Module, nn.Module]
Batch = tuple[Tensor, Tensor]


def cross_entropy(output: object, target: Tensor) -> dict[str, Tensor]:
    return {"ce": F.cross_entropy(logits_of(output), target)}


def ce_step(weight: float = 1.0, **kwargs: object) -> SingleInputStep:
    """The classification step: ``{"ce": weight * CE}``."""
    return SingleInputStep(lambda out, y: {"ce": weight * cross_entropy(out, y)["ce"]}, **kwargs)


@pytest.fixture
def batch() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)


@pytest.fixture
def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return create_model("small_cnn3_w2", num_classes=10), create_model("small_cnn3_w4", num_classes=10)


def test_teacher_stays_in_eval_mode_and_its_batchnorm_stats_do_not_move(pair: Models, batch: Batch) -> None:
    # torchdistill 1.1.5's example training loop calls model.train() on the whole wrapper, which leaves
    # the teacher in train mode: its BatchNorm running statistics then drift with every student batch.
    student, teacher = pair
    distiller = Distiller(student, teacher, [Term("kd", build_loss("kd", tau=4.0), 1.0)], ce_step())
    teacher.train()  # even a teacher handed over in train mode is frozen
    distiller.train()
    assert student.training and all(m.training for m in student.modules())
    assert not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    step = distiller(DataBatch(*batch))
    sum(step.losses.values()).backward()
    after = teacher.state_dict()
    assert any(k.endswith("running_mean") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    distiller.eval()
    assert not student.training and not teacher.training


def test_losses_hold_weighted_terms_and_parts_hold_unweighted_parts(pair: Models, batch: Batch) -> None:
    student, teacher = pair
    x, y = batch
    dist, kd = build_loss("dist", tau=4.0), build_loss("kd", tau=4.0)
    distiller = Distiller(student, teacher, [Term("dist", dist, 2.0), Term("kd", kd, 0.5)], ce_step(0.1)).train()
    step = distiller(DataBatch(x, y))
    assert set(step.losses) == {"ce", "dist", "kd"}
    assert set(step.parts) == {"dist/inter", "dist/intra", "kd/kl"}
    with torch.no_grad():
        t = teacher(x)
        s = step.output.detach()
        torch.testing.assert_close(step.losses["ce"], 0.1 * F.cross_entropy(s, y))
        dist_value, dist_parts = dist(s, t, return_parts=True)
        torch.testing.assert_close(step.losses["dist"], 2.0 * dist_value)
        torch.testing.assert_close(step.parts["dist/inter"], dist_parts["inter"])
        torch.testing.assert_close(step.parts["dist/intra"], dist_parts["intra"])
        torch.testing.assert_close(step.losses["kd"], 0.5 * kd(s, t))
    assert not step.parts["dist/inter"].requires_grad


def test_without_teacher_only_the_task_loss_is_returned(pair: Models, batch: Batch) -> None:
    student, _ = pair
    step = Distiller(student, step=ce_step(2.0))(DataBatch(*batch))
    assert set(step.losses) == {"ce"} and step.parts == {}
    torch.testing.assert_close(step.losses["ce"], 2.0 * F.cross_entropy(step.output, batch[1]))
    with pytest.raises(ValueError, match="need a teacher"):
        Distiller(student, None, [Term("kd", build_loss("kd"), 1.0)])


def test_feature_taps_feed_the_loss(batch: Batch) -> None:
    torch.manual_seed(2)
    student, teacher = create_model("small_cnn3_w2", 10), create_model("small_cnn3_w2", 10)
    dist = build_loss("dist", tau=2.0)
    distiller = Distiller(student, teacher, [Term("dist", dist, 3.0, "features.7", "features.7")]).train()
    step = distiller(DataBatch(*batch))
    with torch.no_grad():
        s, t = student.features[:8](batch[0]), teacher.features[:8](batch[0])  # (N, 4, 7, 7) after 2 pools
        torch.testing.assert_close(step.losses["dist"], 3.0 * dist(s, t))
    assert s.shape == (16, 4, 7, 7) and set(step.losses) == {"dist"}
    # the recorded outputs are released after the step, and evaluation passes record nothing
    assert distiller.student_taps.outputs["features.7"] == distiller.teacher_taps.outputs["features.7"] == []
    student(batch[0])
    assert distiller.student_taps.outputs["features.7"] == []


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_unknown_module_path_is_a_one_line_config_error_with_a_suggestion(pair: Models, side: str) -> None:
    student, teacher = pair
    keys = {"student_key": "featurs.7"} if side == "student" else {"teacher_key": "featurs.7"}
    with pytest.raises(ConfigError) as err:
        Distiller(student, teacher, [Term("dist", build_loss("dist"), 1.0, **keys)])
    message = str(err.value)
    assert f"the {side} has no module 'featurs.7' (did you mean 'features.7'?)" in message
    assert "\n" not in message


class TwoHeads(nn.Module):
    """A model with a dict output ``{"out": (N, 10), "aux": (N, 10)}``, as segmentation nets return."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head, self.aux_head = nn.Linear(8, 10), nn.Linear(8, 10)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.body(x).relu()
        return {"out": self.head(h), "aux": self.aux_head(h)}


def test_dict_outputs_select_out_for_logits_and_other_keys_by_name() -> None:
    torch.manual_seed(3)
    student, teacher = TwoHeads(), TwoHeads()
    x, y = torch.randn(8, 4), torch.randint(0, 10, (8,))
    kd = build_loss("kd", tau=2.0)
    terms = [Term("main", kd, 1.0), Term("aux", kd, 0.4, "aux", "aux"), Term("cross", kd, 1.0, "aux", "logits")]
    step = Distiller(student, teacher, terms, ce_step()).train()(DataBatch(x, y))
    with torch.no_grad():
        s, t = student(x), teacher(x)
        torch.testing.assert_close(step.losses["ce"], F.cross_entropy(s["out"], y))
        torch.testing.assert_close(step.losses["main"], kd(s["out"], t["out"]))
        torch.testing.assert_close(step.losses["aux"], 0.4 * kd(s["aux"], t["aux"]))
        torch.testing.assert_close(step.losses["cross"], kd(s["aux"], t["out"]))
    assert not torch.allclose(step.losses["main"], step.losses["cross"])


def test_teacher_input_maps_the_batch_before_the_teacher_sees_it(pair: Models, batch: Batch) -> None:
    student, teacher = pair
    seen: list[Tensor] = []
    teacher.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    kd = build_loss("kd")
    Distiller(student, teacher, [Term("kd", kd, 1.0)], ce_step(teacher_input=lambda x: 2 * x + 1))(DataBatch(*batch))
    assert torch.equal(seen[0], 2 * batch[0] + 1)


def test_renormalize_maps_student_normalised_input_to_teacher_normalised() -> None:
    mean_s, std_s = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    mean_t, std_t = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def norm(x: Tensor, mean: tuple, std: tuple) -> Tensor:
        return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)

    renorm = Renormalize(mean_s, std_s, mean_t, std_t)
    torch.testing.assert_close(renorm(norm(images, mean_s, std_s)), norm(images, mean_t, std_t),
                               rtol=0, atol=2e-6)
    same = Renormalize(mean_t, std_t, mean_t, std_t)
    x = norm(images, mean_t, std_t)
    assert torch.equal(same(x), x)
    assert renorm(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_the_teachers_evaluation_sees_the_inputs_its_training_calls_see(pair: Models, batch: Batch, tmp_path) -> None:
    # A teacher trained on other statistics is re-normalised in training; its val pass must be too.
    from distkd.config import RunConfig, TrainConfig
    from distkd.data.base import Split
    from distkd.data.loaders import TensorLoader
    from distkd.engine.trainer import Trainer, TrainSetup
    from distkd.tasks.classification import evaluate

    student, teacher = pair
    renorm = Renormalize((0.5,), (0.25,), (0.2,), (0.1,))
    distiller = Distiller(student, teacher, [Term("kd", build_loss("kd"), 1.0)], ce_step(teacher_input=renorm))
    x = batch[0]
    with torch.no_grad():
        torch.testing.assert_close(distiller.teacher_for_eval()(x), teacher(renorm(x)))
        torch.testing.assert_close(distiller.run_teacher(DataBatch(*batch)), teacher(renorm(x)))
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (32,), generator=gen))
    val = TensorLoader(split, batch_size=16, mean=(0.5,), std=(0.25,))
    cfg = RunConfig(train=TrainConfig(epochs=1, device="cpu", progress="none"))
    trainer = Trainer(cfg, TrainSetup(distiller, val, val, None, evaluate, "top1"), torch.device("cpu"), tmp_path)
    summary = trainer.fit()
    assert summary["teacher_val"] == evaluate(distiller.teacher_for_eval(), val)
    assert summary["teacher_val"] != evaluate(teacher, val)  # (the raw teacher scores otherwise)


def test_a_list_of_module_paths_gives_the_loss_lists_of_features(pair: Models, batch: Batch) -> None:
    student, teacher = pair
    seen: list[tuple[list, list]] = []

    class Several(nn.Module):
        def forward(self, s: list[Tensor], t: list[Tensor], *, return_parts: bool = False, **context: object):
            seen.append((s, t))
            loss = sum((a.mean() - b.mean()) ** 2 for a, b in zip(s, t, strict=True))
            return (loss, {}) if return_parts else loss

    paths = ["features.3", "features.7"]
    Distiller(student, teacher, [Term("several", Several(), 1.0, paths, paths)])(DataBatch(*batch))
    ((s, t),) = seen
    with torch.no_grad():
        expected = [student.features[:4](batch[0]), student.features[:8](batch[0])]
        teacher_expected = [teacher.features[:4](batch[0]), teacher.features[:8](batch[0])]
    assert [tuple(x.shape) for x in s] == [tuple(x.shape) for x in expected] == [(16, 2, 14, 14), (16, 4, 7, 7)]
    for got, want in zip([*s, *t], [*expected, *teacher_expected], strict=True):
        torch.testing.assert_close(got, want)


def test_a_term_config_takes_one_path_or_a_list_of_paths() -> None:
    from distkd.config import load_config

    cfg = load_config(None, ["loss.distill=[{loss: kd, student: [layer1, layer2], teacher: layer3}]"])
    assert cfg.loss.distill[0].student == ["layer1", "layer2"] and cfg.loss.distill[0].teacher == "layer3"
    with pytest.raises(ConfigError, match=r"loss.distill.0.student: expected a list, got dict"):
        load_config(None, ["loss.distill=[{loss: kd, student: {a: 1}}]"])


def test_a_models_ready_tap_names_resolve_to_module_paths(pair: Models, batch: Batch) -> None:
    student, teacher = pair[0], create_model("small_cnn3_w2", num_classes=10)
    student.distill_taps = {"stage2": "features.7"}
    teacher.distill_taps = {"stage2": "features.7"}
    kd = build_loss("kd")
    step = Distiller(student, teacher, [Term("kd", kd, 1.0, "stage2", "stage2", "pool")])(DataBatch(*batch))
    with torch.no_grad():
        expected = kd(student.features[:8](batch[0]).mean((2, 3)), teacher.features[:8](batch[0]).mean((2, 3)))
    torch.testing.assert_close(step.losses["kd"], expected)
    with pytest.raises(ConfigError, match="no module 'stage3' .did you mean 'stage2'.*ready names stage2"):
        Distiller(student, teacher, [Term("kd", kd, 1.0, "stage3", "stage2")])
