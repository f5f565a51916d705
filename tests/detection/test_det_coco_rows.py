"""The paper's COCO distillation rows as bundled (`configs/coco/`): each builds its real torchvision detectors
(ResNeXt-101 64x4d FPN teacher, ResNet-50 FPN student) and terms, and takes one training step on a tiny COCO-format
set at 64 px — what `distkd reproduce coco` runs, minus the data and the schedule's length."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distkd.config import load_config, resolve_config_path
from distkd.models import create_model
from distkd.tasks import get_task

ROWS = ["kd_retinanet_x101-r50", "dist_retinanet_x101-r50", "dist+mimic_retinanet_x101-r50",
        "kd_fasterrcnn_x101-r50", "dist_fasterrcnn_x101-r50", "dist+mimic_fasterrcnn_x101-r50"]
TERMS = {"kd": {"kd"}, "dist": {"dist"}, "dist+mimic": {"dist", "mimic_fpn"}}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ROOT/imgs`` (4 images of 64 px, one box each, 2 categories) and ``ROOT/annotations/instances_imgs.json``."""
    root = tmp_path_factory.mktemp("coco")
    (root / "imgs").mkdir()
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [8, 8, 30, 30]})
    gt = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "annotations" / "instances_imgs.json").write_text(json.dumps(gt))
    return root


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """State dicts of the two bundled X101 teachers at their initial weights (a trained one is read the same way)."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for family in ("retinanet", "fasterrcnn"):
        teacher = load_config(resolve_config_path(f"coco/dist_{family}_x101-r50.yaml")).teacher
        torch.manual_seed(0)
        paths[family] = folder / f"{family}.pt"
        torch.save(create_model(teacher.name, num_classes=2, **teacher.kwargs).state_dict(), paths[family])
    return paths


@pytest.mark.parametrize("row", ROWS)
def test_each_coco_row_takes_a_training_step_with_its_real_detectors(row: str, coco_root: Path,
                                                                      teachers: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    family = row.split("_")[1]
    cfg = load_config(resolve_config_path(f"coco/{row}.yaml"), [
        f"data.root={coco_root}", "data.kwargs={train: imgs, val: imgs, test: null}", "data.batch_size=2",
        "data.num_workers=0", "model.kwargs.min_size=64", "model.kwargs.max_size=64",
        "model.kwargs.pretrained_backbone=false", f"teacher.checkpoint={teachers[family]}", f"out_dir={tmp_path}"])
    assert cfg.teacher.name.endswith("resnext101_64x4d_fpn") and cfg.model.name.endswith("resnet50_fpn")
    setup = get_task("detection").build(cfg, torch.device("cpu"))
    distiller = setup.distiller
    batch = next(iter(setup.train))
    distiller.probe(batch, dataset_size=setup.train.dataset_size)
    distiller.train()
    step = distiller(batch)
    terms = {term.name for term in distiller.terms}
    assert {name.removesuffix("_cls_logits") for name in terms} == TERMS[row.split("_")[0]]
    assert terms < set(step.losses) and all(torch.isfinite(v) for v in step.losses.values())
    sum(step.losses.values()).backward()
    assert all(p.grad is not None for p in distiller.student.parameters() if p.requires_grad)
    for _, params in distiller.term_parameters():  # the mimic adapters (1x1 conv per FPN level) learn too
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in distiller.teacher.parameters())
