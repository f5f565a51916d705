"""Teacher strength: does KD fall behind DIST as the teacher gets stronger?

The embedded studies of ``distkd reproduce pairs-strength`` (default: the demo's silhouette pairs) and
``silhouettes-strength`` (``--table``), the paper's Figure 1 in miniature: one tiny student
(``small_cnn3_w4``) distilled with KD and with DIST from CNN teachers of growing width (``small_cnn6_w4`` ...),
several seeds each, plus the student trained alone. The bundled demo configs give the settings
(``demo/pairs_kd.yaml`` / ``demo/kd.yaml``: 0.1 CE + 0.9 KD at tau 4; ``demo/pairs_dist.yaml`` /
``demo/dist.yaml``: CE + 2 x DIST at tau 4). It writes the reproduce table, a plot of student accuracy against
teacher accuracy (``benchmarks/<table>.png``) and, with ``--results``, its section of RESULTS.md.

    python benchmarks/teacher_strength.py                       # 3 seeds, the demo's epochs, 2 processes
    python benchmarks/teacher_strength.py --epochs 1 --seeds 1  # a quick check of the whole path
    python benchmarks/teacher_strength.py --results benchmarks/RESULTS.md

Runs go to ``--out`` (default ``runs/<table>``); finished runs are reused, so an interrupted
study continues where it stopped. ``--jobs`` processes share the work, one torch thread each: first every
teacher with its KD seeds (and the student alone), then the DIST seeds, then one pass that only reads
the finished runs back and writes the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from results_md import write_section

from distkd.models import create_model
from distkd.reproduce import STRENGTH_STUDENT, STRENGTH_STUDIES, reproduce

SECTIONS = {"silhouettes-strength": "## Teacher strength (silhouettes)",
            "pairs-strength": "## Teacher strength (silhouette pairs)"}
TITLES = {"silhouettes-strength": "Silhouettes", "pairs-strength": "Silhouette pairs"}
DATA = {  # table -> (the data in words, classes, KD config and settings, DIST config and settings)
    "silhouettes-strength": ("the embedded silhouettes", 10, "`demo/kd.yaml` (0.1 CE + 0.9 KD, tau 4)",
                             "`demo/dist.yaml` (CE + 2 x DIST, tau 4)"),
    "pairs-strength": ("the demo's silhouette pairs (100 classes)", 100,
                       "`demo/pairs_kd.yaml` (0.1 CE + 0.9 KD, tau 4, lr 0.2)",
                       "`demo/pairs_dist.yaml` (CE + 2 x DIST, tau 1, lr 0.4)"),
}


def _run(table: str, rows: list[str], seeds: int, out: Path, overrides: list[str]) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return reproduce(table, rows, seeds, out, overrides)


def run_study(table: str, seeds: int, out: Path, overrides: list[str], jobs: int) -> str:
    """Train everything (``jobs`` processes), then return the markdown table of :func:`reproduce`."""
    largest_first = list(reversed(STRENGTH_STUDIES[table][1]))
    phases = [[[f"kd-{t}"] for t in largest_first] + [["alone"]], [[f"dist-{t}"] for t in largest_first]]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for tasks in phases:
            for future in [pool.submit(_run, table, rows, seeds, out, overrides) for rows in tasks]:
                future.result()
    return _run(table, [], seeds, out, overrides)  # every run is finished: this only reads them back


def load_rows(table: str, out: Path) -> dict[str, dict]:
    return {row["row"]: row for row in json.loads((out / f"{table}.json").read_text())["rows"]}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(table: str, rows: dict[str, dict], path: Path) -> None:
    """Student test top-1 (mean ± std over seeds) against the teacher's top-1, KD and DIST."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(("kd", "dist")):
        xs, ys, es = [], [], []
        for teacher in STRENGTH_STUDIES[table][1]:
            row = rows[f"{method}-{teacher}"]
            mean, std = _stats(row["scores"])
            xs.append(row["teacher"])
            ys.append(mean)
            es.append(std)
        order = sorted(range(len(xs)), key=xs.__getitem__)  # join the points left to right
        ax.errorbar([xs[j] for j in order], [ys[j] for j in order], yerr=[es[j] for j in order], marker="o",
                    capsize=3, color=f"C{i}", label=method.upper())
    alone, spread = _stats(rows["alone"]["scores"])
    ax.axhline(alone, color="gray", linestyle="--", label="student alone")
    ax.axhspan(alone - spread, alone + spread, color="gray", alpha=0.15)
    for teacher in STRENGTH_STUDIES[table][1]:
        x = rows[f"kd-{teacher}"]["teacher"]
        ax.annotate(teacher.removeprefix("small_cnn6_"), (x, ax.get_ylim()[0]), fontsize=7, ha="center",
                    va="bottom", color="dimgray")
    ax.set(xlabel="teacher top-1 on val (%)", ylabel=f"student ({STRENGTH_STUDENT}) test top-1 (%)",
           title=f"{TITLES[table]}: student accuracy vs teacher accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _params(name: str, num_classes: int) -> int:
    return sum(p.numel() for p in create_model(name, num_classes=num_classes, in_chans=1).parameters())


def section(table: str, rows: dict[str, dict], args: argparse.Namespace, seconds: float, png: Path) -> str:
    """This benchmark's RESULTS.md section: conditions, one line per teacher, the plot."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    epochs = "the demo configs'" if args.epochs is None else str(args.epochs)
    data, classes, kd_config, dist_config = DATA[table]
    lines = [
        SECTIONS[table], "",
        f"`python benchmarks/teacher_strength.py --table {table} --seeds {args.seeds} --jobs {args.jobs}"
        + (f" --epochs {args.epochs}" if args.epochs is not None else "") + f"` ({when}; {os.cpu_count()}-core CPU "
        f"({cpu}), shared with other jobs; torch {torch.__version__}; {seconds / 60:.1f} min wall).",
        f"Student `{STRENGTH_STUDENT}` ({_params(STRENGTH_STUDENT, classes):,} parameters) on {data}, "
        f"{epochs} epochs per run (teachers and students), {args.seeds} student seeds per cell, teachers trained once "
        f"(seed 0). KD: {kd_config}; DIST: {dist_config}. "
        "Student: test top-1 (%) of the best-on-val epoch, mean ± std over seeds; teacher: top-1 on val.", "",
        "| teacher | params | teacher top-1 | KD student | DIST student | DIST − KD |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for teacher in STRENGTH_STUDIES[table][1]:
        kd, dist = rows[f"kd-{teacher}"], rows[f"dist-{teacher}"]
        (kd_m, kd_s), (di_m, di_s) = _stats(kd["scores"]), _stats(dist["scores"])
        lines.append(f"| {teacher} | {_params(teacher, classes):,} | {kd['teacher']:.2f} | {kd_m:.2f} ± {kd_s:.2f} | "
                     f"{di_m:.2f} ± {di_s:.2f} | {di_m - kd_m:+.2f} |")
    alone_m, alone_s = _stats(rows["alone"]["scores"])
    lines += [f"| (student alone) | | | {alone_m:.2f} ± {alone_s:.2f} | | |", "",
              f"![teacher strength]({png.name})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--table", choices=sorted(STRENGTH_STUDIES), default="pairs-strength",
                        help="the study (default pairs-strength: the demo's silhouette pairs)")
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per cell (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the demo configs')")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    parser.add_argument("--out", type=Path, help="run folder (default runs/<table>)")
    parser.add_argument("--png", type=Path, help="the plot (default benchmarks/teacher_strength.png for the "
                        "silhouettes, benchmarks/pairs_strength.png for the pairs)")
    parser.add_argument("--results", type=Path, help="write the section of this markdown file (RESULTS.md)")
    args = parser.parse_args()
    table = args.table
    out = args.out or Path("runs") / table
    png = args.png or Path(__file__).with_name({"silhouettes-strength": "teacher_strength.png"}.get(
        table, "pairs_strength.png"))
    overrides = ["train.threads=1", "train.progress=none"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    start = time.perf_counter()
    markdown = run_study(table, args.seeds, out, overrides, args.jobs)
    seconds = time.perf_counter() - start
    rows = load_rows(table, out)
    plot(table, rows, png)
    print(markdown)
    text = section(table, rows, args, seconds, png)
    print(text)
    if args.results:
        write_section(args.results, SECTIONS[table], text)
        print(f"wrote the '{SECTIONS[table][3:]}' section of {args.results}")


if __name__ == "__main__":
    main()
