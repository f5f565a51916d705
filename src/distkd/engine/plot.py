"""``curves.png`` of a run: what ``distkd train`` draws from ``metrics.jsonl`` when the run ends."""

from __future__ import annotations

import json
from pathlib import Path

PLOT_NAME = "curves.png"


def plot_run(run_dir: Path, metric: str, teacher_val: float | None = None) -> Path:
    """Draw the training loss and each of its parts per epoch (left) and the val ``metric`` (right: the model, its
    EMA when there is one, the teacher as a line) from ``run_dir/metrics.jsonl``; return the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in records if "train/loss" in r]
    per_epoch = epochs[0]["step"] / epochs[0]["epoch"] if epochs and epochs[0]["epoch"] else 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    parts = [k for k in epochs[0] if k.startswith("train/") and k != "train/grad_norm"] if epochs else []
    for key in parts:
        left.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], marker=".", label=key[len("train/"):])
    left.set(xlabel="epoch", ylabel="training loss (mean over the epoch)", title="loss and its parts")
    for prefix, label in (("val", "model"), ("ema_val", "EMA")):
        points = [r for r in records if f"{prefix}/{metric}" in r]
        if points:
            right.plot([r["step"] / per_epoch for r in points], [r[f"{prefix}/{metric}"] for r in points],
                       marker=".", label=label)
    if teacher_val is not None:
        right.axhline(teacher_val, color="grey", linestyle="--", label="teacher")
    right.set(xlabel="epoch", ylabel=f"val {metric}", title=f"val {metric}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    path = run_dir / PLOT_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
