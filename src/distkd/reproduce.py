"""``distkd reproduce``: re-run a published table and set our numbers beside the paper's.

A :class:`Table` is a list of rows; a :class:`Row` is one student config (bundled, plus overrides) and
the teacher it needs. :func:`reproduce` trains each teacher it lacks once (rows sharing a teacher share
the run), trains every row for ``seeds`` seeds in-process through :func:`distkd.api.train`, and writes
``<out>/<table>.md`` (ours mean ± std beside the published number, with the gap) and ``<out>/<table>.json``.

Layout under ``out``: ``teachers/<key>/`` (teacher runs, shared by all tables) and
``<table>/<row>/seed<k>/`` (student runs). Finished runs are reused, interrupted ones resumed, so an
interrupted reproduction continues where it stopped; a finished run with another config is refused.

The score of a run is ``best_test``: test top-1 of the epoch that was best on the validation split. On
CIFAR-100 (``data.val_size: 0``) the validation split *is* the test set, so this is the best test
accuracy over training, the convention of the published CIFAR tables.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from distkd.config import load_config
from distkd.errors import ConfigError, UnknownNameError
from distkd.published import SOURCES, Published, published
from distkd.registry import nearest


@dataclass(frozen=True)
class Run:
    """One ``distkd train`` invocation: a bundled config name (or path) and dotted overrides."""

    config: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Teacher:
    """A teacher trained from scratch by its own config; ``key`` names its run (shared across rows)."""

    key: str
    run: Run


@dataclass(frozen=True)
class Row:
    """A student run and the teacher it distils from.

    ``teacher`` None: the row needs no teacher, or (``hub_teacher``) its config loads pretrained hub
    weights; ``--teacher-ckpt ROW=PATH`` then loads a local file instead (``pretrained`` turned off).
    """

    name: str
    student: Run
    teacher: Teacher | None = None
    hub_teacher: bool = False


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    rows: tuple[Row, ...]
    note: str = ""
    metric: str = "Top-1"  # what the scores are (the runs' ``summary["metric"]``)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        names = [r.name for r in self.rows]
        raise UnknownNameError(f"table '{self.name}' has no row '{name}'{nearest(name, names)}; "
                               f"rows: {', '.join(names)} (see `distkd reproduce --list`)")


# ----------------------------------------------------------------------------- the tables

# (teacher, student) of every CIFAR-100 row; the student's config name uses its published name.
CIFAR_PAIRS: tuple[tuple[str, str], ...] = (
    ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"),
    ("resnet50", "mobilenetv2"), ("resnet32x4", "shufflev1"), ("resnet32x4", "shufflev2"),
    ("vgg13", "vgg8"), ("resnet110", "resnet32"), ("wrn_40_2", "wrn_16_2"),
)
IMAGENET_ROWS: dict[str, tuple[str, ...]] = {
    "b1": ("resnet34-resnet18", "resnet50-mobilenetv1", "resnet50-resnet18", "resnet101-resnet18",
           "resnet152-resnet18", "resnet50-resnet34", "resnet101-resnet34", "resnet152-resnet34"),
    "b2": ("resnet50sb-resnet18", "resnet50sb-resnet34", "resnet50sb-mobilenetv2", "resnet50sb-efficientnet_b0",
           "swinl-resnet50"),
    "b3": ("swinl-swint",),
}
# The pairs with a published KD (T=4) number: each has a kdt4 config beside its DIST one (imagenet/<s>_kdt4_<pair>).
IMAGENET_KD_ROWS: dict[str, tuple[str, ...]] = {
    "b1": tuple(r for r in IMAGENET_ROWS["b1"] if r != "resnet50-mobilenetv1"),
    "b2": IMAGENET_ROWS["b2"],
    "b3": IMAGENET_ROWS["b3"],
}
# The teacher-strength studies: one student, teachers of growing width (see benchmarks/teacher_strength.py), on
# the silhouettes (demo/*.yaml) and on the demo's silhouette pairs (demo/pairs_*.yaml; without w64, whose 15 epochs
# cost about 4x the w32 teacher's). A study: table name -> (config prefix, teachers).
STRENGTH_STUDENT = "small_cnn3_w4"
STRENGTH_TEACHERS: tuple[str, ...] = ("small_cnn6_w4", "small_cnn6_w8", "small_cnn6_w16", "small_cnn6_w32",
                                      "small_cnn6_w64")
STRENGTH_STUDIES: MappingProxyType[str, tuple[str, tuple[str, ...]]] = MappingProxyType({
    "silhouettes-strength": ("demo/", STRENGTH_TEACHERS),
    "pairs-strength": ("demo/pairs_", STRENGTH_TEACHERS[:-1]),
})
STRENGTH_METHODS: tuple[str, ...] = ("kd", "dist")
# The comparison of distillation methods on CIFAR_PAIRS: RepDistiller's (Tian et al., ICLR 2020, Tables 1-2) and
# later ones, each with its authors' settings. A row is ``METHOD-TEACHER-STUDENT``.
METHODS_TABLE = "cifar100-methods"
METHODS: tuple[str, ...] = ("kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd",
                            "crd_kd", "reviewkd", "dkd", "ls_kd", "mlkd", "ctkd", "nkd", "wttm", "dist")
# FSP matches stage features channel by channel: RepDistiller runs it only on pairs of equal widths.
FSP_PAIRS: tuple[tuple[str, str], ...] = (("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"),
                                          ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"))
# Methods whose configs come with the DIST tables (cifar100/<method>_*.yaml); the rest are in cifar100/baselines/.
SHARED_CONFIGS: tuple[str, ...] = ("kd", "dkd", "dist")


def _cifar_table(method: str, name: str, title: str) -> Table:
    rows = tuple(
        Row(f"{t}-{s}", Run(f"cifar100/{method}_{t}-{s}.yaml"),
            Teacher(f"cifar100-{t}", Run(f"cifar100/teacher_{t}.yaml")))
        for t, s in CIFAR_PAIRS
    )
    return Table(name, title, rows, "teachers trained here by cifar100/teacher_*.yaml unless --teacher-ckpt is given")


def _cifar_baselines() -> Table:
    teachers = dict.fromkeys(t for t, _ in CIFAR_PAIRS)
    rows = [Row(t, Run(f"cifar100/teacher_{t}.yaml")) for t in teachers]
    rows += [Row(s, Run(f"cifar100/student_{s}.yaml")) for s in dict.fromkeys(s for _, s in CIFAR_PAIRS)]
    return Table("cifar100-baselines", "CIFAR-100, teachers and students trained alone (CE only)", tuple(rows))


def _methods_table() -> Table:
    rows = []
    for method in METHODS:
        folder = "cifar100" if method in SHARED_CONFIGS else "cifar100/baselines"
        for t, s in CIFAR_PAIRS:
            if method != "fsp" or (t, s) in FSP_PAIRS:
                rows.append(Row(f"{method}-{t}-{s}", Run(f"{folder}/{method}_{t}-{s}.yaml"),
                                Teacher(f"cifar100-{t}", Run(f"cifar100/teacher_{t}.yaml"))))
    title = "CIFAR-100, distillation methods compared on RepDistiller's pairs (authors' settings)"
    return Table(METHODS_TABLE, title, tuple(rows), "teachers trained here by cifar100/teacher_*.yaml unless "
                 "--teacher-ckpt is given; AB, FSP and FT run their 30-epoch pre-training stage first (see the row "
                 "notes)")


def _imagenet_table(strategy: str) -> Table:
    rows = tuple(Row(r, Run(f"imagenet/{strategy}_{r}.yaml"), hub_teacher=True) for r in IMAGENET_ROWS[strategy])
    return Table(f"imagenet-{strategy}", f"ImageNet, DIST, training strategy {strategy.upper()}", rows,
                 "teachers use pretrained hub weights (teacher.kwargs.pretrained); set data.root")


def _imagenet_kd_vs_dist() -> Table:
    rows = tuple(Row(f"{method}-{strategy}-{pair}", Run(f"imagenet/{strategy}_{'kdt4_' * (method == 'kd')}{pair}.yaml"),
                     hub_teacher=True)
                 for strategy, pairs in IMAGENET_KD_ROWS.items() for pair in pairs for method in ("kd", "dist"))
    return Table("imagenet-kd-vs-dist", "ImageNet, KD (T=4: 0.9 CE + KD) beside DIST, strategies B1-B3", rows,
                 "teachers use pretrained hub weights (teacher.kwargs.pretrained); set data.root")


def _strength_table(name: str) -> Table:
    prefix, teachers = STRENGTH_STUDIES[name]
    data = name.removesuffix("-strength")
    rows = [Row("alone", Run(f"{prefix}student.yaml", (f"model.name={STRENGTH_STUDENT}",)))]
    for teacher in teachers:
        trained = Teacher(f"{data}-{teacher}", Run(f"{prefix}teacher.yaml", (f"model.name={teacher}",)))
        rows += [Row(f"{m}-{teacher}", Run(f"{prefix}{m}.yaml", (f"model.name={STRENGTH_STUDENT}",
                                                                 f"teacher.name={teacher}")), trained)
                 for m in STRENGTH_METHODS]
    title = {"silhouettes": "Silhouettes", "pairs": "Silhouette pairs"}[data]
    return Table(name, f"{title}: {STRENGTH_STUDENT} student, KD vs DIST as the teacher grows",
                 tuple(rows), "embedded data; no published numbers (our own study)")


def _coco_table() -> Table:
    """The paper's COCO rows: per family, the student alone, then KD / DIST / DIST+mimic from the X101 teacher."""
    rows = []
    for family in ("retinanet", "fasterrcnn"):
        teacher = Teacher(f"coco-{family}_x101", Run(f"coco/teacher_{family}_x101.yaml"))
        rows.append(Row(f"{family}-r50", Run(f"coco/student_{family}_r50.yaml")))
        rows += [Row(f"{m}-{family}_x101-r50", Run(f"coco/{m}_{family}_x101-r50.yaml"), teacher)
                 for m in ("kd", "dist", "dist+mimic")]
    return Table("coco", "COCO detection, DIST on RetinaNet and Faster R-CNN (2x schedule)", tuple(rows),
                 "teachers trained here by coco/teacher_*.yaml unless --teacher-ckpt is given; set data.root; "
                 "torchvision has no Cascade Mask R-CNN, so the Faster R-CNN teacher is a Faster R-CNN X101",
                 metric="COCO box mAP")


TABLES: MappingProxyType[str, Table] = MappingProxyType({t.name: t for t in (
    _cifar_table("dist", "cifar100", "CIFAR-100, DIST (CE + 2 x DIST, tau 4)"),
    _cifar_table("kd", "cifar100-kd", "CIFAR-100, KD (0.1 CE + 0.9 KD, tau 4)"),
    _cifar_table("dkd", "cifar100-dkd", "CIFAR-100, DKD (mdistiller settings)"),
    _cifar_baselines(),
    _methods_table(),
    _imagenet_table("b1"), _imagenet_table("b2"), _imagenet_table("b3"), _imagenet_kd_vs_dist(),
    *map(_strength_table, STRENGTH_STUDIES),
    _coco_table(),
)})


def get_table(name: str) -> Table:
    """The table called ``name``; an unknown name lists the known ones."""
    if name not in TABLES:
        raise UnknownNameError(f"unknown table '{name}'{nearest(name, list(TABLES))}; known: {', '.join(TABLES)}")
    return TABLES[name]


def list_tables() -> str:
    """Every table with its rows, one table per paragraph (what ``distkd reproduce --list`` prints)."""
    blocks = []
    for table in TABLES.values():
        lines = [f"{table.name}: {table.title}"]
        for row in table.rows:
            pub = published(table.name, row.name)
            number = f"{pub.accuracy:.2f}" if pub is not None and pub.accuracy is not None else "-"
            lines.append(f"  {row.name:<30} published {number:>6}  {row.student.config}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------- running


@dataclass
class RowResult:
    """What the runs of one row gave: ``scores`` (best_test per seed), the teacher's top-1 on val."""

    row: str
    scores: list[float] = field(default_factory=list)
    teacher: float | None = None
    run_dirs: list[str] = field(default_factory=list)


def parse_teacher_checkpoints(items: Sequence[str], table: Table) -> dict[str, str]:
    """``["ROW=PATH", "KEY=PATH"]`` -> ``{row or teacher key: path}``, checked against ``table``."""
    with_teacher = [r for r in table.rows if r.teacher or r.hub_teacher]
    known = {r.name for r in with_teacher} | {r.teacher.key for r in with_teacher if r.teacher}
    out = {}
    for item in items:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ConfigError(f"--teacher-ckpt '{item}' is not ROW=PATH (e.g. resnet56-resnet20=teacher.pt)")
        if key not in known:
            raise UnknownNameError(f"--teacher-ckpt: table '{table.name}' has no row or teacher '{key}'"
                                   f"{nearest(key, sorted(known))}; rows with a teacher: "
                                   f"{', '.join(r.name for r in with_teacher) or 'none'}")
        out[key] = path
    return out


def plan(table: Table, rows: Sequence[str] | None, seeds: int, out: Path, overrides: Sequence[str] = (),
         teacher_ckpts: dict[str, str] | None = None) -> list[tuple[str, Run]]:
    """The runs :func:`reproduce` makes, in order: ``(role, run)`` with role ``teacher`` or the row name.

    Every run carries its final overrides (run folder, seed, teacher checkpoint and, for students that replay a
    teacher-output cache, the teacher's shared cache folder, then ``overrides``).
    """
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    chosen = [table.row(r) for r in rows] if rows else list(table.rows)
    ckpts = teacher_ckpts or {}
    steps: list[tuple[str, Run]] = []
    trained: set[str] = set()
    for row in chosen:
        teacher_opts: tuple[str, ...] = ()
        if row.hub_teacher and row.name in ckpts:
            teacher_opts = (f"teacher.checkpoint={ckpts[row.name]}", "teacher.kwargs.pretrained=false")
        elif row.teacher is not None:
            given = ckpts.get(row.name, ckpts.get(row.teacher.key))
            if given is None:
                folder = out / "teachers"
                if row.teacher.key not in trained:
                    trained.add(row.teacher.key)
                    extra = (f"out_dir={folder}", f"name={row.teacher.key}", *overrides)
                    steps.append(("teacher", Run(row.teacher.run.config, row.teacher.run.overrides + extra)))
                given = str(folder / row.teacher.key / "checkpoints" / "best.pt")
            teacher_opts = (f"teacher.checkpoint={given}",)
            if _uses_cache(row.student, overrides):
                # every student of this teacher replays one teacher-output cache; it records the teacher checkpoint,
                # data and augmentation, so a student that needs another one rebuilds it
                teacher_opts += (f"teacher_cache.dir={out / 'teacher_caches' / row.teacher.key}",)
        for seed in range(seeds):
            extra = (f"out_dir={out / table.name / row.name}", f"name=seed{seed}", f"seed={seed}", *teacher_opts,
                     *overrides)
            steps.append((row.name, Run(row.student.config, row.student.overrides + extra)))
    return steps


def _uses_cache(run: Run, overrides: Sequence[str]) -> bool:
    """Whether ``run`` (with the user's ``overrides``) trains on a teacher-output cache."""
    from distkd.config import resolve_config_path

    return load_config(resolve_config_path(run.config), [*run.overrides, *overrides]).teacher_cache.views > 0


def commands(steps: Sequence[tuple[str, Run]], nproc: int = 1) -> list[str]:
    """The ``distkd train`` command lines equivalent to ``steps`` (what ``--dry-run`` prints); with ``nproc > 1``
    launched by ``torchrun``, each after a ``#`` line giving its batch per process."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    launch = ["distkd"] if nproc == 1 else ["torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "distkd"]
    lines = []
    for _, run in steps:
        lines += [batch_note(run, nproc), shlex.join([*launch, "train", run.config, *run.overrides])]
    return lines


def batch_note(run: Run, nproc: int) -> str:
    """``# batch 256 (global) = 32 per process x 8 processes`` for ``run``; a ConfigError when it does not divide."""
    from distkd.config import resolve_config_path
    from distkd.engine.distributed import process_batch

    cfg = load_config(resolve_config_path(run.config), list(run.overrides))
    each = process_batch(cfg.data.batch_size, nproc)
    return f"# batch {cfg.data.batch_size} (global) = {each} per process x {nproc} process{'es' * (nproc > 1)}"


def check_nproc(nproc: int) -> None:
    """A real reproduction runs in this process: ``--nproc`` must be the number of processes torchrun started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if nproc != world:
        raise ConfigError(f"--nproc {nproc} but {world} process(es) run; launch with torchrun --nproc_per_node={nproc} "
                          "-m distkd reproduce ... (or drop --nproc)")


def reproduce(table_name: str, rows: Sequence[str] | None = None, seeds: int = 1, out: str | Path = "runs/reproduce",
              overrides: Sequence[str] = (), teacher_ckpts: Sequence[str] = ()) -> str:
    """Run ``table_name`` (all rows, or ``rows``) for ``seeds`` seeds; write and return the markdown table.

    ``overrides`` (dotted ``key=value``) apply to every run, teachers included, e.g. ``data.root=~/data``
    or ``train.epochs=1``. ``teacher_ckpts``: ``ROW=PATH`` or ``TEACHER_KEY=PATH`` items that skip
    training that teacher. Runs go through :func:`distkd.api.train`, in this process.
    """
    from distkd.api import run_or_reuse
    from distkd.config import resolve_config_path

    table = get_table(table_name)
    out = Path(out)
    steps = plan(table, rows, seeds, out, overrides, parse_teacher_checkpoints(teacher_ckpts, table))
    results: dict[str, RowResult] = {}
    for role, run in steps:
        cfg = load_config(resolve_config_path(run.config), list(run.overrides))
        summary = run_or_reuse(cfg)
        if role == "teacher":
            continue
        result = results.setdefault(role, RowResult(role))
        result.scores.append(float(summary["best_test"]))
        result.run_dirs.append(str(cfg.run_dir))
        if summary.get("teacher_val"):
            result.teacher = float(summary["teacher_val"][summary.get("metric", "top1")])
    markdown = render(table, list(results.values()), seeds, overrides)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{table.name}.md").write_text(markdown)
    (out / f"{table.name}.json").write_text(json.dumps(
        {"table": table.name, "seeds": seeds, "overrides": list(overrides),
         "rows": [vars(r) for r in results.values()]}, indent=2))
    return markdown


# ----------------------------------------------------------------------------- the report


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def render(table: Table, results: Sequence[RowResult], seeds: int, overrides: Sequence[str] = ()) -> str:
    """The markdown report: one line per row, ours (mean ± std over seeds) beside the published number."""
    lines = [f"## {table.title}", "",
             f"{table.metric} (%) of the best-on-validation epoch on the test split, mean ± std over {seeds} "
             f"seed(s). Gap = ours − published. Teacher ours: the loaded teacher's {table.metric} on the validation "
             "split.", ""]
    if overrides:
        lines += [f"Overrides: `{' '.join(overrides)}`", ""]
    lines += ["| row | teacher ours | teacher published | student alone published | ours | published | gap |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    used: set[str] = set()
    notes: list[str] = []
    for result in results:
        pub = published(table.name, result.row)
        mean, std = mean_std(result.scores)
        ours = f"{mean:.2f} ± {std:.2f}"
        teacher = f"{result.teacher:.2f}" if result.teacher is not None else "-"
        lines.append(f"| {result.row} | {teacher} | {_cell(pub, 'teacher')} | {_cell(pub, 'student')} | {ours} | "
                     f"{_cell(pub, 'accuracy')} | {_gap(mean, pub)} |")
        if pub is not None:
            used |= {pub.source} | ({pub.reference} if pub.reference else set())
            if pub.note:
                notes.append(f"- {result.row}: {pub.note}")
    if used:
        lines += ["", "Sources:", *[f"- {key}: {SOURCES[key]}" for key in sorted(used)]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def _cell(pub: Published | None, attr: str) -> str:
    value = getattr(pub, attr) if pub is not None else None
    if value is None:
        return "-"
    std = pub.std if attr == "accuracy" else None
    return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"


def _gap(mean: float, pub: Published | None) -> str:
    if pub is None or pub.accuracy is None:
        return "-"
    return f"{mean - pub.accuracy:+.2f}"
