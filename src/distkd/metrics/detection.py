"""COCO box mAP (AP@[.5:.95], AP50, AP75, AP small/medium/large) with ``faster-coco-eval`` or pycocotools.

``faster-coco-eval`` (the ``detection`` extra) is used when installed, else pycocotools; neither: a one-line
error saying what to install. Both read the ground truth as a COCO json dict (no file needed).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence
from typing import Any

from distkd.errors import ConfigError

NAMES = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def _backend() -> tuple[Any, Any]:
    """``(COCO, COCOeval)`` classes of the installed evaluator."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:
        pass
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    except ImportError:
        raise ConfigError("COCO mAP needs faster-coco-eval (pip install 'distkd[detection]') or pycocotools; "
                          "install one of them") from None


def coco_map(gt: dict[str, Any], detections: Sequence[dict[str, Any]], image_ids: Sequence[int]) -> dict[str, float]:
    """Box AP in % over the images ``image_ids`` of ``gt`` (a COCO instances dict).

    ``detections``: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` each. Returns the keys of
    ``NAMES``; a size range without ground-truth objects (COCO's -1) is left out; no detections at all gives 0.
    """
    if not image_ids:
        raise ConfigError("COCO mAP of no images: the evaluation split is empty")
    if not detections:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    coco_cls, eval_cls = _backend()
    with contextlib.redirect_stdout(io.StringIO()):  # both print progress
        truth = coco_cls()
        truth.dataset = copy.deepcopy(gt)
        truth.createIndex()
        found = truth.loadRes([dict(d) for d in detections])
        evaluator = eval_cls(truth, found, "bbox")
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in evaluator.stats[: len(NAMES)]]
    return {name: 100.0 * value for name, value in zip(NAMES, stats, strict=True) if value >= 0}
