"""The teacher-output cache replays exactly the views whose logits it stored, and is rebuilt when stale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distkd.data.augment import CropFlip
from distkd.data.base import Split
from distkd.data.loaders import TensorLoader
from distkd.distill.teacher_cache import CachedViewLoader, TeacherCache
from distkd.models import create_model


@pytest.fixture()
def setup():
    gen = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (40, 1, 12, 12), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (40,), generator=gen))
    loader = TensorLoader(split, batch_size=8, mean=(0.5,), std=(0.25,), augment=CropFlip(2, True),
                          shuffle=True, seed=3)
    torch.manual_seed(0)
    teacher = create_model("small_cnn3_w2", num_classes=10).eval()
    record = {"teacher": "small_cnn3_w2", "views": 3, "seed": 7}
    return loader, teacher, record


def test_cached_logits_equal_the_live_teacher_on_the_replayed_view(tmp_path, setup):
    loader, teacher, record = setup
    cache = TeacherCache.open_or_build(tmp_path, record, teacher, loader, batch_size=16, log=lambda _: None)
    cached = CachedViewLoader(loader, cache)
    cached.set_epoch(1)
    batches = list(cached)
    assert len(batches) == len(loader) == 5
    with torch.no_grad():
        for x, y, logits in ((b.inputs, b.target, b.teacher) for b in batches):
            assert logits.shape == (8, 10) and y.shape == (8,)
            torch.testing.assert_close(logits, teacher(x), atol=2e-3, rtol=2e-3)  # float16 storage


def test_views_are_replayed_deterministically_and_vary_with_the_epoch(tmp_path, setup):
    loader, teacher, record = setup
    cache = TeacherCache.open_or_build(tmp_path, record, teacher, loader, batch_size=16, log=lambda _: None)
    cached = CachedViewLoader(loader, cache)
    cached.set_epoch(2)
    first = [b.inputs for b in cached]
    cached.set_epoch(2)
    again = [b.inputs for b in cached]
    cached.set_epoch(3)
    other = [b.inputs for b in cached]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_cache_is_reused_when_its_record_matches_and_rebuilt_when_anything_changes(tmp_path, setup):
    loader, teacher, record = setup
    calls = []

    def counting_teacher(x):
        calls.append(len(x))
        return teacher(x)

    messages = []
    TeacherCache.open_or_build(tmp_path, record, counting_teacher, loader, 16, log=messages.append)
    built = len(calls)
    assert sum(calls) == 3 * 40
    TeacherCache.open_or_build(tmp_path, record, counting_teacher, loader, 16, log=messages.append)
    assert len(calls) == built  # reused: the teacher did not run
    changed = record | {"teacher_sha256": "another checkpoint"}
    rebuilt = TeacherCache.open_or_build(tmp_path, changed, counting_teacher, loader, 16, log=messages.append)
    assert len(calls) > built and any("rebuilding" in m for m in messages)
    assert json.loads((tmp_path / "meta.json").read_text())["teacher_sha256"] == "another checkpoint"
    assert rebuilt.logits.dtype == np.float16 and rebuilt.logits.shape == (3 * 40, 10)


def test_an_interrupted_build_leaves_no_usable_cache(tmp_path, setup):
    loader, teacher, record = setup

    def failing_teacher(x):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        TeacherCache.open_or_build(tmp_path, record, failing_teacher, loader, 16, log=lambda _: None)
    assert not (tmp_path / "meta.json").exists() and not (tmp_path / "logits.f16").exists()


def _student_config(tmp_path, teacher_ckpt, **extra):
    from distkd.config import load_config

    overrides = [
        f"out_dir={tmp_path}", "name=cached", "model.name=small_cnn3_w2", "teacher.name=small_cnn3_w2",
        f"teacher.checkpoint={teacher_ckpt}", "train.epochs=1", "train.amp=none", "train.progress=none",
        "loss.distill=[{loss: dist, weight: 1.0}]", "teacher_cache.views=2", "data.batch_size=256",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def test_a_run_with_teacher_cache_trains_and_records_the_teacher_checkpoint_hash(tmp_path):
    from distkd.api import train
    from distkd.models.weights import weights_sha256

    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": create_model("small_cnn3_w2", num_classes=10).state_dict()}, ckpt)
    summary = train(_student_config(tmp_path, ckpt))
    meta = json.loads((tmp_path / "cached" / "teacher_cache" / "meta.json").read_text())
    assert meta["teacher_sha256"] == weights_sha256(ckpt) and meta["shape"] == [2, 7000, 10]
    assert 0 <= summary["best_test"] <= 100


def test_teacher_cache_refuses_feature_terms(tmp_path):
    from distkd.api import train
    from distkd.errors import ConfigError

    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": create_model("small_cnn3_w2", num_classes=10).state_dict()}, ckpt)
    cfg = _student_config(tmp_path, ckpt)
    cfg.loss.distill[0].student = cfg.loss.distill[0].teacher = "features.2"
    with pytest.raises(ConfigError, match="teacher: logits"):
        train(cfg)


@pytest.mark.parametrize("damage", ["meta", "truncated", "missing"])
def test_a_damaged_cache_is_rebuilt_saying_so(tmp_path, setup, damage):
    loader, teacher, record = setup
    first = TeacherCache.open_or_build(tmp_path, record, teacher, loader, 16, log=lambda _: None)
    reference = np.array(first.logits)
    del first
    if damage == "meta":
        (tmp_path / "meta.json").write_bytes(b"\xff{not json")
    elif damage == "truncated":
        with (tmp_path / "logits.f16").open("r+b") as f:
            f.truncate(100)
    else:
        (tmp_path / "logits.f16").unlink()
    messages = []
    again = TeacherCache.open_or_build(tmp_path, record, teacher, loader, 16, log=messages.append)
    assert any("is damaged" in m and "rebuilding it" in m for m in messages), messages
    assert np.array_equal(np.array(again.logits), reference)
