"""Epoch time of the data path alone: TensorLoader vs a per-image torchvision-transform DataLoader.

Both sides iterate every batch of one training epoch with random crop (padding 4) + horizontal flip +
normalisation and touch the output (a running sum of every batch on the target device); no model runs.

    python benchmarks/bench_data.py                      # CPU, CIFAR-shaped + silhouettes, workers 0 and 2
    python benchmarks/bench_data.py --device cuda        # TensorLoader on the GPU, baseline copies batches there
    python benchmarks/bench_data.py --results benchmarks/RESULTS.md   # also write the "Data path" section

glibc's malloc settings below keep the per-image baseline from being dominated by mmap/trim churn; the
script re-executes itself with them when they are not already set. ``--threads`` (default 1) sets torch's
intra-op threads in the main process: on a CPU shared with other jobs, 2 OpenMP threads stall at every
parallel region while a core is taken (an epoch of the TensorLoader went from ~0.6 s to 4-20 s), so one
thread is the honest setting there; DataLoader workers always use one thread each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

import torch  # noqa: E402
import torchvision  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402
from results_md import write_section  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from distkd.data.augment import CropFlip  # noqa: E402
from distkd.data.base import Split  # noqa: E402
from distkd.data.loaders import TensorLoader  # noqa: E402
from distkd.data.silhouettes import load_silhouettes  # noqa: E402

PADDING = 4
SECTION = "## Data path"


@dataclass(frozen=True)
class Workload:
    """One dataset to load: its train split and normalisation constants."""

    name: str
    split: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]


def workloads(names: Iterable[str]) -> list[Workload]:
    """CIFAR-shaped random data (50,000 x 3x32x32) and/or the embedded silhouettes train split (7,000 x 1x28x28)."""
    out = []
    for name in names:
        if name == "cifar":
            gen = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=gen)
            labels = torch.randint(0, 100, (50_000,), generator=gen)
            out.append(Workload("CIFAR-shaped 50,000 x 3x32x32", Split(images, labels),
                                (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))
        else:
            data = load_silhouettes()
            out.append(Workload("silhouettes train 7,000 x 1x28x28", data.train, data.mean, data.std))
    return out


class PerImageDataset(Dataset):
    """The usual per-image dataset: one HWC uint8 array, a PIL image or a CHW tensor per item, then transforms."""

    def __init__(self, split: Split, transform: Callable, pil: bool) -> None:
        images = split.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        self.images = images[..., 0] if images.shape[-1] == 1 else images  # PIL wants (H, W) for grayscale
        self.tensors = split.images
        self.labels = split.labels.tolist()
        self.transform = transform
        self.pil = pil

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[index]) if self.pil else self.tensors[index]
        return self.transform(image), self.labels[index]


def per_image_loader(work: Workload, batch_size: int, workers: int, pil: bool, pin: bool) -> DataLoader:
    """torchvision's standard recipe: RandomCrop(size, padding=4), RandomHorizontalFlip, to float, Normalize."""
    size = work.split.images.shape[-1]
    to_float = T.ToTensor() if pil else T.ConvertImageDtype(torch.float32)
    transform = T.Compose([T.RandomCrop(size, padding=PADDING), T.RandomHorizontalFlip(), to_float,
                           T.Normalize(work.mean, work.std)])
    dataset = PerImageDataset(work.split, transform, pil)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=pin,
                      generator=torch.Generator().manual_seed(0))


def time_epoch(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[float, int]:
    """Seconds to iterate one epoch, moving each batch to `device` and summing it there; images seen."""
    total = torch.zeros((), device=device)
    seen = 0
    start = time.perf_counter()
    for x, y in batches:
        x = x.to(device, non_blocking=True)
        total += x.sum()
        seen += len(y)
    float(total)  # waits for the device
    return time.perf_counter() - start, seen


@dataclass(frozen=True)
class Row:
    workload: str
    loader: str
    seconds: float
    images: int

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def bench(work: Workload, args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Rows for the TensorLoader (best of `args.epochs` after a warm-up epoch) and each per-image baseline."""
    loader = TensorLoader(work.split, batch_size=args.batch_size, mean=work.mean, std=work.std, device=device,
                          augment=CropFlip(padding=PADDING), shuffle=True, drop_last=False, seed=0)
    times = []
    for epoch in range(args.epochs + 1):
        loader.set_epoch(epoch)
        seconds, seen = time_epoch(loader, device)
        times.append(seconds)
    rows = [Row(work.name, f"TensorLoader ({device.type})", min(times[1:]), seen)]
    for kind in args.baselines:
        for workers in args.workers:
            data = per_image_loader(work, args.batch_size, workers, kind == "pil", device.type == "cuda")
            seconds, seen = time_epoch(data, device)
            rows.append(Row(work.name, f"torchvision {kind} DataLoader, num_workers={workers}", seconds, seen))
    return rows


def table(rows: list[Row]) -> str:
    """Markdown table; speed-up = TensorLoader images/s over the row's images/s, same workload, same run."""
    lines = ["| data | loader | epoch s | images/s | TensorLoader speed-up |", "|---|---|---:|---:|---:|"]
    fastest = {r.workload: r.rate for r in rows if r.loader.startswith("TensorLoader")}
    for r in rows:
        lines.append(f"| {r.workload} | {r.loader} | {r.seconds:.3f} | {r.rate:,.0f} | "
                     f"{fastest[r.workload] / r.rate:.1f}x |")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        cpu = found.group(1).strip() if found else cpu
    text = f"{os.cpu_count()}-core CPU ({cpu}), shared with other jobs"
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return f"{text}; torch {torch.__version__}, torchvision {torchvision.__version__}"


def section(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        SECTION, "",
        f"`python benchmarks/bench_data.py --device {device.type} --threads {args.threads}` "
        f"({date}; {machine(device)}).",
        f"One training epoch of the data path alone, batch {args.batch_size}: random crop (padding {PADDING}) "
        "+ horizontal flip + normalise, every batch summed on the device; no model. TensorLoader: best of "
        f"{args.epochs} epochs after a warm-up epoch; each per-image DataLoader: one epoch (shuffle, default "
        "settings, worker start-up included). glibc malloc: "
        + " ".join(f"`{k}={v}`" for k, v in MALLOC_ENV.items()) + f". torch intra-op threads: {args.threads} "
        "(on a CPU shared with other jobs, 2 threads stall at every parallel region; see the script's docstring).",
        "",
        table(rows), "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--data", nargs="+", choices=("cifar", "silhouettes"), default=["cifar", "silhouettes"])
    parser.add_argument("--baselines", nargs="+", choices=("pil", "tensor"), default=["pil", "tensor"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3, help="timed TensorLoader epochs (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in the main process")
    parser.add_argument("--results", type=Path, help="write the 'Data path' section of this markdown file")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [row for work in workloads(args.data) for row in bench(work, args, device)]
    print(table(rows))
    if args.results:
        write_section(args.results, SECTION, section(rows, args, device))
        print(f"wrote the '{SECTION[3:]}' section of {args.results}")


if __name__ == "__main__":
    main()
