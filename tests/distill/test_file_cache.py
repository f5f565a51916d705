"""The teacher-output cache for image folders: seeded views replayed pixel for pixel, cached logits equal to the live
teacher's on those views, shards owned by ranks, a killed build resumed, stale records rebuilt, end to end."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from distkd.cli import main
from distkd.config import load_config
from distkd.data.imagefolder import FileLoader, load_imagefolder
from distkd.data.views import SeededViews, seeded_rngs
from distkd.distill.file_cache import CachedFileLoader, FileTeacherCache
from distkd.errors import ConfigError
from distkd.models import create_model

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from test_imagefolder import write_tree  # noqa: E402

SIZE = 24


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tree(tmp_path_factory.mktemp("tree"), train_per_class=5, val_per_class=2)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("small_cnn3_w8", num_classes=3, in_chans=3).eval()


def _data(tree: Path, preset: str = "b2"):  # noqa: ANN202 - FileData
    return load_imagefolder(tree, preset=preset, image_size=SIZE)


def _record(**changes) -> dict:  # noqa: ANN003
    return {"teacher": "t", "views": 3, "seed": 7, "count": 15, "classes": 3, "shard_samples": 4} | changes


def test_a_view_is_replayed_pixel_for_pixel_in_any_process_and_leaves_the_global_rngs_alone(tree: Path) -> None:
    views = SeededViews(_data(tree).train, views=3, seed=7)  # b2: random resized crop, flip, RandAugment, erasing
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first = [views[flat][0] for flat in range(len(views))]
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])
    again = torch.stack([x for x, _, _ in DataLoader(views, batch_size=len(views), num_workers=2)][0].unbind())
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # worker processes: the same pixels
    assert not torch.equal(first[0], first[15])  # views 0 and 1 of sample 0 differ
    with seeded_rngs(1):
        assert torch.equal(views[15][0], first[15])  # inside other seeded code too


def _build(cache: FileTeacherCache, teacher: torch.nn.Module, views: SeededViews, rank: int = 0,
           world_size: int = 1) -> list[int]:
    return cache.build(lambda x: teacher(x), views, batch_size=5, num_workers=0, rank=rank, world_size=world_size,
                       log=lambda _: None)


def test_cached_logits_are_the_live_teachers_on_the_views_the_student_gets(tree: Path, teacher, tmp_path) -> None:
    data = _data(tree)
    views = SeededViews(data.train, views=3, seed=7)
    cache = FileTeacherCache.prepare(tmp_path, _record(), log=lambda _: None)
    assert _build(cache, teacher, views) == [0, 1, 2, 3] and cache.missing() == []
    train = FileLoader(data.train, batch_size=4, shuffle=True, drop_last=False, seed=0, num_workers=0)
    loader = CachedFileLoader(train, cache, views)
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            with torch.no_grad():
                live = teacher(batch.inputs)
            torch.testing.assert_close(batch.teacher, live, rtol=2e-3, atol=2e-3)  # float16 storage
            labels = torch.tensor([data.train.targets[i] for i in batch.index.tolist()])
            assert torch.equal(batch.target, labels)
            seen += batch.index.tolist()
        assert sorted(seen) == list(range(15))  # every sample once per epoch


def test_ranks_build_disjoint_shards_and_a_killed_build_resumes(tree: Path, teacher, tmp_path) -> None:
    views = SeededViews(_data(tree).train, views=3, seed=7)
    cache = FileTeacherCache.prepare(tmp_path, _record(), log=lambda _: None)
    assert _build(cache, teacher, views, rank=1, world_size=2) == [1, 3]
    assert cache.missing() == [0, 2]
    assert _build(cache, teacher, views, rank=0, world_size=2) == [0, 2]
    whole = {s: cache.shard_path(s).read_bytes() for s in range(4)}
    cache.shard_path(2).unlink()  # killed before shard 2 was renamed into place ...
    cache.shard_path(3).write_bytes(whole[3][:10])  # ... or a shard cut short
    assert cache.missing() == [2, 3]
    assert _build(cache, teacher, views) == [2, 3]
    assert {s: cache.shard_path(s).read_bytes() for s in range(4)} == whole


def test_a_cache_made_from_something_else_is_rebuilt_not_mixed(tree: Path, teacher, tmp_path) -> None:
    views = SeededViews(_data(tree).train, views=3, seed=7)
    _build(FileTeacherCache.prepare(tmp_path, _record(), log=lambda _: None), teacher, views)
    messages: list[str] = []
    again = FileTeacherCache.prepare(tmp_path, _record(), log=messages.append)
    assert again.missing() == [] and not any("rebuilding" in m for m in messages)
    stale = FileTeacherCache.prepare(tmp_path, _record(teacher="other"), log=messages.append)
    assert stale.missing() == [0, 1, 2, 3] and any("made from something else" in m for m in messages)
    assert json.loads((tmp_path / "record.json").read_text())["teacher"] == "other"


def test_the_space_needed_is_said_and_checked(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    messages: list[str] = []
    FileTeacherCache.prepare(tmp_path, _record(), log=messages.append)
    assert any("3 views x 15 images x 3 logits" in m for m in messages)
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("Usage", (), {"free": 100})())
    with pytest.raises(ConfigError, match="needs 0.3 MiB more") as info:
        FileTeacherCache.prepare(tmp_path / "other", _record(count=15 * 1000), log=lambda _: None)
    assert "\n" not in str(info.value)


def _config(tree: Path, out: Path, teacher_ckpt: Path, *extra: str):  # noqa: ANN202
    return [f"data.root={tree}", "data.name=imagefolder", f"data.image_size={SIZE}", "data.batch_size=5",
            "data.eval_batch_size=6", "data.num_workers=0", "data.preset=b1", "model.name=small_cnn3_w4",
            "model.kwargs={in_chans: 3}", "teacher.name=small_cnn3_w8", "teacher.kwargs={in_chans: 3}",
            f"teacher.checkpoint={teacher_ckpt}", "loss.distill=[{loss: dist}]", "teacher_cache.views=2",
            f"teacher_cache.dir={out / 'cache'}", "train.epochs=2", "train.progress=none", "train.threads=1",
            f"out_dir={out}", "name=cached", *extra]


def test_distkd_trains_from_a_file_cache_and_cache_build_reuses_it(tree: Path, teacher, tmp_path, run_train,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), ckpt)
    overrides = _config(tree, tmp_path, ckpt)
    assert main(["cache", "build", "demo/student.yaml", *overrides]) == 0
    assert "1 of 1 shard(s) to build" in capsys.readouterr().out
    assert main(["cache", "build", "demo/student.yaml", *overrides]) == 0
    assert "0 of 1 shard(s) to build" in capsys.readouterr().out
    shards = sorted((tmp_path / "cache").glob("shard_*.f16"))
    assert len(shards) == 1 and shards[0].stat().st_size == 2 * 15 * 3 * 2
    before = shards[0].stat().st_mtime_ns
    summary = run_train(load_config("demo/student.yaml", overrides))
    assert summary["epochs"] == 2 and shards[0].stat().st_mtime_ns == before  # reused, not rebuilt
    assert main(["cache", "build", "demo/student.yaml", *overrides, "data.preset=b3", "data.batch_size=4"]) == 2
    assert "cannot store mixup/cutmix views (preset b3)" in capsys.readouterr().err


def test_cache_build_without_views_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cache", "build", "demo/student.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the config has no teacher cache (teacher_cache.views is 0); set teacher_cache.views=K"


def test_a_resumed_epoch_replays_the_same_views_and_logits(tree: Path, teacher, tmp_path) -> None:
    data = _data(tree)
    views = SeededViews(data.train, views=3, seed=7)
    cache = FileTeacherCache.prepare(tmp_path, _record(), log=lambda _: None)
    _build(cache, teacher, views)
    loader = CachedFileLoader(FileLoader(data.train, batch_size=4, shuffle=True, drop_last=True, seed=3,
                                         num_workers=1), cache, views)
    loader.set_epoch(1)
    whole = list(loader)
    loader.set_epoch(1, start=2)  # a checkpoint after batch 2 of epoch 1
    rest = list(loader)
    assert len(rest) == len(whole) - 2
    for a, b in zip(whole[2:], rest, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.teacher, b.teacher)
        assert torch.equal(a.index, b.index) and torch.equal(a.target, b.target)
