"""Teacher strength on the silhouettes: does KD fall behind DIST as the teacher gets stronger?

The embedded study of ``distkd reproduce silhouettes-strength`` (the paper's Figure 1 in miniature):
one tiny student (``small_cnn3_w4``) distilled with KD and with DIST from CNN teachers of growing width
(``small_cnn6_w4`` ... ``small_cnn6_w64``), several seeds each, plus the student trained alone. The
bundled demo configs give the settings (``demo/kd.yaml``: 0.1 CE + 0.9 KD at tau 4; ``demo/dist.yaml``:
CE + 2 x DIST at tau 4). It writes the reproduce table, a plot of student accuracy against teacher
accuracy (``benchmarks/teacher_strength.png``) and, with ``--results``, its section of RESULTS.md.

    python benchmarks/teacher_strength.py                       # 3 seeds, the demo's 15 epochs, 2 processes
    python benchmarks/teacher_strength.py --epochs 1 --seeds 1  # a quick check of the whole path
    python benchmarks/teacher_strength.py --results benchmarks/RESULTS.md

Runs go to ``--out`` (default ``runs/teacher_strength``); finished runs are reused, so an interrupted
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
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from distkd.models import create_model
from distkd.reproduce import STRENGTH_STUDENT, STRENGTH_TEACHERS, reproduce

TABLE = "silhouettes-strength"
SECTION = "## Teacher strength (silhouettes)"


def _run(rows: list[str], seeds: int, out: Path, overrides: list[str]) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return reproduce(TABLE, rows, seeds, out, overrides)


def run_study(seeds: int, out: Path, overrides: list[str], jobs: int) -> str:
    """Train everything (``jobs`` processes), then return the markdown table of :func:`reproduce`."""
    largest_first = list(reversed(STRENGTH_TEACHERS))
    phases = [[[f"kd-{t}"] for t in largest_first] + [["alone"]], [[f"dist-{t}"] for t in largest_first]]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for tasks in phases:
            for future in [pool.submit(_run, rows, seeds, out, overrides) for rows in tasks]:
                future.result()
    return _run([], seeds, out, overrides)  # every run is finished: this only reads them back


def load_rows(out: Path) -> dict[str, dict]:
    return {row["row"]: row for row in json.loads((out / f"{TABLE}.json").read_text())["rows"]}


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(rows: dict[str, dict], path: Path) -> None:
    """Student test top-1 (mean ± std over seeds) against the teacher's top-1, KD and DIST."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, method in enumerate(("kd", "dist")):
        xs, ys, es = [], [], []
        for teacher in STRENGTH_TEACHERS:
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
    for teacher in STRENGTH_TEACHERS:
        x = rows[f"kd-{teacher}"]["teacher"]
        ax.annotate(teacher.removeprefix("small_cnn6_"), (x, ax.get_ylim()[0]), fontsize=7, ha="center",
                    va="bottom", color="dimgray")
    ax.set(xlabel="teacher top-1 on val (%)", ylabel=f"student ({STRENGTH_STUDENT}) test top-1 (%)",
           title="Silhouettes: student accuracy vs teacher accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _params(name: str) -> int:
    return sum(p.numel() for p in create_model(name, num_classes=10, in_chans=1).parameters())


def section(rows: dict[str, dict], args: argparse.Namespace, seconds: float, png: Path) -> str:
    """This benchmark's RESULTS.md section: conditions, one line per teacher, the plot."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = platform.processor() or platform.machine()
    epochs = "the demo's 15" if args.epochs is None else str(args.epochs)
    lines = [
        SECTION, "",
        f"`python benchmarks/teacher_strength.py --seeds {args.seeds} --jobs {args.jobs}"
        + (f" --epochs {args.epochs}" if args.epochs is not None else "") + f"` ({when}; {os.cpu_count()}-core CPU "
        f"({cpu}), shared with other jobs; torch {torch.__version__}; {seconds / 60:.1f} min wall).",
        f"Student `{STRENGTH_STUDENT}` ({_params(STRENGTH_STUDENT):,} parameters) on the embedded silhouettes, "
        f"{epochs} epochs per run (teachers and students), {args.seeds} student seeds per cell, teachers trained once "
        "(seed 0). KD: `demo/kd.yaml` (0.1 CE + 0.9 KD, tau 4); DIST: `demo/dist.yaml` (CE + 2 x DIST, tau 4). "
        "Student: test top-1 (%) of the best-on-val epoch, mean ± std over seeds; teacher: top-1 on val.", "",
        "| teacher | params | teacher top-1 | KD student | DIST student | DIST − KD |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for teacher in STRENGTH_TEACHERS:
        kd, dist = rows[f"kd-{teacher}"], rows[f"dist-{teacher}"]
        (kd_m, kd_s), (di_m, di_s) = _stats(kd["scores"]), _stats(dist["scores"])
        lines.append(f"| {teacher} | {_params(teacher):,} | {kd['teacher']:.2f} | {kd_m:.2f} ± {kd_s:.2f} | "
                     f"{di_m:.2f} ± {di_s:.2f} | {di_m - kd_m:+.2f} |")
    alone_m, alone_s = _stats(rows["alone"]["scores"])
    lines += [f"| (student alone) | | | {alone_m:.2f} ± {alone_s:.2f} | | |", "",
              f"![teacher strength]({png.name})", ""]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (up to the next ``## `` heading) or append it."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seeds", type=int, default=3, help="student seeds per cell (default 3)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: the demo's 15)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one torch thread each (default 2)")
    parser.add_argument("--out", type=Path, default=Path("runs/teacher_strength"))
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("teacher_strength.png"))
    parser.add_argument("--results", type=Path, help="write the section of this markdown file (RESULTS.md)")
    args = parser.parse_args()
    overrides = ["train.threads=1", "train.progress=none"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    start = time.perf_counter()
    table = run_study(args.seeds, args.out, overrides, args.jobs)
    seconds = time.perf_counter() - start
    rows = load_rows(args.out)
    plot(rows, args.png)
    print(table)
    text = section(rows, args, seconds, args.png)
    print(text)
    if args.results:
        write_section(args.results, text)
        print(f"wrote the '{SECTION[3:]}' section of {args.results}")


if __name__ == "__main__":
    main()
