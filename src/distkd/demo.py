"""``distkd demo``: a strong teacher and a tiny student on embedded data.

Classification (default): on the silhouette pairs (100 classes, :mod:`distkd.data.silhouette_pairs`), trains
the teacher (``configs/demo/pairs_teacher.yaml``, 300k parameters), then the 3.2k-parameter student three
ways — alone, with KD and with DIST, the same epochs — for several seeds.
Segmentation (``--task segmentation``): the same on the silhouette scenes with a 0.84M-parameter DeepLabV3
teacher and a 114k-parameter student, reporting mIoU. Detection (``--task detection``): Faster R-CNNs on the
scenes with boxes, KD and DIST on the class logits of the student's sampled RoIs, reporting COCO box mAP
(``--detector retinanet``: RetinaNets with per-level sigmoid KD and DIST). Writes ``report.md`` with a table (test
metric of the best-on-val epoch, mean ± std over seeds, and each seed's paired differences) and ``val_curves.png``.
Finished runs with the same config are reused, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import statistics
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from distkd.api import build_teacher_cache, run_or_reuse
from distkd.config import RunConfig, load_config, resolve_config_path
from distkd.errors import ConfigError

CONFIGS = {
    "classification": {"teacher": "demo/pairs_teacher.yaml", "alone": "demo/pairs_student.yaml",
                       "kd": "demo/pairs_kd.yaml", "dist": "demo/pairs_dist.yaml"},
    "segmentation": {"teacher": "demo/seg_teacher.yaml", "alone": "demo/seg_student.yaml",
                     "kd": "demo/seg_kd.yaml", "dist": "demo/seg_dist.yaml"},
    "detection": {"teacher": "demo/det_frcnn_teacher.yaml", "alone": "demo/det_frcnn_student.yaml",
                  "kd": "demo/det_frcnn_kd.yaml", "dist": "demo/det_frcnn_dist.yaml"},
    "detection-retinanet": {"teacher": "demo/det_teacher.yaml", "alone": "demo/det_student.yaml",
                            "kd": "demo/det_kd.yaml", "dist": "demo/det_dist.yaml"},
}
QUICK = {  # --quick: 4 epochs on half the pairs (a smoke test: its teacher is weak); fewer scenes for segmentation
    "classification": ["train.epochs=4", "data.kwargs={train: 20, val: 5, test: 10}"],
    "segmentation": ["data.kwargs={train: 800, val: 200, test: 300}"],
    "detection": ["data.kwargs={train: 400, val: 100, test: 200, size: 96}", "train.epochs=5"],
    "detection-retinanet": ["data.kwargs={train: 400, val: 100, test: 200, size: 96}", "train.epochs=5"],
}
DISTILLED = {  # the distilled students: the RetinaNets replay the teacher-output cache (the live runs, bit for bit)
    "detection-retinanet": ["teacher_cache.views=2"],
}
QUICK_DISTILLED = {  # --quick, the distilled students only: a smaller teacher-output cache (the demo's has 16 views)
    "classification": ["teacher_cache.views=4"],
}


@dataclass
class RunResult:
    cfg: RunConfig
    summary: dict
    val_curve: list[float]
    seconds: float


def run_demo(out: Path, seeds: int = 3, quick: bool = False, task: str = "classification",
             jobs: int = 1) -> dict[str, list]:
    """Run the demo of ``task`` (a key of ``CONFIGS``) into ``out``; return the results per method (teacher included).

    ``jobs`` > 1 trains that many runs at once, each in its own process: the teacher beside the students that do
    not need it, then the teacher-output cache once (with ``jobs`` threads, while no run trains), then the distilled
    students. Every training run is seeded and single-threaded, so the results are those of ``jobs=1`` (tested)."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (runs trained at once); got {jobs}")
    configs = CONFIGS[task]
    seeds = 1 if quick and seeds == 3 else seeds
    common = [f"out_dir={out}", *(QUICK[task] if quick else [])]
    teacher_cfg = load_config(resolve_config_path(configs["teacher"]), common)
    teacher_ckpt = teacher_cfg.run_dir / "checkpoints" / "best.pt"
    students: dict[str, list[RunConfig]] = {}
    for method in (m for m in configs if m != "teacher"):
        students[method] = []
        for seed in range(seeds):
            overrides = [*common, f"name={method}_seed{seed}", f"seed={seed}", "train.progress=none"]
            if method != "alone":
                overrides += [f"teacher.checkpoint={teacher_ckpt}", f"teacher_cache.dir={out / 'teacher_cache'}",
                              *DISTILLED.get(task, []), *(QUICK_DISTILLED.get(task, []) if quick else [])]
            students[method].append(load_config(resolve_config_path(configs[method]), overrides))
    start = time.perf_counter()
    order = [teacher_cfg, *(cfg for runs in students.values() for cfg in runs)]
    index = {cfg.name: k for k, cfg in enumerate(order, 1)}
    with _Runner(jobs, len(order)) as runner:
        runner.start([teacher_cfg, *students.get("alone", [])], index)  # the alone students need no teacher
        runner.wait(teacher_cfg.name)
        cached = [cfg for runs in students.values() for cfg in runs if cfg.teacher_cache.views]
        if cached and jobs > 1:  # built once, with every core, before the students that share it start
            for cfg in students.get("alone", []):
                runner.wait(cfg.name)
            runner.build_cache(cached[0], threads=jobs)
        runner.start([cfg for method, runs in students.items() if method != "alone" for cfg in runs], index)
        results = {"teacher": [runner.wait(teacher_cfg.name)],
                   **{method: [runner.wait(cfg.name) for cfg in runs] for method, runs in students.items()}}
    report = _report(results, seeds)
    (out / "report.md").write_text(report)
    _plot(results, out / "val_curves.png")
    print(f"\n{report}\nwritten: {out / 'report.md'}, {out / 'val_curves.png'} ({time.perf_counter() - start:.0f} s "
          f"wall, {jobs} run(s) at a time)")
    return results


class _Runner:
    """Runs the demo's trainings in this process (``jobs`` 1) or in ``jobs`` worker processes."""

    def __init__(self, jobs: int, total: int) -> None:
        self.total = total
        self.pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) if jobs > 1 else None
        self.futures: dict[str, Future | RunResult] = {}

    def __enter__(self) -> _Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def start(self, cfgs: list[RunConfig], index: dict[str, int]) -> None:
        for cfg in cfgs:
            args = (cfg, index[cfg.name], self.total)
            self.futures[cfg.name] = self.pool.submit(_run, *args) if self.pool else _run(*args)

    def wait(self, name: str) -> RunResult:
        result = self.futures[name]
        return result.result() if isinstance(result, Future) else result

    def build_cache(self, cfg: RunConfig, threads: int) -> None:
        start = time.perf_counter()
        self.pool.submit(_build_cache, cfg, threads).result()
        print(f"teacher-output cache ready ({time.perf_counter() - start:.0f} s, {threads} threads)", flush=True)


def _build_cache(cfg: RunConfig, threads: int) -> None:
    """Build ``cfg``'s teacher-output cache with ``threads`` torch threads while no run trains, then give the worker
    process its thread count back. The cache's bytes were the same with 1 and 2 threads here, and a test checks
    that the students' results do not depend on ``jobs``."""
    before = torch.get_num_threads()
    try:
        build_teacher_cache(replace(cfg, train=replace(cfg.train, threads=threads)))
    finally:
        torch.set_num_threads(before)


def _run(cfg: RunConfig, index: int, total: int) -> RunResult:
    start = time.perf_counter()
    reused = (cfg.run_dir / "summary.json").exists()
    summary = run_or_reuse(cfg)
    seconds = time.perf_counter() - start
    metric = summary["metric"]
    records = map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())
    curve = [r[f"val/{metric}"] for r in records if f"val/{metric}" in r]
    note = "reused" if reused else f"{seconds:.0f} s"
    print(f"[{index}/{total}] {cfg.name:<14} {cfg.model.name:<19} test {metric} {summary['best_test']:.2f} ({note})",
          flush=True)
    return RunResult(cfg, summary, curve, seconds)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


DATA = {
    "silhouette_pairs": "silhouette pairs (100 ordered-pair classes, 24x24 with clutter; train {train} / val {val} / "
                        "test {test})",
    "silhouettes": "Animal silhouettes (train 7,000 / val 1,000 / test 2,000)",
    "scenes": "silhouette scenes (64x64, background + 10 classes)",
    "scenes/detection": "silhouette scenes with boxes (96x96, 10 classes, COCO json), COCO box mAP",
}
PAIRS = (("kd", "alone"), ("dist", "alone"), ("dist", "kd"))  # the paired differences the report lists


def _describe(cfg: RunConfig) -> str:
    """The dataset in words, with the split sizes the run used (the pairs' sizes are per class x 100)."""
    key = f"{cfg.data.name}/detection" if cfg.task == "detection" else cfg.data.name
    text = DATA.get(key, cfg.data.name)
    if cfg.data.name == "silhouette_pairs":
        from distkd.data.silhouette_pairs import CLASSES, DEFAULT_PER_CLASS

        sizes = {k: f"{len(CLASSES) * cfg.data.kwargs.get(k, v):,}" for k, v in DEFAULT_PER_CLASS.items()}
        text = text.format(**sizes)
    return text


def _report(results: dict[str, list[RunResult]], seeds: int) -> str:
    """The markdown report: one row per method (mean ± std over seeds) and each seed's paired differences."""
    teacher = results["teacher"][0]
    cfg, metric = teacher.cfg, teacher.summary["metric"]
    lines = [
        f"# distkd demo ({cfg.task}): a small student learns from a stronger teacher",
        "",
        f"Embedded {_describe(cfg)}, {seeds} student seed(s). Test {metric} (%) of the epoch "
        f"with the best val {metric}; the test split is never used for selection. Time: wall-clock of the runs "
        "trained now (0 if reused).",
        "",
        f"| model | method | params | epochs | test {metric} (best-on-val) | test {metric} (last epoch) | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, runs in results.items():
        best = _mean_std([r.summary["best_test"] for r in runs])
        last = _mean_std([r.summary["last_test"] for r in runs])
        seconds = sum(r.seconds for r in runs)
        run_cfg = runs[0].cfg
        lines.append(f"| {run_cfg.model.name} | {method} | {runs[0].summary['student_parameters']:,} | "
                     f"{run_cfg.train.epochs} | {best} | {last} | {seconds:.0f} s |")
    pairs = [(a, b) for a, b in PAIRS if a in results and b in results]
    if pairs:
        lines += ["", f"Paired differences of test {metric} (best-on-val), same seed:", "",
                  "| seed | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
                  "|---|" + "---|" * len(pairs)]
        diffs = {(a, b): [x.summary["best_test"] - y.summary["best_test"]
                          for x, y in zip(results[a], results[b], strict=True)] for a, b in pairs}
        for seed in range(seeds):
            lines.append(f"| {seed} | " + " | ".join(f"{diffs[p][seed]:+.2f}" for p in pairs) + " |")
        if seeds > 1:
            lines.append("| mean ± std | " + " | ".join(
                f"{statistics.mean(d):+.2f} ± {statistics.stdev(d):.2f}" for d in diffs.values()) + " |")
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
    metric = results["teacher"][0].summary["metric"]
    ax.set(xlabel="epoch", ylabel=f"val {metric} (%)", title="distkd demo: teacher and students")
    ax.set_ylim(bottom=max(0.0, min(min(r.val_curve) for runs in results.values() for r in runs) - 5))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
