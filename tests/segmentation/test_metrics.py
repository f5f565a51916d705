"""ConfusionMatrix against a loop-based recomputation of IoU, mIoU and pixel accuracy."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distkd.errors import ShapeError
from distkd.metrics import ConfusionMatrix


def loop_scores(pred: torch.Tensor, target: torch.Tensor, k: int, ignore: int) -> tuple[list[float], float, float]:
    """Per-class IoU (NaN for empty unions), mIoU over nonzero unions, and pixel accuracy, by loops."""
    inter, union = [0] * k, [0] * k
    correct = total = 0
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t == ignore:
            continue
        total += 1
        correct += p == t
        for c in range(k):
            inter[c] += p == c and t == c
            union[c] += p == c or t == c
    ious = [inter[c] / union[c] if union[c] else float("nan") for c in range(k)]
    valid = [v for v in ious if not math.isnan(v)]
    return ious, sum(valid) / len(valid), correct / total


def test_scores_match_loop_recomputation_over_several_updates() -> None:
    gen = torch.Generator().manual_seed(0)
    k, cm = 6, ConfusionMatrix(6, ignore_index=255)
    preds, targets = [], []
    for _ in range(3):
        pred = torch.randint(0, k - 1, (2, 7, 9), generator=gen)  # class 5 is never predicted
        target = torch.randint(0, k - 2, (2, 7, 9), generator=gen)  # classes 4, 5 never in target
        target[torch.rand(target.shape, generator=gen) < 0.2] = 255
        cm.update(pred, target)
        preds.append(pred)
        targets.append(target)
    ious, miou, acc = loop_scores(torch.cat(preds), torch.cat(targets), k, 255)
    got = cm.iou()
    assert math.isnan(got[5]) and math.isnan(ious[5])  # in neither target nor prediction
    assert got[4] == 0.0  # predicted but never present: counts as 0
    torch.testing.assert_close(got[:5], torch.tensor(ious[:5], dtype=torch.float64))
    assert cm.miou() == pytest.approx(miou)
    assert cm.pixel_accuracy() == pytest.approx(acc)
    assert int(cm.matrix.sum()) == int(sum((t != 255).sum() for t in targets))


def test_perfect_prediction_scores_one_and_reset_clears() -> None:
    target = torch.tensor([[[0, 1], [2, 255]]])
    cm = ConfusionMatrix(3)
    cm.update(target.clamp(max=2), target)
    assert cm.miou() == 1.0 and cm.pixel_accuracy() == 1.0
    cm.reset()
    assert int(cm.matrix.sum()) == 0 and math.isnan(cm.miou())


def test_bad_shapes_and_labels_raise_one_line_errors() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ShapeError, match="upsample"):
        cm.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ShapeError, match="label mapping"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))
    with pytest.raises(ShapeError, match="wrong number of classes"):
        cm.update(torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long))


def _reduce_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.full((1, 2, 2), rank), torch.full((1, 2, 2), rank))
        cm.all_reduce()
        torch.save(cm.matrix, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_reduce_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    expected = torch.diag(torch.tensor([4, 4, 0]))
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def test_all_reduce_without_distributed_is_identity() -> None:
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 0]]]))
    before = cm.matrix.clone()
    cm.all_reduce()
    assert torch.equal(cm.matrix, before)
