"""Cost of feature taps and adapters: one training step with a FitNet or CRD term vs a logit-DIST step, same pair.

Usage: ``python benchmarks/bench_terms.py [--teacher cifar_resnet32x4] [--student cifar_resnet8x4] [--batch 64]
[--steps 5] [--repeats 5] [--threads 1] [--device cpu|cuda]``.

Each step is what the trainer runs: the Distiller's forward (student with CE, live teacher without gradient, the
term), backward, SGD step. The terms use the zoo's ready names as the bundled cifar100-methods configs do: DIST on
the logits (weight 2, tau 4), FitNet on ``stage2`` (RepDistiller's hint layer), CRD on ``penultimate`` (nce_k 16384
over a 50,000-sample bank, as on CIFAR-100). One repeat runs every kind once, round-robin, so the ratios compare
runs under the same load; medians over repeats are reported with the machine's load and thread count.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from distkd.bench import machine
from distkd.data.batch import Batch
from distkd.distill import Distiller, SingleInputStep, Term
from distkd.engine.cpu import tune_malloc
from distkd.losses import build_loss
from distkd.models import create_model

TERMS = {
    "dist": lambda: Term("dist", build_loss("dist", tau=4.0), 2.0),
    "fitnet": lambda: Term("fitnet", build_loss("fitnet"), 100.0, "stage2", "stage2"),
    "crd": lambda: Term("crd", build_loss("crd"), 0.8, "penultimate", "penultimate", "flatten"),
}
DATASET = 50_000


def step_fn(args: argparse.Namespace, kind: str, device: torch.device):  # noqa: ANN201 - a closure
    torch.manual_seed(0)
    student = create_model(args.student, num_classes=100).to(device)
    teacher = create_model(args.teacher, num_classes=100).to(device)
    step = SingleInputStep(lambda out, y: {"ce": F.cross_entropy(out, y)})
    distiller = Distiller(student, teacher, [TERMS[kind]()], step).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(100, (args.batch,), generator=gen).to(device)
    index = torch.randperm(DATASET, generator=gen)[: args.batch].to(device)
    batch = Batch(x, y, index)
    distiller.probe(batch, dataset_size=DATASET)
    distiller.to(device).train()
    params = [*student.parameters(), *(p for _, ps in distiller.term_parameters() for p in ps)]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def run() -> None:
        loss = sum(distiller(batch).losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="cifar_resnet32x4")
    parser.add_argument("--student", default="cifar_resnet8x4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runs = {kind: step_fn(args, kind, device) for kind in TERMS}
    for run in runs.values():  # warm-up
        run()
    seconds: dict[str, list[float]] = {kind: [] for kind in runs}
    info = machine(device)
    for _ in range(args.repeats):
        for kind, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.steps):
                run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[kind].append((time.perf_counter() - start) / args.steps)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {"machine": info | {"load_average_end": machine(device)["load_average_start"]},
              "settings": vars(args), "ms_per_step": {k: 1000 * v for k, v in median.items()},
              "ratio_to_dist": {k: v / median["dist"] for k, v in median.items()}}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
