"""The classification demo's hyper-parameter search: the same budget for the student alone, KD and DIST.

Each method gets the same trials on the demo's task (``demo/pairs_*.yaml``: silhouette pairs, the demo
teacher, the demo's epochs and cached views unless ``--set`` changes them): learning rate (``--lrs``, default
{0.1, 0.2, 0.4}) x one method setting with two values — label smoothing {0, 0.1} for the student alone, tau {1, 4}
for KD and for DIST — each trained with every search seed (``--seeds``, default 10, 11; not the demo's seeds). The trial
with the best mean val top-1 (of each run's best-on-val epoch) wins; the test split is never looked at for
selection (its column is printed for reference only). The demo configs carry the winners.

    python benchmarks/demo_search.py --label "40 epochs, 16 views, 2 search seeds" --results benchmarks/RESULTS.md
    python benchmarks/demo_search.py --label "60 epochs" --set train.epochs=60 --results benchmarks/RESULTS.md

``--set`` applies to the students only (the teacher is the demo's). Runs go to ``--out`` (default
``runs/demo_search``); finished runs with the same config are reused.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from results_md import write_section

from distkd.api import run_or_reuse
from distkd.config import load_config, resolve_config_path

SECTION = "## Demo hyper-parameter search (silhouette pairs)"
SECOND = {  # method -> (config, what the second axis is, override template, values)
    "alone": ("demo/pairs_student.yaml", "label smoothing", "loss.label_smoothing={}", (0.0, 0.1)),
    "kd": ("demo/pairs_kd.yaml", "tau", "loss.distill.0.kwargs.tau={}", (1.0, 4.0)),
    "dist": ("demo/pairs_dist.yaml", "tau", "loss.distill.0.kwargs.tau={}", (1.0, 4.0)),
}


def _train(config: str, out: Path, name: str, overrides: list[str]) -> dict:
    return run_or_reuse(load_config(resolve_config_path(config), [f"out_dir={out}", f"name={name}",
                                                                  "train.progress=none", "train.threads=1",
                                                                  *overrides]))


def run_search(out: Path, lrs: list[float], seeds: list[int], student_set: list[str]) -> list[dict]:
    """Train the demo teacher (seed 0) and every trial with every search seed; one record per trial."""
    _train("demo/pairs_teacher.yaml", out, "teacher", [])
    teacher = [f"teacher.checkpoint={out / 'teacher' / 'checkpoints' / 'best.pt'}",
               f"teacher_cache.dir={out / 'teacher_cache'}"]
    trials = []
    for method, (config, axis, template, values) in SECOND.items():
        for lr in lrs:
            for value in values:
                name = f"{method}_lr{lr}_{axis.replace(' ', '_')}{value}"
                runs = [_train(config, out, f"{name}_seed{seed}",
                               [f"seed={seed}", f"optim.lr={lr}", template.format(value), *student_set,
                                *(teacher if method != "alone" else ["teacher_cache.views=0"])])  # no teacher
                        for seed in seeds]
                val = statistics.fmean(r["best_val"] for r in runs)
                test = statistics.fmean(r["best_test"] for r in runs)
                trials.append({"method": method, "lr": lr, "axis": axis, "value": value, "val": val, "test": test})
                print(f"{name:<28} val {val:.2f} test {test:.2f} (mean of {len(seeds)})", flush=True)
    return trials


def section(title: str, command: str, trials: list[dict], seeds: list[int], seconds: float) -> str:
    """This benchmark's RESULTS.md section: the conditions, every trial, the winner of each method."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    per_method = len(trials) // len(SECOND)
    lines = [
        title, "",
        f"`{command}` ({when}; {os.cpu_count()}-core CPU ({platform.processor() or 'cpu'}), shared with other jobs,"
        f" load average {load:.1f} at the end; one torch thread; torch {torch.__version__}; {seconds / 60:.1f} min"
        f" wall). The same {per_method} trials per method on the demo task (`demo/pairs_*.yaml`), search seeds"
        f" {', '.join(map(str, seeds))}; the mean val top-1 of the runs' best-on-val epochs selects (test shown for"
        " reference, never used).", "",
        "| method | lr | setting | val top-1 | test top-1 | |", "|---|---:|---|---:|---:|---|",
    ]
    for method in SECOND:
        rows = [t for t in trials if t["method"] == method]
        best = max(rows, key=lambda t: t["val"])
        for t in rows:
            mark = "**selected**" if t is best else ""
            lines.append(f"| {method} | {t['lr']} | {t['axis']} {t['value']} | {t['val']:.2f} | {t['test']:.2f} | "
                         f"{mark} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo_search"))
    parser.add_argument("--results", type=Path, help="write the section of this markdown file (RESULTS.md)")
    parser.add_argument("--lrs", default="0.1,0.2,0.4", help="comma-separated learning rates")
    parser.add_argument("--seeds", default="10,11", help="comma-separated search seeds (each trial runs every one)")
    parser.add_argument("--set", nargs="+", default=[], metavar="key=value", help="overrides for the students")
    parser.add_argument("--label", help="a second search's name: its own RESULTS.md section")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lrs, seeds = [float(v) for v in args.lrs.split(",")], [int(v) for v in args.seeds.split(",")]
    start = time.perf_counter()
    trials = run_search(args.out, lrs, seeds, args.set)
    title = f"{SECTION[:-1]}, {args.label})" if args.label else SECTION
    command = " ".join(["python benchmarks/demo_search.py", *sys.argv[1:]])
    text = section(title, command, trials, seeds, time.perf_counter() - start)
    print(text)
    if args.results:
        write_section(args.results, title, text)


if __name__ == "__main__":
    main()
