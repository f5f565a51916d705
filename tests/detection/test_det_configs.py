"""The bundled detection configs: the paper's COCO rows as the authors ran them, demo pairs that can be compared."""

from __future__ import annotations

import pytest

from distkd.config import bundled_configs, load_config, resolve_config_path
from distkd.models import create_model
from distkd.tasks.detection import check_pair

COCO = [c for c in bundled_configs() if c.startswith("coco/")]
DEMO_DISTILL = [c for c in bundled_configs() if c.startswith("demo/det_") and c.split("_")[-1].split(".")[0] in
                ("dist", "kd", "mimic")]


def test_coco_rows_are_all_there() -> None:
    assert sorted(COCO) == sorted(f"coco/{n}.yaml" for n in (
        "teacher_retinanet_x101", "student_retinanet_r50", "kd_retinanet_x101-r50", "dist_retinanet_x101-r50",
        "dist+mimic_retinanet_x101-r50", "teacher_fasterrcnn_x101", "student_fasterrcnn_r50",
        "kd_fasterrcnn_x101-r50", "dist_fasterrcnn_x101-r50", "dist+mimic_fasterrcnn_x101-r50"))


@pytest.mark.parametrize("name", COCO)
def test_coco_configs_use_the_2x_schedule_and_the_authors_terms(name: str) -> None:
    cfg = load_config(resolve_config_path(name))
    assert cfg.task == "detection" and cfg.data.name == "coco" and cfg.data.batch_size == 16 and cfg.data.flip
    assert cfg.train.epochs == 24 and cfg.schedule.milestones == [16, 22] and cfg.schedule.name == "multistep"
    assert cfg.optim.lr == (0.01 if "retinanet" in name else 0.02)
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.schedule.warmup_epochs * 117_266 / 16 == pytest.approx(500, abs=1)
    assert "resnext101_64x4d" in (cfg.teacher or cfg.model).name or name.startswith("coco/student_")
    for term in cfg.loss.distill:
        if term.loss == "dist":
            assert term.kwargs == {"beta": 1.0, "gamma": 1.0, "tau": 1.0} | (
                {"activation": "sigmoid"} if "retinanet" in name else {})
            assert term.weight == 1.0
            assert term.student == ("cls_logits" if "retinanet" in name else "logits")


@pytest.mark.parametrize("name", DEMO_DISTILL)
def test_demo_students_and_teachers_can_be_compared(name: str) -> None:
    cfg = load_config(resolve_config_path(name))
    assert cfg.teacher is not None and cfg.loss.distill
    check_pair(create_model(cfg.model.name, num_classes=10, **cfg.model.kwargs),
               create_model(cfg.teacher.name, num_classes=10, **cfg.teacher.kwargs))


def test_reproduce_coco_trains_each_teacher_once_and_reports_map_beside_the_published_table(tmp_path) -> None:  # noqa: ANN001
    from distkd.published import published
    from distkd.reproduce import RowResult, get_table, plan, render

    table = get_table("coco")
    steps = plan(table, None, 1, tmp_path, ("data.root=/coco",))
    assert [run.config for role, run in steps if role == "teacher"] == ["coco/teacher_retinanet_x101.yaml",
                                                                        "coco/teacher_fasterrcnn_x101.yaml"]
    assert len(steps) == 2 + 8
    for _, run in steps:  # every row's config loads with its overrides
        load_config(resolve_config_path(run.config), list(run.overrides))
    assert published("coco", "dist-retinanet_x101-r50").accuracy == 39.8
    assert published("coco", "dist+mimic-fasterrcnn_x101-r50").accuracy == 41.8
    text = render(table, [RowResult("dist-retinanet_x101-r50", [39.0], 40.5)], 1)
    assert "COCO box mAP (%)" in text
    assert "| dist-retinanet_x101-r50 | 40.50 | 41.00 | 37.40 | 39.00 ± 0.00 | 39.80 | -0.80 |" in text
