"""Run-level entry points used by the CLI and by Python users: train a config, evaluate a checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from distkd.config import RunConfig, ScheduleConfig, apply_overrides, dump_config, from_dict, to_dict
from distkd.engine import distributed
from distkd.engine.checkpoint import load_state
from distkd.engine.trainer import Trainer, TrainSetup, seed_everything
from distkd.errors import CheckpointError, ConfigError, DataError
from distkd.models.weights import load_weights
from distkd.tasks import get_task
from distkd.tasks.common import (
    build_model,
    data_workers,
    eval_shard,
    process_batches,
    resolve_teacher,
    teacher_cache_dir,
)


def train(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.run_dir`` (continue its ``checkpoints/last.pt`` when ``resume``); return the summary.

    With a ``pretrain`` stage, that stage runs first in ``<run_dir>/pretrain`` (see :func:`pretrain_config`; a
    resume continues whichever stage was running) and the main run starts from its last student and term state.
    """
    cfg = resolve_teacher(cfg)  # before the config is compared and saved: the teacher's recorded model name
    device = _device(cfg.train)
    try:
        if cfg.pretrain is None:
            return _train(cfg, device, resume)
        return _train_staged(cfg, device, resume)
    finally:
        distributed.close()  # leave the process group _device joined under torchrun


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """The pre-training stage of ``cfg`` as a run of its own, in ``<run_dir>/pretrain``: ``pretrain.epochs`` at the
    constant lr ``pretrain.lr`` (no warm-up, no EMA, no teacher cache), no task loss, each term weighted by its
    ``pretrain_weight`` through its pre-training objective, the student frozen as ``pretrain.freeze`` says."""
    stage = cfg.pretrain
    assert stage is not None
    terms = [dataclasses.replace(t, weight=t.pretrain_weight, objective="pretrain") for t in cfg.loss.distill]
    return dataclasses.replace(
        cfg, name="pretrain", out_dir=str(cfg.run_dir), pretrain=None,
        loss=dataclasses.replace(cfg.loss, ce_weight=0.0, distill=terms),
        teacher_cache=dataclasses.replace(cfg.teacher_cache, views=0),
        optim=dataclasses.replace(cfg.optim, lr=stage.lr or cfg.optim.lr),
        schedule=ScheduleConfig(name="constant"),
        train=dataclasses.replace(cfg.train, epochs=stage.epochs, max_steps=None, ema_decay=None, select_ema=False,
                                  eval_every=None, freeze=stage.freeze))


def _train_staged(cfg: RunConfig, device: torch.device, resume: bool) -> dict[str, Any]:
    """The pre-training stage (unless finished), then the main run from its last checkpoint."""
    stage_cfg = pretrain_config(cfg)
    stage_dir = stage_cfg.run_dir
    main_started = (cfg.run_dir / "checkpoints" / "last.pt").exists()
    stage_started = (stage_dir / "checkpoints" / "last.pt").exists()
    if not resume and (main_started or stage_started):
        raise ConfigError(f"{cfg.run_dir} already holds a run; pass --resume to continue it, or set name=... for a "
                          "new one")
    if resume and not (main_started or stage_started):
        raise ConfigError(f"nothing to resume in {cfg.run_dir}: neither it nor its pretrain stage has a "
                          "checkpoints/last.pt; run the same command without --resume")
    if not (stage_dir / "summary.json").exists():
        print(f"pretrain stage: {cfg.pretrain.epochs} epoch(s) in {stage_dir}", flush=True)
        _train(stage_cfg, device, resume=stage_started)
        distributed.barrier()  # rank 0 has written the stage's last.pt before any rank reads it
    start = stage_dir / "checkpoints" / "last.pt"
    return _train(cfg, device, resume=main_started, start_from=None if main_started else start)


def _train(cfg: RunConfig, device: torch.device, resume: bool, start_from: Path | None = None,
           build: Callable[[RunConfig, torch.device], TrainSetup] | None = None) -> dict[str, Any]:
    """Check the run folder, build the run (``build``, default: the task's) and train it."""
    build = build or get_task(cfg.task).build  # an unknown task fails before anything is written
    run_dir = cfg.run_dir
    last = run_dir / "checkpoints" / "last.pt"
    if resume and not last.exists():
        raise ConfigError(f"nothing to resume in {run_dir}: it has no checkpoints/last.pt (the run stopped before "
                          "its first checkpoint, or never started); run the same command without --resume")
    extended = resume and _check_same_config(cfg, last)
    if not resume and last.exists():
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or set name=... for a new one")
    _check_writable(run_dir)
    seed_everything(cfg.seed + distributed.rank())  # differs by rank; DDP then gives every rank rank 0's student
    setup = build(cfg, device)  # a config the task refuses leaves no folder behind
    if not resume and distributed.is_main():
        _remove_unfinished_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if extended and distributed.is_main():
        dump_config(cfg, run_dir / "config.yaml")  # the run's config is now the extended one
    return Trainer(cfg, setup, device, run_dir, start_from=start_from).fit(resume=resume)


def fit(student: nn.Module, train_data: Dataset, val_data: Dataset, *, teacher: nn.Module | None = None,
        terms: Sequence[dict[str, Any]] = (), test_data: Dataset | None = None, config: str | Path | None = None,
        overrides: Sequence[str] = (), resume: bool = False) -> dict[str, Any]:
    """Train your own ``student`` on your own data, distilling your own ``teacher``, with distkd's loop; return
    the summary. Models need no registry name and data no dataset name.

    ``train_data``/``val_data``/``test_data``: map-style datasets of ``(image float (C, H, W), label int)``,
    already normalised (batched by worker processes, ``data.num_workers``). ``teacher``: any module giving logits
    for the same inputs (frozen, in eval mode). ``terms``: the distillation terms as in a config's
    ``loss.distill``, e.g. ``[{"loss": "dist", "weight": 2.0}]``. ``config``/``overrides``: a config file (or
    bundled name) and ``key=value`` overrides for everything else (``train.epochs=5``, ``optim.lr=0.05``,
    ``data.batch_size=64``, ``out_dir=``/``name=`` for the run folder); the config's model, teacher and data
    sections are not used. Checkpoints hold the student's state dict as ``model`` (for your module's
    ``load_state_dict``); ``distkd export``/``predict`` need a registered model name and are not for these runs.
    """
    from distkd.config import TeacherConfig, TermConfig, load_config
    from distkd.data.imagefolder import FileLoader
    from distkd.distill import Distiller, SingleInputStep
    from distkd.tasks import classification
    from distkd.tasks.common import build_terms

    base = load_config(config, list(overrides))
    specs = [from_dict(TermConfig, dict(t), f"terms.{i}") for i, t in enumerate(terms)]
    if specs and teacher is None:
        raise ConfigError("terms need a teacher: pass teacher=your_module, or no terms to train the student alone")
    if teacher is not None and not specs:
        raise ConfigError("a teacher is given but no terms use it; pass terms=[{'loss': 'dist'}] (or another loss)")
    cfg = dataclasses.replace(
        base, model=dataclasses.replace(base.model, name=f"python:{type(student).__name__}", kwargs={}),
        teacher=TeacherConfig(name=f"python:{type(teacher).__name__}") if teacher is not None else None,
        loss=dataclasses.replace(base.loss, distill=specs), data=dataclasses.replace(base.data, name="python"))

    def build(cfg: RunConfig, device: torch.device) -> TrainSetup:
        train_batch, eval_batch = process_batches(cfg.data)
        rank, world = distributed.rank(), distributed.world_size()

        def loader(data: Dataset, train: bool) -> FileLoader:
            sharding = {"rank": rank, "world_size": world} if train else {}
            return FileLoader(data if train else eval_shard(data), batch_size=train_batch if train else eval_batch,
                              shuffle=train, drop_last=train, seed=cfg.seed, num_workers=data_workers(cfg.data),
                              device=device, channels_last=cfg.train.channels_last, **sharding)

        step = SingleInputStep(classification.cross_entropy(cfg.loss))
        distiller = Distiller(student, teacher, build_terms(cfg.loss.distill), step)
        test = loader(test_data, False) if test_data is not None else None
        return TrainSetup(distiller, loader(train_data, True), loader(val_data, False), test,
                          classification.evaluate, metric="top1")

    device = _device(cfg.train)
    try:
        return _train(cfg, device, resume, build=build)
    finally:
        distributed.close()


def build_teacher_cache(cfg: RunConfig) -> Path:
    """Build (or complete) the teacher-output cache ``cfg`` trains with, without training; return its folder.

    Under torchrun every process builds its share of an image-folder cache's shards."""
    if cfg.teacher_cache.views == 0:
        raise ConfigError("the config has no teacher cache (teacher_cache.views is 0); set teacher_cache.views=K")
    cfg = resolve_teacher(cfg)
    device = _device(cfg.train)
    try:
        task = get_task(cfg.task)
        seed_everything(cfg.seed + distributed.rank())
        task.build(cfg, device)  # builds the cache the training loader replays
        return teacher_cache_dir(cfg)
    finally:
        distributed.close()


def _check_writable(run_dir: Path) -> None:
    """The run folder can be created (or written): its nearest existing ancestor is a writable folder."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = ("is a file, not a folder" if not existing.is_dir() else
               "is not writable (read-only file system or permissions)" if not os.access(existing, os.W_OK) else "")
    if problem:
        raise ConfigError(f"cannot create the run folder {run_dir}: {existing} {problem}; set out_dir= to a "
                          "writable folder")


RUN_RECORDS = ("metrics.jsonl", "tensorboard", "config.yaml", "env.json", "summary.json", "report.md", "checkpoints")


def _remove_unfinished_run(run_dir: Path) -> None:
    """A fresh start owns its run folder: drop the records of a run that died before its first checkpoint
    (they would otherwise be appended to). A shared teacher cache inside it is kept."""
    found = [run_dir / name for name in RUN_RECORDS if (run_dir / name).exists()]
    for path in found:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if found:
        print(f"starting over in {run_dir}: removed {', '.join(p.name for p in found)} of a run that stopped before "
              "its first checkpoint", flush=True)


def evaluate_checkpoint(path: str | Path, split: str = "val", scales: Sequence[float] | None = None,
                        flip: bool = False, overrides: Sequence[str] = (), per_class: bool = False) -> dict[str, Any]:
    """The task's metrics (top-1/top-5, or mIoU) of a distkd checkpoint (best.pt or last.pt) on ``split``;
    ``overrides``: dotted ``key=value`` changes to its saved config (e.g. ``data.root=OTHER`` evaluates it on
    another image folder with the same classes); ``scales``/``flip``/``per_class``: see :func:`evaluate_config`."""
    state = load_state(Path(path))
    if "config" not in state:
        raise CheckpointError(f"{path} holds no run config to rebuild its model and data from; evaluate it with a "
                              "config: distkd eval CONFIG model.checkpoint=PATH")
    raw = copy.deepcopy(state["config"])
    try:
        cfg = from_dict(RunConfig, apply_overrides(raw, overrides))
    except ConfigError as exc:
        if overrides:
            raise
        raise CheckpointError(f"{path}: its saved config is not valid for this distkd version ({exc})") from None
    return evaluate_config(cfg, split, weights=state["model"], origin=f"checkpoint '{path}'", scales=scales, flip=flip,
                           per_class=per_class, classes=(state.get("meta") or {}).get("classes"))


def evaluate_config(cfg: RunConfig, split: str = "val", weights: dict[str, Any] | None = None,
                    origin: str = "", scales: Sequence[float] | None = None, flip: bool = False,
                    per_class: bool = False, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The metrics on ``split`` of the model ``cfg`` describes, with ``weights`` (a state_dict) or, without them,
    the weights ``model.checkpoint`` names (plain state dicts of timm, torchvision or other tools load too).

    ``scales`` (e.g. 0.5 0.75 1.0 1.25 1.5 1.75) and ``flip`` average the predictions over rescaled and mirrored
    inputs, for tasks whose ``evaluate`` takes them (segmentation); None/False: the single-scale evaluation.
    ``per_class`` (classification): add each class's top-1 accuracy and the confusion matrix (rows: true class,
    columns: predicted). ``classes``: the class names the weights were trained for (from their checkpoint); a
    dataset with other classes is refused, as its labels would not mean the same.
    """
    if weights is None and cfg.model.checkpoint is None:
        raise ConfigError("nothing to evaluate: the config names no weights; set model.checkpoint=PATH")
    # no teacher; evaluation never draws a training batch: a small even one (mixup) lets small folders be evaluated
    cfg = dataclasses.replace(cfg, teacher=None, loss=dataclasses.replace(cfg.loss, distill=[]),
                              data=dataclasses.replace(cfg.data, batch_size=2 * distributed.world_size()))
    task = get_task(cfg.task)
    options: dict[str, Any] = {}
    if scales is not None or flip:
        if "scales" not in inspect.signature(task.evaluate).parameters:
            raise ConfigError(f"--scales/--flip (multi-scale and flip evaluation) are for segmentation; task "
                              f"'{cfg.task}' evaluates each image once")
        options = {"scales": tuple(scales) if scales is not None else (1.0,), "flip": flip}
    if per_class and not hasattr(task, "confusion_matrix"):
        raise ConfigError(f"--per-class (per-class accuracy, confusion matrix) is for classification, not task "
                          f"'{cfg.task}'")
    device = _device(cfg.train)
    data = task.load_dataset(cfg.data, cfg.seed)
    names = list(getattr(data, "classes", None) or [str(i) for i in range(data.num_classes)])
    if classes is not None and list(classes) != names:
        raise DataError(f"the dataset has other classes ({_listing(names)}) than the model was trained for "
                        f"({_listing(list(classes))}); give a dataset with the same class folders")
    loaders = dict(zip(("train", "val", "test"), task.build_loaders(cfg, data, device), strict=True))
    if loaders.get(split) is None:
        raise ConfigError(f"dataset '{cfg.data.name}' has no '{split}' split; use --split val")
    if weights is None:
        model = build_model(cfg.model, data.num_classes, "model")
    else:
        model = build_model(dataclasses.replace(cfg.model, checkpoint=None), data.num_classes, "model")
        load_weights(model, weights, origin=origin)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    metrics: dict[str, Any] = task.evaluate(model, loaders[split], **options)
    if per_class:
        matrix = task.confusion_matrix(model, loaders[split], data.num_classes)
        totals = matrix.sum(dim=1).clamp(min=1)
        metrics["per_class_top1"] = dict(zip(names, (100 * matrix.diag() / totals).tolist(), strict=True))
        metrics["confusion"] = {"rows": "true class", "columns": "predicted class", "classes": names,
                                "matrix": matrix.tolist()}
    return metrics


def _listing(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _check_same_config(cfg: RunConfig, last: Path) -> bool:
    """Resuming with another config would silently mix two experiments: refuse, naming the differences. One change
    is allowed: more ``train.epochs`` extends the run (finished or not), its schedule recomputed over the new length;
    return whether it does."""
    state = load_state(last)
    saved = state["config"]
    diffs = config_differences(saved, cfg)
    before = saved["train"]["epochs"]
    if diffs == ["train.epochs"] and cfg.train.epochs > before and cfg.train.max_steps is None:
        if distributed.is_main():
            print(f"extending the run from {before} to {cfg.train.epochs} epochs at step {state.get('step')}: the lr "
                  f"schedule is recomputed over {cfg.train.epochs} epochs and continues from there", flush=True)
        return True
    if diffs:
        grow = " (train.epochs may only grow, to extend the run)" if "train.epochs" in diffs else ""
        raise ConfigError(f"cannot resume {last}: the config differs in {', '.join(diffs[:5])}{grow}; "
                          "resume with the original config and overrides")
    return False


def run_or_reuse(cfg: RunConfig) -> dict[str, Any]:
    """The summary of ``cfg``'s run: read back when finished with the same config, else trained (or resumed).

    A finished run with another config in the same folder is refused, naming the differences: reusing it would
    report another experiment's result under this one's name."""
    run_dir = cfg.run_dir
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return train(cfg, resume=(run_dir / "checkpoints" / "last.pt").is_file())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    diffs = config_differences(saved, cfg)
    if diffs:
        raise ConfigError(f"{run_dir} holds a finished run with another config (differs in {_listing(diffs)}); "
                          "pass another --out, or delete that folder")
    return json.loads(summary.read_text())


# where a run lives and how it is computed, not what it computes: a run may move, or resume on another device
NOT_WHAT_IT_COMPUTES = frozenset({"train.progress", "out_dir", "name", "train.threads", "train.device"})


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Dotted keys in which a run's saved config (plain data) and ``cfg`` differ in what they compute."""
    return [k for k in _diff(saved, to_dict(cfg)) if k not in NOT_WHAT_IT_COMPUTES]


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{path}.{k}".lstrip("."))]
    return [] if a == b else [path]


def _device(train_cfg: Any) -> torch.device:
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    if train_cfg.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={train_cfg.device} but no CUDA device is available; "
                              "use train.device=cpu or auto")
        index = int(train_cfg.device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"train.device={train_cfg.device} but this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s); use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return distributed.init_from_env(train_cfg.device)
