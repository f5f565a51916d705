"""DIST vs KD on the CPU, quiet and with a competing busy process, for several DIST chunk sizes.

    python benchmarks/bench_dist_contention.py [--threads 2] [--repeats 7] [--chunks 131072,524288]

Dense Cityscapes-like logits ``(8, 19, 128, 256)``, fp32, tau 4, forward+backward w.r.t. the student. Phase
"quiet" runs alone; phase "busy" starts one pure-Python spinning process per ``--busy`` (default 1) for its
duration, so one of the machine's cores is taken as another job would take it. In each phase one repeat runs KD
and DIST at every chunk size (``CPU_CHUNK_ELEMENTS``, elements per torch thread and chunk) once, round-robin,
and the table gives medians, so each ratio compares runs taken under the same load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

import torch  # noqa: E402

from distkd.losses import DIST, KD, _relations  # noqa: E402

SHAPE = (8, 19, 128, 256)


def fwd_bwd_ms(loss: torch.nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> float:
    leaf = student.detach().requires_grad_()
    start = time.perf_counter()
    loss(leaf, teacher).backward()
    return 1e3 * (time.perf_counter() - start)


def phase(chunks: list[int], repeats: int, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """Median ms of KD and of DIST at each chunk size, round-robin."""
    kd, dist = KD(tau=4.0), DIST(tau=4.0)
    times: dict[str, list[float]] = {"KD": [], **{f"DIST {c}": [] for c in chunks}}
    for _ in range(repeats):
        times["KD"].append(fwd_bwd_ms(kd, student, teacher))
        for c in chunks:
            _relations.CPU_CHUNK_ELEMENTS = c
            times[f"DIST {c}"].append(fwd_bwd_ms(dist, student, teacher))
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunks", default=f"{1 << 17},{1 << 19},{1 << 30}",
                        help="comma-separated CPU_CHUNK_ELEMENTS values (2^30: one chunk)")
    parser.add_argument("--busy", type=int, default=1, help="competing spinning processes in the busy phase")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    chunks = [int(c) for c in args.chunks.split(",")]
    generator = torch.Generator().manual_seed(0)
    student, teacher = 3 * torch.randn(SHAPE, generator=generator), 3 * torch.randn(SHAPE, generator=generator)
    phase(chunks, 1, student, teacher)  # warm-up
    results = {"quiet": (os.getloadavg()[0], phase(chunks, args.repeats, student, teacher))}
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        time.sleep(1.0)
        results["busy"] = (os.getloadavg()[0], phase(chunks, args.repeats, student, teacher))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    print(f"# torch {torch.__version__}, threads={torch.get_num_threads()}, {os.cpu_count()} cores, "
          f"{args.busy} spinning process(es) in the busy phase; dense {SHAPE}; medians of {args.repeats}, ms")
    print("| phase (1-min load at start) | KD ms | " + " | ".join(f"DIST chunk {c} ms (x KD)" for c in chunks) + " |")
    print("|---|---:|" + "---:|" * len(chunks))
    for name, (load, medians) in results.items():
        cells = " | ".join(f"{medians[f'DIST {c}']:.1f} ({medians[f'DIST {c}'] / medians['KD']:.2f}x)"
                           for c in chunks)
        print(f"| {name} ({load:.1f}) | {medians['KD']:.1f} | {cells} |")


if __name__ == "__main__":
    main()
