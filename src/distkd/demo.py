"""``distkd demo``: a strong teacher and a tiny student on the embedded silhouettes.

Trains the teacher (``configs/demo/teacher.yaml``, 288k parameters), then the 1.7k-parameter student three
ways — alone, with KD (tau 4) and with DIST — for several seeds, and writes ``report.md`` with a table
(test top-1 of the best-on-val epoch, mean ± std over seeds) and ``val_curves.png``. Finished runs are
reused, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from distkd.api import train
from distkd.cli import resolve_config_path
from distkd.config import RunConfig, load_config
from distkd.models import create_model

METHODS = {"alone": "demo/student.yaml", "kd": "demo/kd.yaml", "dist": "demo/dist.yaml"}
FULL_EPOCHS, QUICK_EPOCHS = 15, 4


@dataclass
class RunResult:
    name: str
    summary: dict
    val_curve: list[float]
    seconds: float


def run_demo(out: Path, seeds: int = 3, quick: bool = False) -> dict[str, list[RunResult]]:
    """Run the demo into ``out`` and return the results per method (``"teacher"`` included)."""
    epochs = QUICK_EPOCHS if quick else FULL_EPOCHS
    seeds = 1 if quick and seeds == 3 else seeds
    common = [f"out_dir={out}", f"train.epochs={epochs}"]
    total = 1 + len(METHODS) * seeds
    teacher_cfg = load_config(resolve_config_path("demo/teacher.yaml"), common)
    results = {"teacher": [_run(teacher_cfg, 1, total)]}
    teacher_ckpt = teacher_cfg.run_dir / "checkpoints" / "best.pt"
    index = 1
    for method, config in METHODS.items():
        results[method] = []
        for seed in range(seeds):
            index += 1
            overrides = [*common, f"name={method}_seed{seed}", f"seed={seed}", "train.progress=none"]
            if method != "alone":
                overrides += [f"teacher.checkpoint={teacher_ckpt}", f"teacher_cache.dir={out / 'teacher_cache'}"]
            results[method].append(_run(load_config(resolve_config_path(config), overrides), index, total))
    report = _report(results, epochs, seeds)
    (out / "report.md").write_text(report)
    _plot(results, out / "val_curves.png")
    print(f"\n{report}\nwritten: {out / 'report.md'}, {out / 'val_curves.png'}")
    return results


def _run(cfg: RunConfig, index: int, total: int) -> RunResult:
    summary_path = cfg.run_dir / "summary.json"
    start = time.perf_counter()
    reused = summary_path.exists()
    if not reused:
        train(cfg, resume=(cfg.run_dir / "checkpoints" / "last.pt").exists())
    seconds = time.perf_counter() - start
    summary = json.loads(summary_path.read_text())
    curve = [r["val/top1"] for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
             if "val/top1" in r]
    note = "reused" if reused else f"{seconds:.0f} s"
    print(f"[{index}/{total}] {cfg.name:<14} {cfg.model.name:<15} test top-1 {summary['best_test']:.2f} ({note})",
          flush=True)
    return RunResult(cfg.name, summary, curve, seconds)


def _params(name: str) -> int:
    return sum(p.numel() for p in create_model(name, num_classes=10).parameters())


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _report(results: dict[str, list[RunResult]], epochs: int, seeds: int) -> str:
    teacher = results["teacher"][0].summary
    lines = [
        "# distkd demo: a 1.7k-parameter student learns from a 288k-parameter teacher",
        "",
        f"Embedded Animal silhouettes (train 7,000 / val 1,000 / test 2,000), {epochs} epochs, "
        f"{seeds} student seed(s). Test top-1 (%) of the epoch with the best val top-1; the test split is never "
        "used for selection.",
        "",
        "| model | method | params | test top-1 (best-on-val) | test top-1 (last epoch) |",
        "|---|---|---|---|---|",
        f"| small_cnn6_w32 | teacher | {_params('small_cnn6_w32'):,} | {teacher['best_test']:.2f} | "
        f"{teacher['last_test']:.2f} |",
    ]
    for method in METHODS:
        runs = results[method]
        best = _mean_std([r.summary["best_test"] for r in runs])
        last = _mean_std([r.summary["last_test"] for r in runs])
        lines.append(f"| small_cnn3_w4 | {method} | {_params('small_cnn3_w4'):,} | {best} | {last} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, list[RunResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, runs in results.items():
        for i, run in enumerate(runs):
            epochs = range(1, len(run.val_curve) + 1)
            ax.plot(epochs, run.val_curve, color=f"C{list(results).index(method)}", alpha=0.8,
                    label=method if i == 0 else None)
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="silhouettes: teacher and 1.7k-param student")
    ax.set_ylim(bottom=max(0.0, min(min(r.val_curve) for runs in results.values() for r in runs) - 5))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
