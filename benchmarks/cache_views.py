"""How many cached views per image does a distilled student need? DIST students of the demo (silhouette pairs)
trained from teacher caches of K views (each epoch shows every image in one of its K views, drawn at random) and
from the live teacher (a fresh augmentation every time), over several seeds.

    python benchmarks/cache_views.py                                   # print the table
    python benchmarks/cache_views.py --results benchmarks/RESULTS.md   # also write its section

Accuracies are deterministic per seed (they do not depend on the machine's load); the times are not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

from results_md import write_section  # noqa: E402

from distkd.api import train  # noqa: E402
from distkd.config import load_config  # noqa: E402

SECTION = "## Cached views per image (silhouette pairs)"


def run(out: Path, name: str, overrides: list[str]) -> tuple[float, float]:
    """Train (or reuse) one run; its test top-1 and wall-clock seconds."""
    summary_path = out / name / "summary.json"
    start = time.perf_counter()
    if not summary_path.exists():
        overrides = [f"out_dir={out}", f"name={name}", "train.progress=none", *overrides]
        train(load_config("demo/pairs_dist.yaml", overrides))
    summary = json.loads(summary_path.read_text())
    return summary["best_test"], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", default="1,4,16", help="comma-separated K values")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/cache_views"))
    parser.add_argument("--results", type=Path, help="write the section into this RESULTS.md")
    args = parser.parse_args()
    teacher_cfg = load_config("demo/pairs_teacher.yaml", [f"out_dir={args.out}", "train.progress=none"])
    if not (teacher_cfg.run_dir / "summary.json").exists():
        train(teacher_cfg)
    teacher = f"teacher.checkpoint={teacher_cfg.run_dir / 'checkpoints' / 'best.pt'}"
    rows = []
    for k in [int(v) for v in args.views.split(",")] + [0]:
        label = f"{k} view{'s' * (k > 1)}" if k else "live teacher"
        cache = [f"teacher_cache.views={k}", f"teacher_cache.dir={args.out / f'cache_{k}'}"] if k else [
            "teacher_cache.views=0"]
        results = [run(args.out, f"dist_k{k}_seed{s}", [teacher, f"seed={s}", *cache]) for s in range(args.seeds)]
        tops = [r[0] for r in results]
        rows.append((label, statistics.mean(tops), statistics.stdev(tops) if len(tops) > 1 else 0.0, tops))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [SECTION, "",
             f"{stamp}, commit {commit or 'unknown'}: `demo/pairs_dist.yaml` (30 epochs, DIST from the demo teacher) "
             "with the teacher-output cache at K views, and with the live teacher; test top-1 of the best-on-val "
             f"epoch, {args.seeds} seeds (`benchmarks/cache_views.py`). Epochs beyond K reshuffle the views: each "
             "epoch shows every image in one of its K views, drawn afresh per epoch from the run's seed.", "",
             "| teacher outputs | test top-1 (mean ± std) | per seed |", "|---|---|---|",
             *(f"| {label} | {mean:.2f} ± {std:.2f} | {', '.join(f'{t:.2f}' for t in tops)} |"
               for label, mean, std, tops in rows), ""]
    text = "\n".join(lines)
    print(text)
    if args.results:
        write_section(args.results, SECTION, text)


if __name__ == "__main__":
    main()
