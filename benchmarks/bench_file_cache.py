"""Epoch time on an image folder: the student alone, DIST with the live teacher, DIST from the file teacher cache,
and the cache's build, each through the real ``distkd train`` / ``distkd cache build`` on a generated tree; then
the same folder decoded into memory (``data.in_memory=true``): the student alone and DIST from the in-memory cache.

    python benchmarks/bench_file_cache.py                                   # print the table
    python benchmarks/bench_file_cache.py --results benchmarks/RESULTS.md   # also write its section

The epoch time is the ``epoch_s`` of the last epoch in ``metrics.jsonl`` (the first includes start-up); every
configuration runs ``--repeats`` times, interleaved, and the median is reported. Threads: 1 torch thread in the
main process (one JPEG-decoding worker beside it), the honest setting on this shared 2-core machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from results_md import write_section  # noqa: E402

from distkd.api import build_teacher_cache, train  # noqa: E402
from distkd.config import load_config  # noqa: E402
from distkd.models import create_model  # noqa: E402

SECTION = "## Teacher cache for image folders"


def write_tree(root: Path, classes: int, per_class: int, size: int) -> None:
    """``root/{train,val}/cNN/*.jpg``: random smooth colour images (JPEG, as real folders are)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(2, per_class // 10))):
        for c in range(classes):
            folder = root / split / f"c{c:02d}"
            folder.mkdir(parents=True)
            for i in range(count):
                small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"{i}.jpg", quality=90)


def overrides(root: Path, out: Path, args: argparse.Namespace, teacher_ckpt: Path, name: str) -> list[str]:
    common = [f"data.root={root}", "data.name=imagefolder", f"data.image_size={args.image_size}", "data.preset=b1",
              f"data.batch_size={args.batch}", f"data.eval_batch_size={args.batch}", f"data.num_workers={args.workers}",
              f"model.name={args.student}", "model.kwargs={in_chans: 3}", "train.epochs=2",
              "train.progress=none", "train.threads=1", f"out_dir={out}", f"name={name}", "optim.lr=0.05"]
    if name.startswith("memory"):
        common.append("data.in_memory=true")
    if name.startswith(("alone", "memory_alone")):
        return common
    distill = [f"teacher.name={args.teacher}", f"teacher.checkpoint={teacher_ckpt}", "loss.distill=[{loss: dist}]"]
    if "cached" in name:
        folder = "memory_cache" if name.startswith("memory") else "cache"
        distill += [f"teacher_cache.views={args.views}", f"teacher_cache.dir={out / folder}"]
    return common + distill


def last_epoch_seconds(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "epoch_s" in r][-1]["epoch_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--teacher", default="tv_resnet18")
    parser.add_argument("--student", default="small_cnn3_w8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--results", type=Path, help="write the section into this RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "tree", Path(tmp) / "runs"
        write_tree(root, args.classes, args.per_class, args.image_size)
        teacher_ckpt = Path(tmp) / "teacher.pt"
        torch.save(create_model(args.teacher, num_classes=args.classes).state_dict(), teacher_ckpt)
        start = time.perf_counter()
        build_teacher_cache(load_config("demo/student.yaml", overrides(root, out, args, teacher_ckpt, "cached_build")))
        build_s = time.perf_counter() - start
        times: dict[str, list[float]] = {"alone": [], "live": [], "cached": [], "memory_alone": [],
                                         "memory_cached": []}
        for repeat in range(args.repeats):
            for kind in times:
                name = f"{kind}_{repeat}"
                train(load_config("demo/student.yaml", overrides(root, out, args, teacher_ckpt, name)))
                times[kind].append(last_epoch_seconds(out / name))
    load_after = os.getloadavg()
    median = {k: statistics.median(v) for k, v in times.items()}
    images = args.classes * args.per_class
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION, "",
        f"{stamp}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"1 torch thread + {args.workers} decoding worker(s); load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (other jobs shared the machine when it is above ~1). Generated folder: "
        f"{args.classes} classes x {args.per_class} JPEGs of {args.image_size} px, preset b1 (RandomResizedCrop + "
        f"flip), batch {args.batch}; student `{args.student}`, teacher `{args.teacher}` (random weights: only time "
        f"is measured); DIST; the cache holds {args.views} views per image. Epoch: the second of two (median of "
        f"{args.repeats} interleaved runs), `epoch_s` from `metrics.jsonl`.", "",
        "| training | s / epoch | × student alone |", "|---|---|---|",
        *(f"| {label} | {median[k]:.2f} | {median[k] / median['alone']:.2f} |" for k, label in
          (("alone", "student alone"), ("live", "DIST, live teacher"), ("cached", "DIST, teacher cache"),
           ("memory_alone", "in memory: student alone"), ("memory_cached", "in memory: DIST, teacher cache"))),
        "",
        f"The cached epoch takes {median['cached'] / median['live']:.2f}× the live-teacher epoch. Building the cache "
        f"({args.views} views × {images} images, one process, start-up included) took {build_s:.1f} s, "
        f"{build_s / args.views:.1f} s per view. In memory (`data.in_memory=true`: decoded once to uint8 at "
        f"{args.image_size} px, random crop with padding + flip on the device instead of RandomResizedCrop) the "
        f"cached DIST epoch takes {median['memory_cached'] / median['cached']:.2f}× the file-cache epoch.", "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.results:
        write_section(args.results, SECTION, text)


if __name__ == "__main__":
    main()
