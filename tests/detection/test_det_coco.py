"""The COCO-format reader, the detection loader and COCO mAP on a small generated dataset with image files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from distkd.data.coco import DetectionLoader, coco_split
from distkd.errors import DataError
from distkd.metrics.detection import coco_map
from distkd.tasks.detection import evaluate

SIZES = [(40, 60), (50, 50), (30, 70), (64, 48)]  # (height, width)


def _write(root: Path, annotations: list[dict] | None = None) -> Path:
    (root / "imgs").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"{i}.png", "width": w, "height": h})
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 6, 20, 10], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 10, "category_id": 3, "bbox": [50, 30, 30, 30], "iscrowd": 0, "area": 900},  # clipped
            {"id": 3, "image_id": 11, "category_id": 11, "bbox": [10, 10, 0, 5], "iscrowd": 0, "area": 0},  # no width
            {"id": 4, "image_id": 11, "category_id": 11, "bbox": [8, 9, 20, 30], "iscrowd": 0, "area": 600},
            {"id": 5, "image_id": 11, "category_id": 3, "bbox": [0, 0, 50, 50], "iscrowd": 1, "area": 2500},
            {"id": 6, "image_id": 13, "category_id": 3, "bbox": [70, 5, 10, 10], "iscrowd": 0, "area": 100},  # outside
            {"id": 7, "image_id": 13, "category_id": 7, "bbox": [1, 2, 30, 40], "iscrowd": 0, "area": 1200},
        ]
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": 11, "name": "c"}, {"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    (root / "annotations" / "instances_imgs.json").write_text(json.dumps(gt))
    return root


def test_reader_maps_categories_clips_boxes_and_drops_degenerate_ones_with_a_count(tmp_path: Path) -> None:
    data = coco_split(_write(tmp_path), "imgs")
    assert data.category_ids == [3, 7, 11] and data.class_names == ["a", "b", "c"] and len(data) == 4
    assert data.dropped_boxes == 2  # the zero-width box and the one outside its image; the crowd box is skipped
    image, target, index = data[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 60) and index == 0
    assert torch.equal(target["boxes"], torch.tensor([[5.0, 6.0, 25.0, 16.0], [50.0, 30.0, 60.0, 40.0]]))
    assert target["labels"].tolist() == [1, 0]
    assert data[1][1]["labels"].tolist() == [2]
    assert data[2][1]["boxes"].shape == (0, 4) and data[2][1]["labels"].dtype == torch.int64  # no objects
    assert data[3][1]["boxes"].tolist() == [[1.0, 2.0, 31.0, 42.0]]


def test_bad_annotation_files_are_one_line_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        coco_split(tmp_path, "imgs")
    root = _write(tmp_path / "a", [{"id": 1, "image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1]}])
    with pytest.raises(DataError, match="unknown image"):
        coco_split(root, "imgs")
    (root / "annotations" / "instances_imgs.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid json"):
        coco_split(root, "imgs")


def _first(kind: str, change: dict) -> Callable[[dict], None]:
    return lambda gt: gt[kind][0].update(change)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda gt: gt["annotations"][0].pop("image_id"), "annotations[0] lacks image_id"),
    (lambda gt: gt["annotations"][0].pop("bbox"), "annotations[0] lacks bbox"),
    (lambda gt: gt["images"][0].pop("file_name"), "images[0] lacks file_name"),
    (lambda gt: gt["categories"][0].pop("name"), "categories[0] lacks name"),
    (lambda gt: gt["annotations"].append(5), "annotations[7] is not an object"),
    (_first("annotations", {"bbox": [1, 2, 3]}), "has bbox [1, 2, 3]; expected [x, y, width, height]"),
    (_first("annotations", {"bbox": ["a", 2, 3, 4]}), "has bbox ['a', 2, 3, 4]"),
    (_first("annotations", {"bbox": [float("nan"), 2, 3, 4]}), "4 finite numbers"),
    (_first("images", {"id": "10"}), "images[0].id is '10'; COCO ids are integers"),
    (_first("annotations", {"category_id": 3.0}), "annotations[0].category_id is 3.0"),
    (_first("images", {"width": "60"}), "image 10 has width '60'; expected a positive number"),
    (lambda gt: gt["images"].append(dict(gt["images"][0])), "images id 10 is listed more than once"),
    (lambda gt: gt["categories"].append({"id": 3, "name": "d"}), "categories id 3 is listed more than once"),
])
def test_malformed_entries_are_one_line_data_errors_naming_the_entry(tmp_path: Path, mutate, message: str) -> None:  # noqa: ANN001
    root = _write(tmp_path)
    path = root / "annotations" / "instances_imgs.json"
    gt = json.loads(path.read_text())
    mutate(gt)
    path.write_text(json.dumps(gt))
    with pytest.raises(DataError) as caught:
        coco_split(root, "imgs")
    assert message in str(caught.value) and "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_annotations_without_area_or_iscrowd_are_completed_from_their_boxes(tmp_path: Path) -> None:
    data = coco_split(_write(tmp_path, [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 6, 20, 10]},
        {"id": 2, "image_id": 11, "category_id": 11, "bbox": [8, 9, 20, 30]},
        {"id": 3, "image_id": 13, "category_id": 3, "bbox": [1, 2, 30, 40], "area": 5000},  # as given
    ]), "imgs")
    assert [(a["area"], a["iscrowd"]) for a in data.gt["annotations"]] == [(200.0, 0), (600.0, 0), (5000, 0)]
    loader = DetectionLoader(data, batch_size=3, shuffle=False, drop_last=False, seed=0)
    result = evaluate(Oracle(data, 0), loader)
    # COCO's size ranges read the areas: two small objects (< 32^2) and one medium (the given 5,000)
    assert result["map"] == result["map_small"] == result["map_medium"] == pytest.approx(100.0)
    assert "map_large" not in result


def test_loader_flips_boxes_with_their_image_reproducibly_and_resumes_mid_epoch(tmp_path: Path) -> None:
    data = coco_split(_write(tmp_path), "imgs")
    loader = DetectionLoader(data, batch_size=2, shuffle=True, drop_last=False, seed=3, flip=True)
    loader.set_epoch(1)
    first = list(loader)
    loader.set_epoch(1)
    again = list(loader)
    loader.set_epoch(1, start=1)
    resumed = list(loader)
    assert len(first) == 2 and [len(b) for b in first] == [2, 2]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.index, b.index) and all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs, strict=True))
    assert torch.equal(resumed[0].index, first[1].index)
    flipped = 0
    for batch in first:
        for image, target, i in zip(batch.inputs, batch.target, batch.index.tolist(), strict=True):
            raw, raw_target, _ = data[i]
            assert image.dtype == torch.float32 and image.max() <= 1.0
            if torch.equal(image, raw.float() / 255):
                assert torch.equal(target["boxes"], raw_target["boxes"])
            else:
                flipped += 1
                assert torch.equal(image, raw.flip(-1).float() / 255)
                w = raw.shape[-1]
                expected = torch.stack([w - raw_target["boxes"][:, 2], raw_target["boxes"][:, 1],
                                        w - raw_target["boxes"][:, 0], raw_target["boxes"][:, 3]], 1)
                assert torch.equal(target["boxes"], expected)
    assert 0 < flipped < 4


def test_map_of_one_box_at_iou_0_62_counts_3_of_10_thresholds(tmp_path: Path) -> None:
    gt = {"images": [{"id": 1, "width": 50, "height": 50}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100,
                           "iscrowd": 0}],
          "categories": [{"id": 1, "name": "x"}]}
    found = coco_map(gt, [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 6.2], "score": 0.9}], [1])
    assert found["map"] == pytest.approx(30.0) and found["map50"] == pytest.approx(100.0) and found["map75"] == 0.0
    assert "map_large" not in found  # no large ground-truth objects: COCO's -1 is left out
    assert coco_map(gt, [], [1])["map"] == 0.0


class Oracle(nn.Module):
    """Predicts each image's ground truth (labels shifted by ``label_offset``), whatever the image."""

    def __init__(self, data, offset: int) -> None:  # noqa: ANN001
        super().__init__()
        self.by_size = {tuple(data[i][0].shape[-2:]): data.targets[i] for i in range(len(data))}
        self.label_offset = offset

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for image in images:
            t = self.by_size[tuple(image.shape[-2:])]
            out.append({"boxes": t["boxes"], "labels": t["labels"] + self.label_offset,
                        "scores": torch.ones(len(t["labels"]))})
        return out


@pytest.mark.parametrize("offset", [0, 1])
def test_evaluating_perfect_detections_gives_100_map_for_both_label_conventions(tmp_path: Path, offset: int) -> None:
    data = coco_split(_write(tmp_path, [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [5, 6, 20, 10], "iscrowd": 0, "area": 200},
        {"id": 2, "image_id": 11, "category_id": 11, "bbox": [8, 9, 20, 30], "iscrowd": 0, "area": 600},
        {"id": 3, "image_id": 13, "category_id": 3, "bbox": [1, 2, 30, 40], "iscrowd": 0, "area": 1200},
    ]), "imgs")
    loader = DetectionLoader(data, batch_size=3, shuffle=False, drop_last=False, seed=0)
    assert evaluate(Oracle(data, offset), loader)["map"] == pytest.approx(100.0)


def test_the_coco_dataset_reports_dropped_boxes_in_one_line(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from distkd.config import DataConfig
    from distkd.tasks.detection import load_dataset

    cfg = DataConfig(name="coco", root=str(_write(tmp_path)), kwargs={"train": "imgs", "val": "imgs", "test": None})
    data = load_dataset(cfg, seed=0)
    assert data.num_classes == 3 and data.test is None
    assert "dropped boxes with no area inside their image: 2 in train, 2 in val" in capsys.readouterr().err


def test_unset_num_workers_gives_the_default_worker_count(tmp_path: Path) -> None:
    from distkd.config import DataConfig, RunConfig
    from distkd.tasks.common import data_workers
    from distkd.tasks.detection import build_loaders, load_dataset

    data = DataConfig(name="coco", root=str(_write(tmp_path)), kwargs={"train": "imgs", "val": "imgs"},
                      batch_size=2, eval_batch_size=2)
    assert data.num_workers is None
    train, val, test = build_loaders(RunConfig(task="detection", data=data), load_dataset(data, 0), torch.device("cpu"))
    assert train.num_workers == val.num_workers == data_workers(data) >= 1 and test is None
    assert [len(b) for b in val] == [2, 2]
