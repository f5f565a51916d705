"""The RetinaNet teacher-output cache: the teacher's per-level cls_logits of every training image as it is and
mirrored, replayed in the orientation the loader draws, equal to the live teacher's (a cached run is the live run,
bit for bit); refused where it cannot be."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distkd.api import train
from distkd.config import RunConfig, load_config, resolve_config_path
from distkd.data.batch import Batch
from distkd.distill.detection_cache import CachedDetectionLoader
from distkd.errors import ConfigError
from distkd.models import create_model
from distkd.tasks import get_task

SMALL = ("model.kwargs.min_size=64", "model.kwargs.max_size=64", "train.progress=none", "data.batch_size=8")


def _initial_teacher(config: str, path: Path) -> str:
    teacher = load_config(resolve_config_path(config)).teacher
    torch.manual_seed(0)
    torch.save(create_model(teacher.name, num_classes=10, **teacher.kwargs).state_dict(), path)
    return f"teacher.checkpoint={path}"


def _config(config: str, scenes: Path, tmp: Path, *overrides: str) -> RunConfig:
    data = f"data.kwargs={{train: 24, val: 8, test: 8, size: 64, folder: {scenes}}}"
    return load_config(resolve_config_path(config), [data, *SMALL, f"out_dir={tmp}", *overrides])


def test_cached_outputs_are_the_live_teachers_for_the_batches_the_loader_draws(scenes_root: Path,
                                                                                tmp_path: Path) -> None:
    teacher = _initial_teacher("demo/det_dist.yaml", tmp_path / "t.pt")
    cfg = _config("demo/det_dist.yaml", scenes_root, tmp_path, teacher, "teacher_cache.views=2",
                  f"teacher_cache.dir={tmp_path / 'cache'}")
    setup = get_task("detection").build(cfg, torch.device("cpu"))
    assert isinstance(setup.train, CachedDetectionLoader)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["record"]["orientations"] == 2 and meta["record"]["images"] == 24 and len(meta["levels"]) == 4
    distiller = setup.distiller
    distiller.probe(next(iter(setup.train)))  # as the trainer does: one loss per FPN level
    distiller.train()
    seen_mirrored = set()
    for epoch in (0, 1):
        setup.train.set_epoch(epoch)
        for batch in setup.train:
            seen_mirrored |= {setup.train.loader.mirrored(i) for i in batch.index.tolist()}
            with torch.no_grad():
                cached = distiller(batch)
                live = distiller(Batch(batch.inputs, batch.target, batch.index))  # the teacher runs
            assert torch.equal(cached.losses["dist_cls_logits"], live.losses["dist_cls_logits"])
            output, _ = distiller.step.student(distiller.student, batch)
            with distiller.teacher_taps.recording() as taps:
                distiller.run_teacher(batch, output)
                for c, t in zip(batch.teacher["cls_logits"], taps["cls_logits"], strict=True):
                    assert torch.equal(c, t)  # float32, batches of the training size: the live outputs exactly
            distiller.teacher_taps.clear()
    assert seen_mirrored == {False, True}  # both orientations were replayed


def test_a_cached_run_trains_and_the_cache_is_reused(scenes_root: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    teacher = _initial_teacher("demo/det_dist.yaml", tmp_path / "t.pt")
    cache = tmp_path / "cache"
    cfg = _config("demo/det_dist.yaml", scenes_root, tmp_path, teacher, "teacher_cache.views=2", "train.epochs=1",
                  f"teacher_cache.dir={cache}")
    summary = train(cfg)
    printed = capsys.readouterr().out
    assert 0 <= summary["best_test"] <= 100 and "detection teacher cache: 2 orientation(s) x 24 images" in printed
    stamp = (cache / "cls_logits.f32").stat().st_mtime_ns
    train(_config("demo/det_dist.yaml", scenes_root, tmp_path, teacher, "teacher_cache.views=2", "train.epochs=1",
                  f"teacher_cache.dir={cache}", "name=again"))
    assert (cache / "cls_logits.f32").stat().st_mtime_ns == stamp  # reused, not rebuilt
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/dist_cls_logits"] > 0


def test_a_cached_run_ends_with_the_live_runs_weights_bit_for_bit(scenes_root: Path, tmp_path: Path) -> None:
    from distkd.engine.checkpoint import load_state

    teacher = _initial_teacher("demo/det_dist.yaml", tmp_path / "t.pt")
    runs = {}
    for views in (0, 2):
        cfg = _config("demo/det_dist.yaml", scenes_root, tmp_path / f"views{views}", teacher, "train.max_steps=6",
                      f"teacher_cache.views={views}", f"teacher_cache.dir={tmp_path / 'cache'}")
        train(cfg)
        runs[views] = load_state(cfg.run_dir / "checkpoints" / "last.pt")["model"]
    live, cached = runs[0], runs[2]
    assert live.keys() == cached.keys() and all(torch.equal(live[k], cached[k]) for k in live)


@pytest.mark.parametrize(("config", "overrides", "message"), [
    ("demo/det_frcnn_dist.yaml", ["teacher_cache.views=2"], "depend on the student's sampled RoIs"),
    ("demo/det_dist.yaml", ["teacher_cache.views=4"], "counts the cached orientations: 2 with data.flip"),
    ("demo/det_dist.yaml", ["teacher_cache.views=2", "data.flip=false"], "1 without; got 2"),
    ("demo/det_mimic.yaml", ["teacher_cache.views=2"], "stores cls_logits only"),
    ("demo/det_dist.yaml", ["teacher_cache.views=2", "model.kwargs.min_size=[48, 64]"], "transform to one size"),
])
def test_what_the_cache_cannot_replay_is_a_one_line_error(config: str, overrides: list[str], message: str,
                                                           scenes_root: Path, tmp_path: Path) -> None:
    teacher = _initial_teacher(config, tmp_path / "t.pt")
    cfg = _config(config, scenes_root, tmp_path, teacher, *overrides, f"teacher_cache.dir={tmp_path / 'c'}")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as err:
        get_task("detection").build(cfg, torch.device("cpu"))
    assert "\n" not in str(err.value)


def test_a_cached_run_killed_mid_epoch_resumes_to_the_same_weights(scenes_root: Path, tmp_path: Path,
                                                                   kill_and_resume) -> None:  # noqa: ANN001
    teacher = _initial_teacher("demo/det_dist.yaml", tmp_path / "t.pt")
    overrides = (teacher, "teacher_cache.views=2", f"teacher_cache.dir={tmp_path / 'cache'}", "train.max_steps=7",
                 "train.checkpoint_every=4", "train.eval_every=100")
    a, b, batch = kill_and_resume(_config("demo/det_dist.yaml", scenes_root, tmp_path / "a", *overrides),
                                  _config("demo/det_dist.yaml", scenes_root, tmp_path / "b", *overrides))
    assert batch == 1  # 3 batches an epoch: killed mid-epoch 2
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
