"""The detection step: teacher fed the student's transformed batch, per-level DIST checked in float64, the
teacher's box head on the student's RoIs, and one-line errors for detectors that cannot be compared."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from distkd.data.batch import Batch
from distkd.distill import Distiller, Term
from distkd.errors import ConfigError
from distkd.losses import build_loss
from distkd.models import create_model
from distkd.tasks.detection import DetectionStep, check_pair


def _batch(n: int = 3) -> Batch:
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 80 + 8 * i, generator=gen) for i in range(n)]
    targets = [{"boxes": torch.tensor([[5.0 + i, 8.0, 40.0, 50.0], [30.0, 20.0, 70.0, 60.0]]),
                "labels": torch.tensor([i % 4, 3])} for i in range(n)]
    return Batch(images, targets, torch.arange(n))


def _record(model: torch.nn.Module, path: str, inputs: bool = False) -> list:
    calls: list = []
    module = model.get_submodule(path)
    if inputs:
        module.register_forward_pre_hook(lambda m, args: calls.append(args[0].detach().clone()))
    else:
        module.register_forward_hook(lambda m, args, out: calls.append(out.detach().clone()))
    return calls


def _pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)


def _dist64(s: Tensor, t: Tensor, activation: str) -> Tensor:
    """DIST of logits (N, C, H, W) or (N, C), every position an instance, in float64 (beta = gamma = tau = 1)."""
    s, t = s.double(), t.double()
    if s.dim() == 4:
        s, t = (x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) for x in (s, t))
    ps, pt = (x.sigmoid() if activation == "sigmoid" else x.softmax(1) for x in (s, t))
    return (1 - _pearson(ps, pt, 1).mean()) + (1 - _pearson(ps, pt, 0).mean())


def _retinanet_pair(**teacher_kwargs: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    student = create_model("det_retinanet_tiny", num_classes=4, widths=[8, 16, 32], fpn_channels=16)
    teacher = create_model("det_retinanet_tiny", num_classes=4, **teacher_kwargs)
    return student, teacher


def test_retinanet_dist_is_the_sum_over_levels_of_sigmoid_dist_of_the_raw_head_conv() -> None:
    student, teacher = _retinanet_pair(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    path = student.distill_taps["cls_logits"]
    s_calls, t_calls = _record(student, path), _record(teacher, path)
    s_in, t_in = _record(student, "backbone", inputs=True), _record(teacher, "backbone", inputs=True)
    term = Term("dist", build_loss("dist", activation="sigmoid"), 1.0, "cls_logits", "cls_logits")
    distiller = Distiller(student, teacher, [term], DetectionStep().bind(student))
    batch = _batch()
    distiller.probe(batch)
    s_calls.clear(), t_calls.clear(), s_in.clear(), t_in.clear()
    out = distiller(batch)
    assert set(out.losses) == {"classification", "bbox_regression", "dist"}
    assert len(s_calls) == len(t_calls) == 4 and [c.shape[1] for c in s_calls] == [12] * 4
    expected = sum(_dist64(s, t, "sigmoid") for s, t in zip(s_calls, t_calls, strict=True))
    torch.testing.assert_close(out.losses["dist"].double(), expected, rtol=1e-5, atol=1e-6)
    # one transform: the teacher's input is the student's resized, padded batch, re-normalised to its statistics
    mean, std = torch.tensor(student.transform.image_mean), torch.tensor(student.transform.image_std)
    pixels = s_in[0] * std[:, None, None] + mean[:, None, None]
    torch.testing.assert_close(t_in[0], (pixels - 0.5) / 0.25)
    out.losses["dist"].backward()
    assert student.head.classification_head.cls_logits.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_faster_rcnn_teacher_scores_exactly_the_students_sampled_rois() -> None:
    torch.manual_seed(0)
    student = create_model("det_fasterrcnn_tiny", num_classes=4, widths=[8, 16, 32], fpn_channels=16)
    teacher = create_model("det_fasterrcnn_tiny", num_classes=4)
    s_boxes: list = []
    t_boxes: list = []
    student.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: s_boxes.append([b.clone() for b in a[1]]))
    teacher.roi_heads.box_roi_pool.register_forward_pre_hook(lambda m, a: t_boxes.append([b.clone() for b in a[1]]))
    teacher_rpn = []
    teacher.rpn.register_forward_hook(lambda m, a, o: teacher_rpn.append(1))
    s_logits, t_logits = _record(student, "roi_heads.box_predictor.cls_score"), _record(
        teacher, "roi_heads.box_predictor.cls_score")
    term = Term("dist", build_loss("dist"), 1.0)
    distiller = Distiller(student, teacher, [term], DetectionStep().bind(student))
    out = distiller(_batch())
    assert len(s_boxes) == len(t_boxes) == 1 and not teacher_rpn
    for a, b in zip(s_boxes[0], t_boxes[0], strict=True):
        assert torch.equal(a, b)
    assert sum(len(b) for b in s_boxes[0]) == s_logits[0].shape[0] == t_logits[0].shape[0] == 3 * 32
    assert s_logits[0].shape[1] == 5  # K + 1 with background
    torch.testing.assert_close(out.losses["dist"].double(), _dist64(s_logits[0], t_logits[0], "softmax"),
                               rtol=1e-5, atol=1e-6)
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(out.losses)


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"anchor_sizes": [[16], [24], [48], [64]]}, "anchor sizes"),
    ({"anchor_ratios": [1.0, 2.0]}, "anchor ratios"),
    ({"num_classes": 5}, "classes 5"),
])
def test_teacher_with_other_anchors_or_classes_is_a_one_line_error_naming_both(kwargs: dict, named: str) -> None:
    student = create_model("det_retinanet_tiny", num_classes=4)
    teacher = create_model("det_retinanet_tiny", **({"num_classes": 4} | kwargs))
    with pytest.raises(ConfigError) as err:
        check_pair(student, teacher)
    message = str(err.value)
    assert "\n" not in message and "student" in message and "teacher" in message and named in message


def test_other_fpn_levels_or_family_are_refused() -> None:
    student = create_model("det_retinanet_tiny", num_classes=4)
    deeper = create_model("tvdet_retinanet_resnet50_fpn", num_classes=4, min_size=64, max_size=64,
                          anchor_sizes=[[16], [32], [48], [64], [96]], anchor_ratios=[0.5, 1.0, 2.0])
    with pytest.raises(ConfigError, match=r"FPN strides \[8, 16, 32, 64\].*FPN strides \[8, 16, 32, 64, 128\]"):
        check_pair(student, deeper)
    with pytest.raises(ConfigError, match="family RetinaNet.*family FasterRCNN"):
        check_pair(student, create_model("det_fasterrcnn_tiny", num_classes=4))


def test_fpn_mimic_is_the_summed_level_mse_through_trainable_1x1_convs() -> None:
    student, teacher = _retinanet_pair()  # FPN widths 16 (student) and 32 (teacher)
    s_levels, t_levels = [], []
    student.backbone.fpn.register_forward_hook(lambda m, a, o: s_levels.append([v.detach() for v in o.values()]))
    teacher.backbone.fpn.register_forward_hook(lambda m, a, o: t_levels.append([v.detach() for v in o.values()]))
    term = Term("mimic", build_loss("mimic"), 1.0, "fpn", "fpn")
    distiller = Distiller(student, teacher, [term], DetectionStep().bind(student))
    batch = _batch()
    distiller.probe(batch)
    (_, params), = distiller.term_parameters()
    assert sum(p.numel() for p in params) == 4 * (16 * 32 + 32)  # one 1x1 conv 16 -> 32 per level
    s_levels.clear(), t_levels.clear()
    out = distiller(batch)
    convs = distiller.term_losses[0][0].adapters
    expected = sum(((torch.nn.functional.conv2d(s.double(), c.weight.double(), c.bias.double()) - t.double()) ** 2)
                   .mean() for c, s, t in zip(convs, s_levels[0], t_levels[0], strict=True))
    torch.testing.assert_close(out.losses["mimic"].double(), expected, rtol=1e-5, atol=1e-7)
    out.losses["mimic"].backward()
    assert all(p.grad is not None for p in params)
    assert student.backbone.fpn.layer_blocks[0][0].weight.grad.abs().sum() > 0


def test_sigmoid_kd_is_the_bernoulli_kl_of_every_anchor_class_channel() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 3, 4, generator=gen), torch.randn(2, 6, 3, 4, generator=gen)
    loss = build_loss("kd", activation="sigmoid", tau=2.0)(s, t)
    ps, pt = (s.double() / 2).sigmoid(), (t.double() / 2).sigmoid()
    kl = pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()
    torch.testing.assert_close(loss.double(), 4 * kl.sum(1).mean())
    with pytest.raises(ConfigError, match="activation"):
        build_loss("kd", activation="tanh")


def test_mask_padding_keeps_padded_positions_of_every_level_out_of_dist() -> None:
    student, teacher = _retinanet_pair()
    path = student.distill_taps["cls_logits"]
    s_calls, t_calls = _record(student, path), _record(teacher, path)
    term = Term("dist", build_loss("dist", activation="sigmoid"), 1.0, "cls_logits", "cls_logits")
    distiller = Distiller(student, teacher, [term], DetectionStep(mask_padding=True).bind(student))
    batch = _batch()  # widths 80, 88, 96 at height 96: padded to 96 x 96
    distiller.probe(batch)
    s_calls.clear(), t_calls.clear()
    out = distiller(batch)
    total = torch.zeros((), dtype=torch.float64)
    for s, t in zip(s_calls, t_calls, strict=True):
        h, w = s.shape[2:]
        ys, xs = torch.arange(h) * 96 // h, torch.arange(w) * 96 // w  # the pixel each position samples
        keep = torch.stack([(ys[:, None] < 96) & (xs[None, :] < width) for width in (80, 88, 96)])
        s64, t64 = (x.double().permute(0, 2, 3, 1)[keep] for x in (s, t))
        ps, pt = s64.sigmoid(), t64.sigmoid()
        total += (1 - _pearson(ps, pt, 1).mean()) + (1 - _pearson(ps, pt, 0).mean())
        assert not keep.all() or h <= 3  # the coarse levels' positions all sample inside every image
    torch.testing.assert_close(out.losses["dist"].double(), total, rtol=1e-5, atol=1e-6)
    plain = Distiller(student, teacher, [Term("dist", build_loss("dist", activation="sigmoid"), 1.0, "cls_logits",
                                              "cls_logits")], DetectionStep().bind(student))
    plain.probe(batch)
    unmasked = plain(batch).losses["dist"]
    assert not torch.isclose(unmasked, out.losses["dist"])


def test_fcos_students_train_with_their_losses_and_per_level_dist() -> None:
    torch.manual_seed(0)
    student = create_model("det_fcos_tiny", num_classes=4, widths=[8, 16, 32], fpn_channels=16)
    teacher = create_model("det_fcos_tiny", num_classes=4)
    check_pair(student, teacher)
    calls = _record(student, student.distill_taps["cls_logits"])
    term = Term("dist", build_loss("dist", activation="sigmoid"), 1.0, "cls_logits", "cls_logits")
    distiller = Distiller(student, teacher, [term], DetectionStep().bind(student))
    batch = _batch()
    distiller.probe(batch)
    calls.clear()
    out = distiller(batch)
    assert set(out.losses) == {"classification", "bbox_regression", "bbox_ctrness", "dist"}
    assert [c.shape[1] for c in calls] == [4] * 4 and all(torch.isfinite(v) for v in out.losses.values())
