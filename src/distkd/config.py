"""Run configuration: a typed schema, YAML files, dotted ``key=value`` overrides, one-line errors.

A config file is YAML (read with a safe loader). ``base: other.yaml`` (relative to the file) merges the
file over another, section by section; a ``kwargs`` mapping replaces the base's as a whole (so a student's
``model.kwargs`` never inherits the teacher's widths). Overrides use dotted paths, list items by index:
``optim.lr=0.05``, ``loss.distill.0.weight=2``, ``teacher=null``. Values are parsed as YAML scalars/lists.
Every problem is a :class:`~distkd.errors.ConfigError` naming the key, e.g.
``config: optim.lr: expected a number >= 0, got -1``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from distkd.errors import ConfigError
from distkd.registry import nearest


def _check(minimum: float | None = None, maximum: float | None = None, exclusive_min: bool = False) -> dict:
    return {"min": minimum, "max": maximum, "exclusive_min": exclusive_min}


@dataclass
class ModelConfig:
    """A model by registry name. ``checkpoint``: trained weights for this very model, loaded strictly (a teacher
    needs them). ``weights``: pretrained weights to start from (a timm, torchvision or other state dict file): all
    load strictly except the classifier, which is dropped by name when it does not fit the dataset's classes (a new
    head). Hub weights instead: ``kwargs: {pretrained: true}`` (``timm_*``/``tv_*``, needs network access)."""

    name: str = "small_cnn3_w4"
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None and self.weights is not None:
            raise ConfigError("config: give a model either checkpoint (its trained weights) or weights (pretrained "
                              "weights to start from), not both")


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: as a model, but ``name`` may be left out when ``checkpoint`` is a distkd checkpoint, which
    records the model it holds (its run's ``model.name`` and ``model.kwargs``)."""

    name: str | None = None  # type: ignore[assignment]


@dataclass
class TermConfig:
    """One distillation term: ``weight * build_loss(loss, **kwargs)(student[src], teacher[src])``.

    ``student``/``teacher`` name what is compared: ``logits`` (the model output), a key of a dict output
    (e.g. ``aux``), or a module path tapped by a forward hook (e.g. ``layer3``; a module called several times
    per forward, such as a head shared by FPN levels, gives one loss per call, summed; a list of paths gives the
    loss lists of features, for methods that use several at once). ``transform`` reshapes
    both sides first (``none``, ``class_last``, ``flatten``, ``pool``). ``lr``/``weight_decay``: the optimizer
    settings of the loss's own trainable state (adapters), when it has any; null: ``optim``'s.
    ``pretrain_weight``: the term's weight in the run's ``pretrain`` stage (0: not part of it). ``objective``:
    ``loss`` (the method's criterion) or ``pretrain`` (its pre-training criterion, e.g. FT's paraphraser
    reconstruction); the pretrain stage sets it, a config need not.
    """

    loss: str = "dist"
    weight: float = field(default=1.0, metadata=_check(0))
    kwargs: dict[str, Any] = field(default_factory=dict)
    student: str | list[str] = "logits"
    teacher: str | list[str] = "logits"
    transform: str = "none"
    lr: float | None = field(default=None, metadata=_check(0, exclusive_min=True))
    weight_decay: float | None = field(default=None, metadata=_check(0))
    pretrain_weight: float = field(default=0.0, metadata=_check(0))
    objective: Literal["loss", "pretrain"] = "loss"


@dataclass
class LossConfig:
    """Total loss = ``ce_weight * CE(label_smoothing)`` + the sum of the distillation terms."""

    ce_weight: float = field(default=1.0, metadata=_check(0))
    label_smoothing: float = field(default=0.0, metadata=_check(0, 1))
    distill: list[TermConfig] = field(default_factory=list)
    aux_weight: float = field(default=0.4, metadata=_check(0))  # segmentation: weight of the aux-head CE
    mask_ignore: bool = False  # segmentation: keep ignore-label (255) pixels out of the distillation terms
    mask_padding: bool = False  # detection: keep the batch's padding out of the per-level distillation terms


@dataclass
class DataConfig:
    """Dataset and loading. ``name``: silhouettes, silhouette_pairs, cifar10, cifar100, imagefolder (classification);
    scenes, cityscapes, voc (segmentation)."""

    name: str = "silhouettes"
    root: str | None = None
    download: bool = False
    val_size: int = field(default=0, metadata=_check(0))
    # the GLOBAL batch of one forward over all processes (x train.accumulate per optimizer step); each of W
    # processes takes batch_size / W (must divide); eval_batch_size is global too, split rounded up
    batch_size: int = field(default=128, metadata=_check(1))
    eval_batch_size: int = field(default=512, metadata=_check(1))
    crop_padding: int = field(default=2, metadata=_check(0))
    flip: bool = True
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra reader arguments (e.g. scene counts)
    preset: str = "b1"
    # image folders: the models' input size; null: from the training images (their median shorter side x 0.875,
    # so evaluation's resize does not upscale them), at most 224
    image_size: int | None = field(default=None, metadata=_check(1))
    num_workers: int | None = field(default=None, metadata=_check(0))  # file datasets; null: min(4, CPU cores)
    skip_unreadable: bool = False  # image folders: leave out files that cannot be decoded (counted, not silent)
    # image folders: decode every image once into memory (uint8 at image_size; the memory is checked first), then
    # augment on the device with crop_padding/flip like CIFAR, with the in-memory teacher cache (preset b1 only)
    in_memory: bool = False


@dataclass
class OptimConfig:
    """Optimizer: sgd (momentum, nesterov), adamw, rmsprop_tf (TF-style RMSprop, as in timm)."""

    name: Literal["sgd", "adamw", "rmsprop_tf"] = "sgd"
    lr: float = field(default=0.1, metadata=_check(0, exclusive_min=True))
    momentum: float = field(default=0.9, metadata=_check(0, 1))
    nesterov: bool = False
    weight_decay: float = field(default=5e-4, metadata=_check(0))
    no_decay_norm_bias: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = field(default=1e-8, metadata=_check(0, exclusive_min=True))


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped every iteration: multistep, step, cosine, poly, constant (+ warm-up)."""

    name: Literal["multistep", "step", "cosine", "poly", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)
    step_size: float = field(default=30, metadata=_check(0, exclusive_min=True))  # epochs, may be fractional
    gamma: float = field(default=0.1, metadata=_check(0))
    warmup_epochs: float = field(default=0.0, metadata=_check(0))
    warmup_start: float = field(default=0.1, metadata=_check(0, 1))
    min_lr: float = field(default=0.0, metadata=_check(0))
    power: float = field(default=0.9, metadata=_check(0))  # poly: (1 - progress) ** power
    # the DIST authors' scheduler (image_classification_sota GradualWarmupScheduler): a warm-up that rises once
    # per epoch (a staircase), and a step decay counted from the end of the warm-up
    warmup_per_epoch: bool = False
    decay_after_warmup: bool = False

    def __post_init__(self) -> None:
        if self.decay_after_warmup and self.name != "step":
            raise ConfigError(f"config: schedule.decay_after_warmup applies to schedule.name=step, not "
                              f"{self.name!r}; remove it")


@dataclass
class TrainConfig:
    """The loop's compute and bookkeeping settings.

    Length: ``epochs``, or ``max_steps`` optimizer steps (the schedule then spans ``max_steps``; the last
    epoch may be cut short). Each optimizer step sums the gradients of ``accumulate`` batches (the loss of
    each divided by the number in its group; an epoch's last group may be smaller).
    """

    epochs: int = field(default=10, metadata=_check(1))
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = True
    compile: bool = False  # torch.compile the student's training forward (DDP first, then compile)
    # BatchNorm statistics over the global batch (SyncBatchNorm, converted before DDP wraps the student) when
    # several processes run on CUDA; one process has nothing to sync; several CPU processes: an error
    sync_bn: bool = False
    grad_clip: float | None = field(default=None, metadata=_check(0, exclusive_min=True))
    ema_decay: float | None = field(default=None, metadata=_check(0, 1))
    # the best checkpoint chosen by the EMA's val metric and best.pt's model holding the EMA weights (the DIST
    # authors' tools/train.py: their checkpoint manager ranks epochs by the EMA's top-1); needs ema_decay
    select_ema: bool = False
    threads: int | None = field(default=None, metadata=_check(1))
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    max_steps: int | None = field(default=None, metadata=_check(1))  # optimizer steps; replaces epochs when set
    accumulate: int = field(default=1, metadata=_check(1))  # micro-batches per optimizer step
    eval_every: int | None = field(default=None, metadata=_check(1))  # steps; null: at the end of every epoch
    checkpoint_every: int | None = field(default=None, metadata=_check(1))  # steps, besides every epoch's end
    log_every: int | None = field(default=None, metadata=_check(1))  # steps between train_step/* records
    # student parts not trained (no gradient, eval mode): none; its classifier (the last nn.Linear); all; or a list
    # of module paths / ready tap names (e.g. [stage3, fc]: FitNet's hint stage trains up to the guided layer)
    freeze: list[str] | Literal["none", "classifier", "all"] = "none"

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"config: train.device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.select_ema and not self.ema_decay:
            raise ConfigError("config: train.select_ema chooses the best checkpoint by the EMA's accuracy but "
                              "train.ema_decay is not set; set train.ema_decay (e.g. 0.9999) or remove select_ema")


@dataclass
class TeacherCacheConfig:
    """Teacher-output cache: ``views`` > 0 precomputes the teacher's logits for that many seeded augmented
    views of every training sample (in-memory datasets, logits-only terms) so the teacher never runs while
    training. ``dir`` defaults to ``<run_dir>/teacher_cache``; runs sharing a teacher may share a dir. ``seed``
    draws the views (apart from the run's seed, so students of several seeds share one cache)."""

    views: int = field(default=0, metadata=_check(0))
    dir: str | None = None
    seed: int = field(default=0, metadata=_check(0, 2**63 - 1))


@dataclass
class PretrainConfig:
    """A pre-training stage run before the main schedule, as RepDistiller's ``helper/pretrain.py`` (AB, FT, FSP):
    ``epochs`` of the terms with a ``pretrain_weight`` alone (no task loss), each through its pre-training
    objective when it has one, SGD with ``optim``'s momentum and weight decay at the constant ``lr`` (null:
    ``optim.lr``), training the term state and the student except what ``freeze`` names. It runs in
    ``<run_dir>/pretrain`` (its own checkpoints, resumable); the main stage starts from its student and term state.
    """

    epochs: int = field(default=30, metadata=_check(1))
    lr: float | None = field(default=None, metadata=_check(0, exclusive_min=True))
    freeze: list[str] | Literal["none", "classifier", "all"] = "classifier"


@dataclass
class RunConfig:
    """Everything one ``distkd train`` run needs. ``teacher`` is None when training a teacher/baseline."""

    task: str = "classification"  # a registered task (distkd.tasks): classification, segmentation
    name: str = "run"
    out_dir: str = "runs"
    seed: int = field(default=0, metadata=_check(0, 2**63 - 1))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig | None = None
    loss: LossConfig = field(default_factory=LossConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig | None = None

    def __post_init__(self) -> None:
        if self.pretrain is not None and not any(t.pretrain_weight > 0 for t in self.loss.distill):
            raise ConfigError("config: pretrain is set but no loss.distill term has a pretrain_weight > 0, so the "
                              "stage would train nothing; give a term pretrain_weight: 1.0, or set pretrain=null")
        if not self.name or self.name in (".", "..") or "/" in self.name or "\\" in self.name or "\0" in self.name:
            raise ConfigError(f"config: name: a run name is one folder name inside out_dir, got {self.name!r}; "
                              "use letters, digits, '-', '_' or '.' (e.g. name=dist_seed1), and out_dir= for where")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# ----------------------------------------------------------------------------- loading


def bundled_configs() -> list[str]:
    """Paths (relative to the bundled ``configs`` folder) of every config shipped with distkd."""
    root = resources.files("distkd").joinpath("configs")
    found: list[str] = []

    def walk(node, prefix: str) -> None:  # noqa: ANN001 - importlib Traversable
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml") and not child.name.startswith("_"):
                found.append(f"{prefix}{child.name}")

    walk(root, "")
    return found


def config_description(name: str) -> str:
    """The first line of bundled config ``name``'s opening comment (what it trains), or "" without one."""
    first = resources.files("distkd").joinpath("configs", name).read_text(encoding="utf-8").split("\n", 1)[0]
    return first.lstrip("#").strip() if first.startswith("#") else ""


def resolve_config_path(name: str | Path) -> Path:
    """A config given as a file path, or as a bundled name such as ``demo/teacher.yaml``."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = resources.files("distkd").joinpath("configs", str(name))
    return Path(str(bundled)) if bundled.is_file() else path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (a YAML file or a bundled name, with ``base:`` inheritance), apply ``overrides``, validate
    into a RunConfig."""
    raw = _read_yaml(resolve_config_path(path)) if path is not None else {}
    return from_dict(RunConfig, apply_overrides(raw, overrides))


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to the plain config ``raw`` in place; return it."""
    for item in overrides:
        _apply_override(raw, item)
    return raw


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data (what ``config.yaml`` in a run directory holds)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (list the bundled ones with `distkd configs`)")
    if path.resolve() in seen:
        raise ConfigError(f"config: 'base' chain loops back to {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config {path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        raise ConfigError(f"config {path} is empty; give at least a model (see `distkd configs` for examples)")
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config {path}: base: expected the name of another config file, got {_show(base)}")
    beside, bundled = path.parent / str(base), resolve_config_path(str(base))  # beside the file, else bundled
    target = bundled if not beside.is_file() and bundled.is_file() else beside
    return _merge(_read_yaml(target, (*seen, path.resolve())), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Sections merge key by key; a ``kwargs`` mapping (another object's arguments) replaces the base's whole."""
    out = dict(base)
    for key, value in over.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs"
        out[key] = _merge(out[key], value) if nested else value
    return out


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' is not key=value (e.g. optim.lr=0.05)")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[_list_index(node, part, parts[: i + 1])]
        else:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict | list):
                raise ConfigError(f"override '{item}': '{'.'.join(parts[: i + 1])}' is not a section")
            node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, parts)] = value
    else:
        node[last] = value


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override: '{'.'.join(path)}' needs a list index below {len(node)}")
    return int(part)


# ----------------------------------------------------------------------------- validation


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Validate plain ``data`` against dataclass ``cls`` recursively; raise ConfigError on the first problem."""
    where = path or "top level"
    if not isinstance(data, dict):
        raise ConfigError(f"config: {where}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            hint = nearest(str(key), list(fields))
            raise ConfigError(f"config: unknown key '{_join(path, key)}'{hint}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(hints[name], data[name], _join(path, name), f.metadata)
    return cls(**values)


def _coerce(tp: Any, value: Any, path: str, meta: Any = None) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[:-1]:  # the first type the value fits; the last one's error names the problem
            try:
                return _coerce(option, value, path, meta)
            except ConfigError:
                continue
        return _coerce(inner[-1], value, path, meta)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config: {path}: expected one of {', '.join(map(str, args))}, got {_show(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config: {path}: expected a list, got {_show(value)}")
        return [_coerce(args[0], v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config: {path}: expected a mapping, got {_show(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {path}: expected true or false, got {_show(value)}")
        return value
    if tp in (int, float):
        ok = isinstance(value, int) if tp is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok:
            kind = "an integer" if tp is int else "a number"
            raise ConfigError(f"config: {path}: expected {kind}, got {_show(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"config: {path}: expected a finite number, got {value}")
        _check_range(tp(value), path, meta or {})
        return tp(value)
    if tp is str:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # name=2021 parses as a number; as a string it is unambiguous
        if not isinstance(value, str):
            raise ConfigError(f"config: {path}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp} at {path}")


def _check_range(value: float, path: str, meta: dict) -> None:
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("exclusive_min") and value == lo)):
        bound = f"> {lo}" if meta.get("exclusive_min") else f">= {lo}"
        raise ConfigError(f"config: {path}: expected a value {bound}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"config: {path}: expected a value <= {hi}, got {value}")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if value is not None else "null"
