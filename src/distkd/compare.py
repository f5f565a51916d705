"""``distkd compare``: distillation methods side by side on the embedded data, on equal terms.

The teacher is trained once (the demo's); every method's student is the demo's student with the same data,
schedule, epochs and seeds, differing only in its loss: the CE weight and the terms its authors used, with their
published CIFAR-100 weights (``METHODS``; your own in a YAML file). The teacher runs live for every method (no
teacher-output cache, which only logit terms could use), so all students see the same fresh augmentations.
Writes ``report.md`` (test metric mean ± std, the paired difference to the student alone, extra trainable
parameters, seconds per epoch) and ``compare.png``. Finished runs are reused, interrupted ones resumed.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

from distkd.config import load_config
from distkd.demo import CONFIGS, QUICK, RunResult, _mean_std, _run
from distkd.errors import ConfigError
from distkd.registry import nearest

Method = dict[str, Any]  # {"ce_weight": float, "distill": [term, ...], "note": str}


def _stages(loss: str, weight: float, names: tuple[str, ...] = ("stage1", "stage2", "stage3"), **term: Any) -> list:
    """One term per feature (RepDistiller's methods over ``feats[1:-1]``: one loss per stage, summed)."""
    return [{"loss": loss, "weight": weight, "student": n, "teacher": n, **term} for n in names]


PENULTIMATE = {"student": "penultimate", "teacher": "penultimate", "transform": "flatten"}
# Weights and CE weights of the original CIFAR-100 scripts (see each loss's docstring for the source); schedules
# that count epochs (DKD's and ReviewKD's 20-epoch warm-ups of 240 epochs) are scaled to the demo's length.
METHODS: dict[str, dict[str, Method]] = {
    "classification": {
        "alone": {"ce_weight": 1.0, "distill": []},
        "kd": {"ce_weight": 0.1, "distill": [{"loss": "kd", "weight": 0.9, "kwargs": {"tau": 4.0}}]},
        "dist": {"ce_weight": 1.0, "distill": [{"loss": "dist", "weight": 2.0, "kwargs": {"tau": 4.0}}]},
        "dkd": {"ce_weight": 1.0, "distill": [{"loss": "dkd", "weight": 1.0, "kwargs": {"warmup": 1}}],
                "note": "warm-up 1 epoch (20 of 240 in the original)"},
        "fitnet": {"ce_weight": 1.0, "distill": [{"loss": "fitnet", "weight": 100.0, "student": "stage2",
                                                   "teacher": "stage2", "lr": 0.01}],
                   "note": "regressor lr 0.01 (demo/fitnet.yaml); no hint pre-training stage"},
        "at": {"ce_weight": 1.0, "distill": _stages("at", 1000.0)},
        "nst": {"ce_weight": 1.0, "distill": _stages("nst", 50.0)},
        "sp": {"ce_weight": 1.0, "distill": _stages("sp", 3000.0, ("stage3",))},
        "vid": {"ce_weight": 1.0, "distill": _stages("vid", 1.0)},
        "ofd": {"ce_weight": 1.0, "distill": _stages("ofd", 1e-3, ("stage3",))},
        "rkd": {"ce_weight": 1.0, "distill": [{"loss": "rkd", "weight": 1.0, **PENULTIMATE}]},
        "pkt": {"ce_weight": 1.0, "distill": [{"loss": "pkt", "weight": 30000.0, **PENULTIMATE}]},
        "cc": {"ce_weight": 1.0, "distill": [{"loss": "cc", "weight": 0.02, **PENULTIMATE}]},
        "crd": {"ce_weight": 1.0, "distill": [{"loss": "crd", "weight": 0.8, "kwargs": {"nce_k": 4096},
                                                **PENULTIMATE}],
                "note": "4,096 negatives (16,384 of 50,000 on CIFAR), with replacement where fewer exist"},
        "reviewkd": {"ce_weight": 1.0, "distill": [{"loss": "reviewkd", "weight": 1.0, "kwargs": {"warmup": 1},
                                                     "student": ["stage1", "stage2", "stage3", "penultimate"],
                                                     "teacher": ["stage1", "stage2", "stage3", "penultimate"]}],
                     "note": "warm-up 1 epoch (20 of 240 in the original)"},
        "mlkd": {"ce_weight": 0.1, "distill": [{"loss": "mlkd", "weight": 0.9}], "note": "one view (no strong view)"},
        "ctkd": {"ce_weight": 0.1, "distill": [{"loss": "ctkd", "weight": 0.9, "kwargs": {"decay_epochs": 1}}],
                 "note": "curriculum over 1 epoch (10 in the original)"},
        "nkd": {"ce_weight": 1.0, "distill": [{"loss": "nkd", "weight": 1.0, "kwargs": {"tau": 3.0, "gamma": 3.5}}]},
    },
    "segmentation": {
        "alone": {"ce_weight": 1.0, "distill": []},
        "kd": {"ce_weight": 1.0, "distill": [{"loss": "kd", "weight": 1.0, "kwargs": {"tau": 1.0}},
                                             {"loss": "kd", "weight": 0.4, "kwargs": {"tau": 1.0}, "student": "aux",
                                              "teacher": "aux"}]},
        "dist": {"ce_weight": 1.0, "distill": [{"loss": "dist", "weight": 1.0},
                                               {"loss": "dist", "weight": 0.4, "student": "aux", "teacher": "aux"}]},
    },
}
DEFAULT_METHODS = ("kd", "dkd", "fitnet", "at", "rkd", "crd", "reviewkd", "dist")


def resolve_methods(spec: str, task: str) -> dict[str, Method]:
    """``spec``: comma-separated bundled names, or a YAML file mapping names to ``{ce_weight, distill}``."""
    bundled = METHODS[task]
    if spec.endswith((".yaml", ".yml")):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"methods file not found: {path}")
        given = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(given, dict) or not all(isinstance(v, dict) for v in given.values()):
            raise ConfigError(f"{path}: expected a mapping of method names to {{ce_weight, distill}}")
        chosen = {name: {"ce_weight": float(m.get("ce_weight", 1.0)), "distill": list(m.get("distill", []))}
                  for name, m in given.items()}
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in bundled]
        if unknown:
            raise ConfigError(f"no bundled {task} method '{unknown[0]}'{nearest(unknown[0], list(bundled))}; "
                              f"known: {', '.join(bundled)}; give others in a YAML file (--methods FILE.yaml)")
        chosen = {n: bundled[n] for n in names}
    return {"alone": bundled["alone"], **{k: v for k, v in chosen.items() if k != "alone"}}


def run_compare(out: Path, methods: dict[str, Method], seeds: int = 3, task: str = "classification",
                quick: bool = False, overrides: tuple[str, ...] = (),
                student_overrides: tuple[str, ...] = ()) -> dict[str, list[RunResult]]:
    """Train the teacher once and every method's student for ``seeds`` seeds; write the report and the plot.

    ``overrides`` apply to every run, ``student_overrides`` to the students only (after the method's terms)."""
    configs = CONFIGS[task]
    common = [f"out_dir={out}", *(QUICK[task] if quick else []), *overrides]
    total = 1 + len(methods) * seeds
    teacher_cfg = load_config(configs["teacher"], common)
    teacher = _run(teacher_cfg, 1, total)
    checkpoint = teacher_cfg.run_dir / "checkpoints" / "best.pt"
    results: dict[str, list[RunResult]] = {}
    index = 1
    for name, method in methods.items():
        results[name] = []
        for seed in range(seeds):
            index += 1
            run = [*common, f"name={name}_seed{seed}", f"seed={seed}", "train.progress=none", "teacher_cache.views=0",
                   f"loss.ce_weight={method['ce_weight']}", f"loss.distill={_flow(method['distill'])}"]
            if method["distill"]:
                run += [f"teacher={_flow({'name': teacher_cfg.model.name, 'kwargs': teacher_cfg.model.kwargs})}",
                        f"teacher.checkpoint={checkpoint}"]
            else:
                run.append("teacher=null")
            run += student_overrides
            results[name].append(_run(load_config(configs["alone"], run), index, total))
    report = _report(teacher, results, methods, seeds)
    (out / "report.md").write_text(report)
    _plot(results, out / "compare.png")
    print(f"\n{report}\nwritten: {out / 'report.md'}, {out / 'compare.png'}")
    return results


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def _epoch_seconds(run: RunResult) -> float:
    records = [json.loads(line) for line in (run.cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(r["epoch_s"] for r in records if "epoch_s" in r)


def _report(teacher: RunResult, results: dict[str, list[RunResult]], methods: dict[str, Method], seeds: int) -> str:
    metric = teacher.summary["metric"]
    alone = [r.summary["best_test"] for r in results["alone"]]
    lines = [
        f"# distkd compare ({teacher.cfg.task}): methods on equal terms",
        "",
        f"Teacher `{teacher.cfg.model.name}` (test {metric} {teacher.summary['best_test']:.2f}); student "
        f"`{results['alone'][0].cfg.model.name}`, {results['alone'][0].cfg.train.epochs} epochs, {seeds} seed(s), "
        "the same data, schedule and seeds for every method, teacher run live. Test "
        f"{metric} (%) of the best-on-val epoch, mean ± std over seeds; Δ: the paired difference to the student "
        "alone (same seed).",
        "",
        f"| method | test {metric} | Δ vs alone | extra params | s / epoch | note |",
        "|---|---|---|---|---|---|",
    ]
    spread = {}
    for name, runs in results.items():
        scores = [r.summary["best_test"] for r in runs]
        diffs = [s - a for s, a in zip(scores, alone, strict=True)]
        spread[name] = (statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0)
        delta = "" if name == "alone" else _mean_std(diffs)
        seconds = statistics.mean(_epoch_seconds(r) for r in runs)
        lines.append(f"| {name} | {_mean_std(scores)} | {delta} | {runs[0].summary.get('term_parameters', 0):,} | "
                     f"{seconds:.1f} | {methods[name].get('note', '')} |")
    best = max(spread, key=lambda n: spread[n][0])
    tied = [n for n, (m, s) in spread.items() if n != best and m + s >= spread[best][0] - spread[best][1]]
    lines += ["", f"Best mean: {best}. Within one standard deviation of it (not distinguishable with {seeds} "
              f"seed(s)): {', '.join(tied) or 'none'}."]
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, list[RunResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    scores = [[r.summary["best_test"] for r in results[n]] for n in names]
    means = [statistics.mean(s) for s in scores]
    errors = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in scores]
    metric = results[names[0]][0].summary["metric"]
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(names) + 1.5))
    ax.barh(names, means, xerr=errors, color=["C7" if n == "alone" else "C0" for n in names], capsize=3)
    ax.set(xlabel=f"test {metric} (%), mean ± std over seeds", title="distkd compare")
    low = min(m - e for m, e in zip(means, errors, strict=True))
    ax.set_xlim(left=max(0.0, low - 5))
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
