"""Time forward+backward of DIST, KD and DKD and measure the peak extra memory of DIST and KD.

Usage: ``python benchmarks/bench_losses.py [--device cpu|cuda] [--repeats 9] [--threads 2]``.

Shapes: ``(N=256, C=1000)`` logits and dense ``(N=8, C=19, 128, 256)`` logits (Cityscapes-like
segmentation), plus the dense shape with a mask dropping ~10% of the positions. One repeat runs
every loss once, round-robin, so the DIST/KD ratio compares runs taken under the same load; the
table reports medians over the repeats.

Peak extra memory of one DIST (and KD) forward+backward, relative to the bytes of the student logits:

- CPU: the CPU allocator's allocation and free events recorded by ``torch.profiler``
  (``profile_memory=True``), summed in time order; the peak of that running sum.
- CUDA: ``torch.cuda.max_memory_allocated()`` minus the memory allocated before the call.

Both count every tensor the call allocates, including the gradient w.r.t. the student (one
input-sized tensor) and what autograd saves for backward.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from distkd.losses import DIST, DKD, KD

SHAPES = {
    "logits (256, 1000)": ((256, 1000), False),
    "dense (8, 19, 128, 256)": ((8, 19, 128, 256), False),
    "dense + mask (8, 19, 128, 256)": ((8, 19, 128, 256), True),
}


def make_inputs(shape: tuple[int, ...], masked: bool, device: torch.device) -> dict[str, object]:
    generator = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(shape, generator=generator)).to(device)
    teacher = (3 * torch.randn(shape, generator=generator)).to(device)
    positions = (shape[0], *shape[2:])
    target = torch.randint(0, shape[1], positions, generator=generator).to(device)
    mask = (torch.rand(positions, generator=generator) > 0.1).to(device) if masked else None
    return {"student": student, "teacher": teacher, "target": target, "mask": mask}


def step(loss: torch.nn.Module, inputs: dict[str, object]) -> None:
    """One forward+backward of ``loss`` w.r.t. a fresh leaf copy of the student logits."""
    student = inputs["student"].detach().requires_grad_()
    value = loss(student, inputs["teacher"], target=inputs["target"], mask=inputs["mask"], epoch=30)
    value.backward()


def timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def measure(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return measure


def peak_extra_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # The same temperature for all three, so no loss skips the division by tau.
    losses = {"DIST": DIST(tau=4.0), "KD": KD(tau=4.0), "DKD": DKD(tau=4.0)}
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {device.type} ({name}), threads={torch.get_num_threads()}")
    print(f"# median of {args.repeats} forward+backward runs, round-robin; times in ms")
    print("| shape | DIST | KD | DKD | DIST/KD | peak extra / input: DIST | KD |")
    print("|---|---|---|---|---|---|---|")
    measure = timer(device)
    for label, (shape, masked) in SHAPES.items():
        inputs = make_inputs(shape, masked, device)
        for loss in losses.values():
            step(loss, inputs)  # warm-up
        times: dict[str, list[float]] = {key: [] for key in losses}
        for _ in range(args.repeats):
            for key, loss in losses.items():
                times[key].append(measure(partial(step, loss, inputs)))
        median = {key: 1e3 * statistics.median(values) for key, values in times.items()}
        input_bytes = inputs["student"].numel() * inputs["student"].element_size()
        peak = {key: peak_extra_bytes(partial(step, losses[key], inputs), device) for key in ("DIST", "KD")}
        print(
            f"| {label} | {median['DIST']:.2f} | {median['KD']:.2f} | {median['DKD']:.2f} "
            f"| {median['DIST'] / median['KD']:.2f} | {peak['DIST'] / input_bytes:.1f} "
            f"| {peak['KD'] / input_bytes:.1f} |"
        )


if __name__ == "__main__":
    main()
