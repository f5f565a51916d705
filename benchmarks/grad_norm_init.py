"""Gradient norm of freshly initialised students under CE, KD and DIST, and what warm-up and clipping do to it.

    python benchmarks/grad_norm_init.py                 # full run (~4 min on one thread of a 2-core CPU)
    python benchmarks/grad_norm_init.py --quick         # smoke run: two cheap students, 4 steps, 3 scales
    python benchmarks/grad_norm_init.py --json out.json # also write every step's record

Why: DIST is built on the Pearson correlation, which is scale-invariant, so its gradient w.r.t. the student's
probabilities grows like ``1 / ||y_s - mean(y_s)||``. Near a uniform prediction (a fresh head with small
logits) ``y_s - mean(y_s) ~ (z_s - mean(z_s)) / (C tau)`` and the softmax Jacobian brings the same
``1 / (C tau)`` back, so the gradient w.r.t. the *logits* of one instance's correlation is about
``sqrt(1 - rho^2) / ||z_i - mean(z_i)||``, independent of tau; the loss multiplies it by ``tau**2 * beta / N``
(and the intra-class term likewise with the columns, ``tau**2 * gamma / C``). A head whose logits have a
standard deviation of 0.01 therefore gets gradients ~100x those of a head at 1, and the README setting
(``beta = gamma = 2, tau = 4``) another 32x on top of ``DIST(1, 1, 1)``.

What runs (seeded; one torch thread by default, see ``--threads``):

- Data: ``steps`` distinct random batches, N=64 images 3x32x32 drawn from N(0, 1) (what normalised images
  look like), 100 classes. The torchvision/timm students see the same batches bilinearly upsampled to
  64x64 (224x224 costs ~15x more per step on this CPU).
- Teacher: a *fixed random teacher*, no training: a randomly initialised ``cifar_resnet56`` in eval mode
  runs once over all batches; its logits are standardised per class over the whole data (removing the part
  every input shares) and multiplied by the scale at which its mean top-1 softmax probability (tau 1) is
  ``TEACHER_TOP1`` = 0.7, i.e. confident like a trained teacher. Labels are the teacher's argmax, so CE and
  the distillation terms pull the same way.
- Trajectories: per student, ``steps`` SGD steps (momentum 0.9, weight decay 5e-4, lr of the bundled CIFAR-100
  configs: 0.05, 0.01 for MobileNetV2/ShuffleNet; the default torchvision/timm students get 0.05, the
  ``EXTRA_STUDENTS`` their configs' lr) from the same initial weights for each variant: CE; CE + KD(tau 4); CE +
  DIST(2, 2, 4), the README setting; CE + DIST(1, 1, 1); and CE + DIST(2, 2, 4) with the mitigations, as distkd's
  trainer applies them: ``schedule.warmup_epochs: 1`` (linear from ``warmup_start`` = 0.1 x lr over one CIFAR
  epoch, 782 steps at batch 64, so lr 0.1x-0.12x over these steps), ``train.grad_clip: 5`` (total norm over all
  parameters), and both. Recorded per step: the total gradient norm *before* clipping, the loss, its CE part, and
  the row-centred logit norm. Models in train mode (BatchNorm on batch statistics), fp32, channels_last.
- Logit-scale sweep: at step 0, the final Linear initialised at s times its default weight and bias, s in
  1e-3..1 (only the head changes, so the body runs once); the gradient norm w.r.t. all parameters and w.r.t.
  the logits for each loss, and the log-log slope of DIST's logit gradient against ``||z_i - mean(z_i)||``
  (the argument above predicts -1).

The script applies glibc's malloc thresholds in-process (``distkd.engine.cpu.tune_malloc``, the same as
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967295``) unless MALLOC_* is already set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distkd.config import ScheduleConfig
from distkd.engine.optim import lr_factor
from distkd.losses import DIST, KD
from distkd.models import create_model

NUM_CLASSES = 100
BATCH = 64
STEPS = 12
QUICK_STEPS = 4
CLIP = 5.0
WARMUP_EPOCHS = 1.0
ITERS_PER_EPOCH = 782  # CIFAR-100: 50,000 training images at batch 64
TEACHER = "cifar_resnet56"
TEACHER_TOP1 = 0.7
SCALES = (1e-3, 1e-2, 1e-1, 1.0)
QUICK_SCALES = (1e-3, 1e-1, 1.0)


@dataclass(frozen=True)
class Student:
    """A student: a distkd model name, the side its inputs are resized to, its base lr and constructor kwargs."""

    name: str
    image_size: int = 32
    lr: float = 0.05
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """A loss (a key of ``loss_terms()``) and the mitigations the trainer would apply."""

    label: str
    loss: str
    warmup: bool = False
    clip: float | None = None


STUDENTS = (
    Student("cifar_resnet8x4", 32, 0.05),
    Student("cifar_mobile_half", 32, 0.01),  # the MobileNetV2 of dist_resnet50-mobilenetv2.yaml
    Student("tv_mobilenet_v3_small", 64, 0.05),
    Student("timm_mobilenetv3_small_100", 64, 0.05),
)
# Not in the default run (it would pass 5 minutes); ``--students cifar_shufflev2,...`` picks them. The other
# students of the bundled DIST configs, with their configs' lr (the ImageNet B2 ones use RMSprop there, SGD here).
EXTRA_STUDENTS = (
    Student("cifar_shufflev1", 32, 0.01),
    Student("cifar_shufflev2", 32, 0.01),
    Student("cifar_resnet20", 32, 0.05),
    Student("cifar_resnet32", 32, 0.05),
    Student("cifar_vgg8", 32, 0.05),
    Student("cifar_wrn_16_2", 32, 0.05),
    Student("cifar_wrn_40_1", 32, 0.05),
    Student("tv_mobilenet_v3_large", 64, 0.05),
    Student("mobilenetv1", 64, 0.1),
    Student("timm_resnet18", 64, 0.1),
    Student("tv_mobilenet_v2", 64, 0.048),
    Student("timm_tf_efficientnet_b0", 64, 0.048),
)
QUICK_STUDENTS = (Student("cifar_mobile_half", 32, 0.01), Student("tv_mobilenet_v3_small", 64, 0.05))

VARIANTS = (
    Variant("CE", "CE"),
    Variant("CE + KD(tau 4)", "KD"),
    Variant("CE + DIST(2,2,4)", "DIST(2,2,4)"),
    Variant("CE + DIST(1,1,1)", "DIST(1,1,1)"),
    Variant("CE + DIST(2,2,4), warm-up", "DIST(2,2,4)", warmup=True),
    Variant("CE + DIST(2,2,4), clip 5", "DIST(2,2,4)", clip=CLIP),
    Variant("CE + DIST(2,2,4), warm-up + clip 5", "DIST(2,2,4)", warmup=True, clip=CLIP),
)


def loss_terms() -> dict[str, nn.Module | None]:
    """The distillation term added to CE (weight 1) for each loss key; ``None``: CE alone."""
    return {
        "CE": None,
        "KD": KD(tau=4.0),
        "DIST(2,2,4)": DIST(beta=2.0, gamma=2.0, tau=4.0),
        "DIST(1,1,1)": DIST(beta=1.0, gamma=1.0, tau=1.0),
    }


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    import timm
    import torchvision

    return {
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "malloc": {k: os.environ.get(k, "in-process") for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")},
    }


def make_data(steps: int, batch: int, seed: int, teacher: str = TEACHER) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(images (steps, B, 3, 32, 32), teacher logits (steps, B, C), labels (steps, B), teacher scale)``.

    The fixed random teacher of the module docstring: centred per class, standardised, scaled to a mean
    top-1 probability of ``TEACHER_TOP1``.
    """
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(steps * batch, 3, 32, 32, generator=gen)
    torch.manual_seed(seed + 1)
    net = create_model(teacher, num_classes=NUM_CLASSES).eval()
    with torch.inference_mode():
        raw = torch.cat([net(chunk) for chunk in images.split(256)])
    raw = (raw - raw.mean(0, keepdim=True)) / raw.std(0, keepdim=True)
    lo, hi = 0.0, 100.0  # bisection on the scale: mean top-1 probability grows with it
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if raw.mul(mid).softmax(1).amax(1).mean() < TEACHER_TOP1 else (lo, mid)
    scale = (lo + hi) / 2
    logits = (raw * scale).clone()
    shape = (steps, batch)
    return images.view(*shape, 3, 32, 32), logits.view(*shape, -1), logits.argmax(1).view(shape), scale


def head_of(model: nn.Module) -> nn.Linear:
    """The final classifier: the last ``nn.Linear`` with ``NUM_CLASSES`` outputs."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES]
    if not heads:
        raise ValueError(f"no Linear head with {NUM_CLASSES} outputs in {type(model).__name__}")
    return heads[-1]


def build(student: Student, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(student.name, num_classes=NUM_CLASSES, **student.kwargs)
    return model.to(memory_format=torch.channels_last).train()


def prepare(images: Tensor, size: int) -> Tensor:
    """A batch resized to ``size`` (bilinear) in channels_last."""
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.contiguous(memory_format=torch.channels_last)


def centred_norm(logits: Tensor) -> float:
    """Mean over instances of ``||z_i - mean(z_i)||`` (the scale DIST's inter-class gradient goes with)."""
    return (logits - logits.mean(1, keepdim=True)).norm(dim=1).mean().item()


def total_norm(tensors: Sequence[Tensor | None]) -> float:
    norms = [t.detach().norm() for t in tensors if t is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def trajectory(
    student: Student,
    variant: Variant,
    data: tuple[Tensor, Tensor, Tensor],
    init: dict[str, Tensor],
    seed: int,
) -> list[dict[str, float]]:
    """``len(data[0])`` SGD steps of ``variant`` from the weights ``init``; one record per step.

    A non-finite loss or gradient norm is recorded and ends the run.
    """
    images, teacher, labels = data
    model = build(student, seed)
    model.load_state_dict(init)
    term = loss_terms()[variant.loss]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=student.lr, momentum=0.9, weight_decay=5e-4)
    factor: Callable[[float], float] = (
        lr_factor(ScheduleConfig(name="constant", warmup_epochs=WARMUP_EPOCHS), student.lr, 1e9)
        if variant.warmup
        else (lambda epoch: 1.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step / ITERS_PER_EPOCH))
    records = []
    for step in range(len(images)):
        x = prepare(images[step], student.image_size)
        logits = model(x)
        ce = F.cross_entropy(logits, labels[step])
        loss = ce if term is None else ce + term(logits, teacher[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = variant.clip if variant.clip is not None else math.inf
        grad = nn.utils.clip_grad_norm_(params, max_norm).item()
        records.append({
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "grad_norm": grad,
            "loss": loss.item(),
            "ce": ce.item(),
            "logit_norm": centred_norm(logits.detach()),
        })
        if not (math.isfinite(grad) and math.isfinite(loss.item())):
            break
        optimizer.step()
        scheduler.step()
    return records


def scale_sweep(
    student: Student, data: tuple[Tensor, Tensor, Tensor], init: dict[str, Tensor], scales: Sequence[float], seed: int
) -> list[dict[str, object]]:
    """Step-0 gradient norms with the head's weight and bias multiplied by each of ``scales``.

    The body runs once (its features do not depend on the head); each loss backpropagates through it.
    """
    images, teacher, labels = (t[0] for t in data)
    model = build(student, seed)
    model.load_state_dict(init)
    head = head_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    captured: list[Tensor] = []
    hook = head.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        model(prepare(images, student.image_size))
    finally:
        hook.remove()
    features = captured[-1]
    rows = []
    terms = loss_terms()
    body = [p for p in params if p is not head.weight and p is not head.bias]
    for scale in scales:
        # A head initialised at scale x the default: its weight and bias are leaves of their own.
        weight = (head.weight * scale).detach().requires_grad_()
        bias = (head.bias * scale).detach().requires_grad_()
        logits = F.linear(features, weight, bias)
        row: dict[str, object] = {
            "scale": scale,
            "logit_std": logits.detach().std().item(),
            "logit_norm": centred_norm(logits.detach()),
        }
        for key, term in terms.items():
            ce = F.cross_entropy(logits, labels)
            loss = ce if term is None else ce + term(logits, teacher)
            grads = torch.autograd.grad(loss, [logits, weight, bias, *body], retain_graph=True, allow_unused=True)
            row[f"logit_grad {key}"] = total_norm(grads[:1])
            row[f"grad {key}"] = total_norm(grads[1:])
        rows.append(row)
    return rows


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def run_benchmark(
    students: Sequence[Student] = STUDENTS,
    variants: Sequence[Variant] = VARIANTS,
    steps: int = STEPS,
    scales: Sequence[float] = SCALES,
    batch: int = BATCH,
    seed: int = 0,
    teacher: str = TEACHER,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, object]:
    """Everything the tables show: ``{"teacher", "students": [{student, init, runs, sweep}], "seconds"}``.

    ``runs`` maps each variant's label to its per-step records; ``sweep`` lists one row per scale.
    """
    start = time.perf_counter()
    images, logits, labels, teacher_scale = make_data(steps, batch, seed, teacher)
    data = (images, logits, labels)
    out: dict[str, object] = {
        "teacher": {
            "name": teacher,
            "scale": teacher_scale,
            "top1_prob": logits.softmax(-1).amax(-1).mean().item(),
            "classes_used": labels.unique().numel(),
        },
        "students": [],
    }
    log(f"# teacher ready ({time.perf_counter() - start:.1f} s)")
    for student in students:
        t0 = time.perf_counter()
        init = {k: v.clone() for k, v in build(student, seed).state_dict().items()}
        runs = {v.label: trajectory(student, v, data, init, seed) for v in variants}
        sweep = scale_sweep(student, data, init, scales, seed) if scales else []
        out["students"].append({"student": asdict(student), "runs": runs, "sweep": sweep})
        log(f"# {student.name}: {time.perf_counter() - t0:.1f} s")
    out["seconds"] = time.perf_counter() - start
    return out


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return f"{x:.2e}"


def trajectory_table(result: dict[str, object], marks: Sequence[int]) -> list[str]:
    lines = [
        "| student (input, lr) | variant | grad norm at steps " + ", ".join(map(str, marks))
        + " | max grad norm | CE at steps " + ", ".join(map(str, marks)) + " | ‖z - mean z‖ first → last |",
        "|---|---|---|---:|---|---|",
    ]
    for entry in result["students"]:
        s = entry["student"]
        who = f"{s['name']} ({s['image_size']}², lr {s['lr']})"
        for label, recs in entry["runs"].items():
            at = [r for r in recs if r["step"] in marks]
            grads = " / ".join(fmt(r["grad_norm"]) for r in at)
            ces = " / ".join(fmt(r["ce"]) for r in at)
            peak = max(r["grad_norm"] for r in recs)
            cut = "" if len(recs) == len(result["students"][0]["runs"]["CE"]) else f" (stopped at {len(recs) - 1})"
            lines.append(
                f"| {who} | {label} | {grads} | {fmt(peak)} | {ces}{cut} "
                f"| {fmt(recs[0]['logit_norm'])} → {fmt(recs[-1]['logit_norm'])} |"
            )
            who = ""
    return lines


def summary_table(result: dict[str, object]) -> list[str]:
    """One line per student: its logits at init, the step-0 gradient norms, and CE after the last step."""
    labels = [v.label for v in VARIANTS]
    step0 = [lab for lab in labels if not lab.endswith(("warm-up", "clip 5"))]
    dist = "CE + DIST(2,2,4)"
    tails = ["CE", dist, *(lab for lab in labels if lab.startswith(dist + ","))]
    lines = [
        "| student (input, lr) | logit std at init | ‖z - mean z‖ | step-0 grad norm: "
        + " / ".join(lab.removeprefix("CE + ") for lab in step0)
        + " | DIST(2,2,4) / CE | CE at the last step: "
        + " / ".join(lab.replace("CE + DIST(2,2,4), ", "").replace("CE + ", "") for lab in tails) + " |",
        "|---|---:|---:|---|---:|---|",
    ]
    for entry in result["students"]:
        s, runs = entry["student"], entry["runs"]
        init = next((row for row in entry["sweep"] if row["scale"] == 1.0), None)
        std = fmt(init["logit_std"]) if init else ""
        grads = [runs[lab][0]["grad_norm"] for lab in step0 if lab in runs]
        ratio = runs[dist][0]["grad_norm"] / runs["CE"][0]["grad_norm"] if dist in runs and "CE" in runs else math.nan
        last = " / ".join(fmt(runs[lab][-1]["ce"]) for lab in tails if lab in runs)
        steps = max(len(recs) for recs in runs.values())
        lines.append(
            f"| {s['name']} ({s['image_size']}², lr {s['lr']}) | {std} | {fmt(runs['CE'][0]['logit_norm'])} "
            f"| {' / '.join(fmt(g) for g in grads)} | {ratio:.0f}x | {last} (step {steps - 1}) |"
        )
    return lines


def sweep_table(result: dict[str, object]) -> list[str]:
    keys = list(loss_terms())
    lines = [
        "| student | head scale | logit std | ‖z - mean z‖ | " + " | ".join(f"grad {k}" for k in keys)
        + " | logit grad DIST(2,2,4) |",
        "|---|---:|---:|---:|" + "---:|" * (len(keys) + 1),
    ]
    slopes = []
    for entry in result["students"]:
        rows = entry["sweep"]
        if not rows:
            continue
        name = entry["student"]["name"]
        for row in rows:
            cells = " | ".join(fmt(row[f"grad {k}"]) for k in keys)
            lines.append(
                f"| {name} | {row['scale']:g} | {fmt(row['logit_std'])} | {fmt(row['logit_norm'])} | {cells} "
                f"| {fmt(row['logit_grad DIST(2,2,4)'])} |"
            )
            name = ""
        small = rows[: max(2, len(rows) - 1)]  # the smallest scales, where the linearisation holds
        norms = [r["logit_norm"] for r in small]
        logit_slope = loglog_slope(norms, [r["logit_grad DIST(2,2,4)"] for r in small])
        param_slope = loglog_slope(norms, [r["grad DIST(2,2,4)"] for r in small])
        slopes.append(f"{entry['student']['name']} {logit_slope:.2f} / {param_slope:.2f}")
    lines.append("")
    lines.append("Log-log slope of DIST(2,2,4)'s gradient norm against ‖z - mean z‖, w.r.t. the logits / all "
                 "parameters (all but the largest scale; -1 is 1 / ‖z - mean z‖): " + ", ".join(slopes) + ".")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two cheap students, fewer steps and scales")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"SGD steps per run (default {STEPS}; quick {QUICK_STEPS})")
    parser.add_argument("--students", default=None, help="comma-separated names (default and extra students)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the full result (every step) to this file")
    args = parser.parse_args()
    from distkd.engine.cpu import tune_malloc

    tuned = tune_malloc()
    torch.set_num_threads(args.threads)
    students = QUICK_STUDENTS if args.quick else STUDENTS
    if args.students:
        wanted = args.students.split(",")
        known = {s.name: s for s in (*STUDENTS, *EXTRA_STUDENTS)}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            parser.error(f"unknown student(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        students = [known[name] for name in wanted]
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    scales = QUICK_SCALES if args.quick else SCALES
    info = machine()
    if not tuned:
        info["malloc"] = {k: os.environ.get(k, "glibc default") for k in info["malloc"]}
    print(f"# {info['utc']} UTC; {info['cpu_count']} CPUs ({info['processor']}), load average "
          + " ".join(f"{x:.2f}" for x in info["loadavg"])
          + f"; torch {info['torch']}, torchvision {info['torchvision']}, timm {info['timm']}; "
          f"threads={info['threads']}; malloc {info['malloc']}", flush=True)
    result = run_benchmark(students, VARIANTS, steps, scales, BATCH, args.seed,
                           log=lambda line: print(line, flush=True))
    result["machine"] = info
    result["machine"]["loadavg_end"] = os.getloadavg()
    t = result["teacher"]
    print(f"# teacher: random {t['name']}, logits standardised per class, x{t['scale']:.2f} "
          f"(mean top-1 prob {t['top1_prob']:.2f}, {t['classes_used']} classes used as labels); "
          f"batch {BATCH}, {steps} steps; {result['seconds']:.0f} s; load average at end "
          + " ".join(f"{x:.2f}" for x in result["machine"]["loadavg_end"]))
    marks = sorted({0, 1, 2, steps // 2, steps - 1} & set(range(steps)))
    print()
    print("\n".join(summary_table(result)))
    print()
    print("\n".join(trajectory_table(result, marks)))
    print()
    print("\n".join(sweep_table(result)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
