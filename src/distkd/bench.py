"""``distkd bench``: how much a distillation step costs next to its parts, measured in one process and run.

Four steps are timed on random inputs ``(B, C, H, W)`` with random labels, interleaved round-robin so that
load on a shared machine affects them alike:

- ``student``: the student's training step alone (Distiller without teacher: forward, CE, backward, SGD step);
- ``teacher``: the teacher's forward pass (eval mode, ``torch.inference_mode`` or ``torch.no_grad``);
- ``distill``: the distillation step with a live teacher (Distiller with a DIST term: teacher forward,
  student forward, CE + DIST, backward, SGD step);
- ``cached``: the same step with the teacher's logits precomputed (as the teacher-output cache replays them).

Each figure is the median over ``repeats`` timed blocks of ``steps`` steps, after ``warmup`` steps of each.
Only compute is timed: the batches are random tensors already on the device (no data loading or augmentation).
The ratios compare times per image: ``distill / (student + teacher)`` is 1.0 when the distillation step costs
exactly the sum of its parts; ``cached / student`` is 1.0 when cached distillation costs what training the
student alone does.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.config import OptimConfig, RunConfig
from distkd.data.batch import Batch
from distkd.distill import Distiller, SingleInputStep, Term
from distkd.engine.optim import build_optimizer
from distkd.errors import ConfigError
from distkd.losses import build_loss
from distkd.models import create_model

STEPS = ("student", "teacher", "distill", "cached")
LABELS = {
    "student": "student train step",
    "teacher": "teacher forward",
    "distill": "distill step (live teacher)",
    "cached": "distill step (cached logits)",
}
POOL = 4  # distinct random batches cycled through, so no step sees the very same tensor twice in a row


@dataclass
class BenchConfig:
    """What ``distkd bench`` measures; ``input`` is one image's (C, H, W)."""

    teacher: str
    student: str
    input: tuple[int, int, int] = (3, 32, 32)
    batch: int = 64
    steps: int = 10
    warmup: int = 3
    repeats: int = 5
    classes: int = 100
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = True
    compile: bool = False
    teacher_mode: Literal["inference", "no_grad"] = "inference"
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0


def parse_input(text: str) -> tuple[int, int, int]:
    """``"3x32x32"`` -> ``(3, 32, 32)``; anything else is a one-line ConfigError."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(f"--input must be CxHxW with positive integers, e.g. 3x32x32; got '{text}'")
    c, h, w = (int(p) for p in parts)
    return c, h, w


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Measure the four steps of ``cfg``; return a JSON-ready dict (machine, settings, images/s, ratios)."""
    _check(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = _device(cfg.device)
    info = machine(device)
    torch.manual_seed(cfg.seed)
    student = _model(cfg.student, cfg, "student").to(device)
    teacher = _model(cfg.teacher, cfg, "teacher").to(device)
    if cfg.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    teacher.eval().requires_grad_(False)
    run_student: nn.Module = torch.compile(student) if cfg.compile else student
    fwd_teacher: nn.Module = torch.compile(teacher) if cfg.compile else teacher
    live_teacher = InferenceTeacher(fwd_teacher) if cfg.teacher_mode == "inference" else fwd_teacher

    batches = _batches(cfg, device)
    with torch.no_grad(), _autocast(device, cfg.amp):  # float32 logits, as the cache loader yields them
        cached_logits = [teacher(x).float() for x, _ in batches]

    def cross_entropy(output: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(output.float(), target)}

    dist = build_loss("dist", beta=1.0, gamma=1.0, tau=4.0)
    alone = Distiller(run_student, None, step=SingleInputStep(cross_entropy))
    distiller = Distiller(run_student, live_teacher, [Term("dist", dist, 2.0)], SingleInputStep(cross_entropy))
    alone.train()
    distiller.train()
    optimizer = build_optimizer(student, OptimConfig(lr=0.01))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    def train_step(model: Distiller, i: int, cached: bool) -> None:
        x, y = batches[i % POOL]
        with _autocast(device, cfg.amp):
            step = model(Batch(x, y, teacher=cached_logits[i % POOL] if cached else None), 0)
        loss = sum(step.losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def teacher_step(i: int) -> None:
        grad_mode = torch.inference_mode() if cfg.teacher_mode == "inference" else torch.no_grad()
        with grad_mode, _autocast(device, cfg.amp):
            fwd_teacher(batches[i % POOL][0])

    steps: dict[str, Callable[[int], None]] = {
        "student": lambda i: train_step(alone, i, cached=False),
        "teacher": teacher_step,
        "distill": lambda i: train_step(distiller, i, cached=False),
        "cached": lambda i: train_step(distiller, i, cached=True),
    }
    seconds = _time_steps(steps, cfg, device)
    per_image = {k: statistics.median(v) / (cfg.steps * cfg.batch) for k, v in seconds.items()}
    info["load_average_end"] = _loadavg()
    result = {
        "settings": asdict(cfg) | {"input": "x".join(map(str, cfg.input))},
        "machine": info,
        "images_per_s": {k: 1.0 / v for k, v in per_image.items()},
        "ms_per_step": {k: 1000.0 * v * cfg.batch for k, v in per_image.items()},
        "repeat_seconds": seconds,
        "ratios": {
            "distill_over_parts": per_image["distill"] / (per_image["student"] + per_image["teacher"]),
            "cached_over_student": per_image["cached"] / per_image["student"],
            "distill_over_cached": per_image["distill"] / per_image["cached"],
        },
    }
    return result


class InferenceTeacher(nn.Module):
    """Runs ``model`` under ``torch.inference_mode`` and returns ordinary tensors the loss can use.

    (N, ...) -> (N, classes); the clone is made outside inference mode, so autograd may read the output.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            out = self.model(x)
        return out.clone()


@dataclass
class TaskBenchConfig:
    """What ``distkd bench --config`` measures: the run ``config`` (a path or bundled name) with ``overrides``."""

    config: str
    overrides: tuple[str, ...] = ()
    steps: int = 5
    warmup: int = 2
    repeats: int = 5


def run_task_bench(cfg: TaskBenchConfig) -> dict[str, Any]:
    """Time a distillation config's own step on its own training batches, next to its parts.

    The run is built as ``distkd train`` builds it (task, data, student, teacher from ``teacher.checkpoint``,
    terms, ``train.amp`` and ``train.channels_last``; no teacher-output cache), and three steps are timed
    round-robin on ``POOL`` training batches: the student's step alone (the task's step without terms: forward
    with its task losses, backward, optimizer step), the teacher's forward as the task feeds it (for a detector:
    its backbone and heads on the student's transformed batch, or on the student's RoIs), and the distillation
    step (student, teacher, terms, backward, optimizer step). Works for every task.

    When the run has a teacher-output cache (``teacher_cache.views`` > 0, in the config or an override), a fourth
    step, ``cached``, is the distillation step on the cached loader's batches (the teacher's outputs replayed, the
    teacher not run), and the time the run's setup took to build the cache (or open it) is reported. The cache is
    built where ``teacher_cache.dir`` says, else in a temporary folder removed afterwards."""
    from distkd.config import load_config, resolve_config_path
    from distkd.engine.trainer import seed_everything
    from distkd.tasks import get_task
    from distkd.tasks.common import resolve_teacher

    _check_counts(cfg)
    run = load_config(resolve_config_path(cfg.config), list(cfg.overrides))
    if not run.loss.distill:
        raise ConfigError(f"{cfg.config} has no distillation terms (loss.distill); bench --config times a "
                          "distillation step against its parts: give a config with a teacher and terms")
    if run.teacher is not None and run.teacher.checkpoint is not None and not Path(run.teacher.checkpoint).is_file():
        raise ConfigError(f"teacher.checkpoint {run.teacher.checkpoint} does not exist; give the teacher run's "
                          "checkpoints/best.pt")
    run = resolve_teacher(run)
    if run.train.threads:
        torch.set_num_threads(run.train.threads)
    device = _device("cuda" if run.train.device.startswith("cuda") else "cpu")
    info = machine(device)
    seed_everything(run.seed)
    with contextlib.redirect_stdout(sys.stderr):  # what the build says (data, cache) goes to stderr, not the table
        setup = get_task(run.task).build(replace(run, teacher_cache=replace(run.teacher_cache, views=0)), device)
    distiller = setup.distiller.to(device)
    batches = [batch for batch, _ in zip(setup.train, range(POOL), strict=False)]
    memory_format = torch.channels_last if run.train.channels_last else torch.preserve_format
    distiller.to(memory_format=memory_format)
    distiller.probe(batches[0], dataset_size=setup.train.dataset_size)
    distiller.to(device, memory_format=memory_format)
    alone = Distiller(distiller.student, None, [], distiller.step)
    alone.train()
    distiller.train()
    params = [*distiller.student.parameters(), *(p for _, ps in distiller.term_parameters() for p in ps)]
    optimizer = build_optimizer([p for p in params if p.requires_grad], run.optim)

    scaler = torch.amp.GradScaler(device.type, enabled=run.train.amp == "fp16")

    def train_step(model: Distiller, i: int, pool: list[Batch] = batches) -> None:
        with _autocast(device, run.train.amp):
            loss = sum(model(pool[i % len(pool)], 1).losses.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    # what the task feeds the teacher (e.g. a detector's transformed batch and sampled RoIs), computed once
    with torch.no_grad(), _autocast(device, run.train.amp):
        student_outputs = [distiller.step.student(distiller.student, batch)[0] for batch in batches]

    def teacher_step(i: int) -> None:
        with torch.no_grad(), _autocast(device, run.train.amp):
            distiller.run_teacher(batches[i % len(batches)], student_outputs[i % len(batches)])

    steps: dict[str, Callable[[int], None]] = {
        "student": lambda i: train_step(alone, i),
        "teacher": teacher_step,
        "distill": lambda i: train_step(distiller, i),
    }
    cache: dict[str, Any] = {}
    if run.teacher_cache.views:
        cached_batches, cache["setup_seconds"] = _cached_batches(run, device, len(batches))
        cache["views"] = run.teacher_cache.views
        steps["cached"] = lambda i: train_step(distiller, i, cached_batches)
    seconds = _time_steps(steps, cfg, device)
    images = statistics.fmean(len(b) for b in batches)
    per_image = {k: statistics.median(v) / (cfg.steps * images) for k, v in seconds.items()}
    info["load_average_end"] = _loadavg()
    ratios = {"distill_over_parts": per_image["distill"] / (per_image["student"] + per_image["teacher"])}
    if cache:
        ratios |= {"cached_over_student": per_image["cached"] / per_image["student"],
                   "distill_over_cached": per_image["distill"] / per_image["cached"]}
    return {
        "settings": asdict(cfg) | {"task": run.task, "student": run.model.name, "teacher": run.teacher.name,
                                   "terms": [t.name for t in distiller.terms], "batch": images},
        "machine": info,
        "images_per_s": {k: 1.0 / v for k, v in per_image.items()},
        "ms_per_step": {k: 1000.0 * v * images for k, v in per_image.items()},
        "repeat_seconds": seconds,
        "ratios": ratios,
        "teacher_cache": cache or None,
    }


def _cached_batches(run: RunConfig, device: torch.device, count: int) -> tuple[list[Batch], float]:
    """The first ``count`` batches of ``run``'s cached training loader (``Batch.teacher`` set) and the seconds the
    run's setup took with the cache (building it, or opening it when ``teacher_cache.dir`` already holds it)."""
    from distkd.engine.trainer import seed_everything
    from distkd.tasks import get_task

    with tempfile.TemporaryDirectory(prefix="distkd-bench-cache-") as folder:
        cached = replace(run, teacher_cache=replace(run.teacher_cache, dir=run.teacher_cache.dir or folder))
        seed_everything(run.seed)
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):
            setup = get_task(run.task).build(cached, device)
        seconds = time.perf_counter() - start
        batches = [batch for batch, _ in zip(setup.train, range(count), strict=False)]
    return batches, seconds


def format_task_result(result: dict[str, Any]) -> str:
    """The human-readable table ``distkd bench --config`` prints."""
    s, m = result["settings"], result["machine"]
    lines = [
        f"distkd bench: {s['config']} ({s['task']}): {s['teacher']} -> {s['student']}, terms "
        f"{', '.join(s['terms'])}, batch {s['batch']:g}; {s['repeats']} repeats x {s['steps']} steps after "
        f"{s['warmup']} warm-up steps",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs); device {m['device']} ({m['device_name']}); "
        f"torch {m['torch']}, {m['threads']} threads; load average {_load(m)}",
        "",
        f"{'step':<32}{'images/s':>12}{'ms/step':>10}",
    ]
    for key in result["images_per_s"]:
        lines.append(f"{LABELS[key]:<32}{result['images_per_s'][key]:>12.1f}{result['ms_per_step'][key]:>10.2f}")
    r, cache = result["ratios"], result["teacher_cache"]
    lines += ["", f"distill / (student + teacher) = {r['distill_over_parts']:.3f}  (1.0: the step costs exactly its "
                  "parts)"]
    if cache:
        lines += [f"cached distill / student      = {r['cached_over_student']:.3f}  (1.0: as fast as the student "
                  "alone)",
                  f"live / cached distill         = {r['distill_over_cached']:.3f}",
                  f"teacher cache ({cache['views']} views): the setup took {cache['setup_seconds']:.1f} s with it "
                  "(building or opening it, once per teacher)"]
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: CPU model and count, device, torch version and threads, load."""
    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "load_average_start": _loadavg(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def format_result(result: dict[str, Any]) -> str:
    """The human-readable table ``distkd bench`` prints."""
    s, m = result["settings"], result["machine"]
    lines = [
        f"distkd bench: {s['teacher']} -> {s['student']}, input {s['input']}, batch {s['batch']}, "
        f"{s['classes']} classes; {s['repeats']} repeats x {s['steps']} steps after {s['warmup']} warm-up steps",
        f"machine: {m['cpu']} ({m['logical_cpus']} logical CPUs); device {m['device']} ({m['device_name']}); "
        f"torch {m['torch']}, {m['threads']} threads; load average {_load(m)}",
        f"settings: amp {s['amp']}, channels_last {s['channels_last']}, compile {s['compile']}, "
        f"teacher {s['teacher_mode']}",
        "",
        f"{'step':<32}{'images/s':>12}{'ms/step':>10}",
    ]
    for key in STEPS:
        lines.append(f"{LABELS[key]:<32}{result['images_per_s'][key]:>12.1f}{result['ms_per_step'][key]:>10.2f}")
    r = result["ratios"]
    lines += [
        "",
        "time ratios (per image):",
        f"  distill / (student + teacher) = {r['distill_over_parts']:.3f}  (1.0: the step costs exactly its parts)",
        f"  cached distill / student      = {r['cached_over_student']:.3f}  (1.0: as fast as the student alone)",
        f"  live / cached distill         = {r['distill_over_cached']:.3f}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- helpers


def _check(cfg: BenchConfig) -> None:
    _check_counts(cfg)
    for name in ("batch", "classes"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch < 2:
        raise ConfigError("--batch must be >= 2 (DIST's intra-class term correlates over the batch)")


def _check_counts(cfg: BenchConfig | TaskBenchConfig) -> None:
    for name in ("steps", "repeats"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {cfg.warmup}")


def _device(kind: str) -> torch.device:
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available; use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda, got '{kind}'")
    return torch.device(kind)


def _model(name: str, cfg: BenchConfig, role: str) -> nn.Module:
    """Create ``name`` for ``cfg.classes`` classes taking ``cfg.input`` images (in_chans set when it must be)."""
    x = torch.zeros(2, *cfg.input)
    model = create_model(name, num_classes=cfg.classes)
    if _accepts(model, x):
        return model
    with contextlib.suppress(ConfigError):
        model = create_model(name, num_classes=cfg.classes, in_chans=cfg.input[0])
        if _accepts(model, x):
            return model
    raise ConfigError(f"the {role} '{name}' cannot take inputs of shape {cfg.input}; pick another --input or model")


def _accepts(model: nn.Module, x: Tensor) -> bool:
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError:
        return False
    finally:
        model.train()
    return isinstance(out, Tensor) and out.dim() == 2


def _batches(cfg: BenchConfig, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """POOL random batches: x float (B, C, H, W) standard normal, y int64 (B,) labels, on ``device``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    out = []
    for _ in range(POOL):
        x = torch.randn(cfg.batch, *cfg.input, generator=gen).to(device, memory_format=memory_format)
        y = torch.randint(cfg.classes, (cfg.batch,), generator=gen).to(device)
        out.append((x, y))
    return out


def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _time_steps(steps: dict[str, Callable[[int], None]], cfg: BenchConfig | TaskBenchConfig,
                device: torch.device) -> dict[str, list]:
    """Warm every step up, then time ``repeats`` blocks of ``steps`` calls each, round-robin over the steps."""
    for fn in steps.values():
        for i in range(cfg.warmup):
            fn(i)
    _sync(device)
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(cfg.repeats):
        for key, fn in steps.items():
            start = time.perf_counter()
            for i in range(cfg.steps):
                fn(i)
            _sync(device)
            seconds[key].append(time.perf_counter() - start)
    return seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def _load(m: dict[str, Any]) -> str:
    start, end = m["load_average_start"], m.get("load_average_end")
    if start is None:
        return "n/a"
    text = "/".join(f"{v:.2f}" for v in start)
    return text if end is None else f"{text} at start, {'/'.join(f'{v:.2f}' for v in end)} at end"
