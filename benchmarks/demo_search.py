"""The classification demo's hyper-parameter search: the same budget for the student alone, KD and DIST.

Each method gets the same 8 trials on the demo's task (``demo/pairs_*.yaml``: silhouette pairs, the demo
teacher, the demo's epochs): learning rate {0.05, 0.1, 0.2, 0.4} x one method setting with two values —
label smoothing {0, 0.1} for the student alone, tau {1, 4} for KD and for DIST. One search seed (10, not one
of the demo's seeds 0-2); the trial with the best val top-1 (of its best-on-val epoch) wins, the test split
is never looked at for selection (its column is printed for reference only). The demo configs carry the
winners.

    python benchmarks/demo_search.py --results benchmarks/RESULTS.md

Runs go to ``--out`` (default ``runs/demo_search``); finished runs are reused.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
from results_md import write_section

from distkd.api import train
from distkd.config import load_config, resolve_config_path

SECTION = "## Demo hyper-parameter search (silhouette pairs)"
SEED = 10
LRS = (0.05, 0.1, 0.2, 0.4)
SECOND = {  # method -> (config, what the second axis is, override template, values)
    "alone": ("demo/pairs_student.yaml", "label smoothing", "loss.label_smoothing={}", (0.0, 0.1)),
    "kd": ("demo/pairs_kd.yaml", "tau", "loss.distill.0.kwargs.tau={}", (1.0, 4.0)),
    "dist": ("demo/pairs_dist.yaml", "tau", "loss.distill.0.kwargs.tau={}", (1.0, 4.0)),
}


def _train(config: str, out: Path, name: str, overrides: list[str]) -> dict:
    cfg = load_config(resolve_config_path(config), [f"out_dir={out}", f"name={name}", "train.progress=none",
                                                    "train.threads=1", *overrides])
    summary = cfg.run_dir / "summary.json"
    if not summary.exists():
        train(cfg, resume=(cfg.run_dir / "checkpoints" / "last.pt").exists())
    return json.loads(summary.read_text())


def run_search(out: Path) -> list[dict]:
    """Train the demo teacher (seed 0) and every trial; one record per trial."""
    _train("demo/pairs_teacher.yaml", out, "teacher", [])
    teacher = [f"teacher.checkpoint={out / 'teacher' / 'checkpoints' / 'best.pt'}",
               f"teacher_cache.dir={out / 'teacher_cache'}"]
    trials = []
    for method, (config, axis, template, values) in SECOND.items():
        for lr in LRS:
            for value in values:
                name = f"{method}_lr{lr}_{axis.replace(' ', '_')}{value}"
                overrides = [f"seed={SEED}", f"optim.lr={lr}", template.format(value)]
                summary = _train(config, out, name, overrides + (teacher if method != "alone" else []))
                trials.append({"method": method, "lr": lr, "axis": axis, "value": value,
                               "val": summary["best_val"], "test": summary["best_test"]})
                print(f"{name:<28} val {summary['best_val']:.2f} test {summary['best_test']:.2f}", flush=True)
    return trials


def section(trials: list[dict], seconds: float) -> str:
    """This benchmark's RESULTS.md section: the conditions, every trial, the winner of each method."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0]
    lines = [
        SECTION, "",
        f"`python benchmarks/demo_search.py` ({when}; {os.cpu_count()}-core CPU ({platform.processor() or 'cpu'}),"
        f" shared with other jobs, load average {load:.1f} at the end; one torch thread; torch {torch.__version__};"
        f" {seconds / 60:.1f} min wall). The same 8 trials per method on the demo task (`demo/pairs_*.yaml`), seed"
        f" {SEED}; val top-1 of the best-on-val epoch selects (test shown for reference, never used).", "",
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
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    trials = run_search(args.out)
    text = section(trials, time.perf_counter() - start)
    print(text)
    if args.results:
        write_section(args.results, SECTION, text)


if __name__ == "__main__":
    main()
