"""Run records: metrics.jsonl, TensorBoard events, env.json, and a progress display."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def environment(device: torch.device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Versions, git commit, device and CPU settings: what env.json records for a run."""
    packages = {}
    for name in ("distkd", "torch", "torchvision", "timm", "numpy"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    env = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": packages,
        "git_commit": _git_commit(),
        "argv": sys.argv,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"},
    }
    return env | (extra or {})


def _git_commit() -> str | None:
    for where in (Path.cwd(), Path(__file__).resolve().parent):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode == 0:
            return out.stdout.strip()
    return None


class MetricsLog:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard (x axis: the
    optimizer step).

    ``resume_step``: continuing a run whose checkpoint was taken after that many optimizer steps; records of
    later steps (written before the run was stopped, but after its last checkpoint) are dropped from both.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            if resume_step is not None:
                self._keep_until(resume_step)
            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def _keep_until(self, step: int) -> None:
        """Drop the records of steps after ``step`` (and a line cut short by a kill)."""
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        self.path.write_text("".join(kept))

    def write(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("epoch", "step"):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI, files); or nothing."""

    def __init__(self, mode: str, total_epochs: int, enabled: bool = True) -> None:
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode if enabled else "none"
        self.total_epochs = total_epochs
        self._bar = None
        self._task = None

    def start_epoch(self, epoch: int, steps: int) -> None:
        self._epoch_start = time.perf_counter()
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=steps, epoch=f"{epoch + 1}/{self.total_epochs}", info="")

    @property
    def shows_steps(self) -> bool:
        """True while a bar is shown: only then is per-step information worth computing."""
        return self._bar is not None

    @property
    def steps_done(self) -> int:
        """Steps of the current epoch finished so far, counting the one being reported."""
        return int(self._bar.tasks[0].completed) + 1 if self._bar is not None else 0

    def step(self, info: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, info=info)

    def end_epoch(self, line: str) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.mode != "none":
            print(line, flush=True)

    def message(self, line: str) -> None:
        if self.mode != "none":
            print(line, flush=True)
