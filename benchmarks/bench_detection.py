"""Detection step costs: student step, teacher forward (backbone + heads only), live DIST step.

The demo's RetinaNets (``configs/demo/det_*.yaml``: teacher widths 32-64-128 / FPN 64, student 8-16-32 / FPN 16)
on a batch of silhouette scenes with boxes (96 px). Each repeat runs, round-robin, a student step (forward with
its task losses + backward), a teacher forward through the detection step (no gradient) and a distillation step
(student + teacher + per-level sigmoid DIST, backward); the medians in ms are printed with the ratio
``distill / (student + teacher)`` (the overhead of the terms and of the bookkeeping).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_detection.py --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from distkd.data.coco import DetectionLoader, coco_split
from distkd.data.detection_scenes import make_detection_scenes
from distkd.distill import Distiller, Term
from distkd.losses import build_loss
from distkd.models import create_model
from distkd.tasks.detection import DetectionStep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--family", choices=("retinanet", "fasterrcnn"), default="retinanet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        data = coco_split(make_detection_scenes(folder, train=args.batch, val=0, test=0), "train")
        batch = next(iter(DetectionLoader(data, batch_size=args.batch, shuffle=False, drop_last=True, seed=0)))
    name = f"det_{args.family}_tiny"
    student = create_model(name, num_classes=10, widths=[8, 16, 32], fpn_channels=16)
    teacher = create_model(name, num_classes=10, widths=[32, 64, 128], fpn_channels=64)
    keys = ("cls_logits", "cls_logits") if args.family == "retinanet" else ("logits", "logits")
    loss = build_loss("dist", activation="sigmoid" if args.family == "retinanet" else "softmax")
    step = DetectionStep().bind(student)
    alone = Distiller(student, None, [], step)
    distiller = Distiller(student, teacher, [Term("dist", loss, 1.0, *keys)], step)
    distiller.probe(batch)
    alone.train(), distiller.train()

    def student_step() -> None:
        sum(alone(batch).losses.values()).backward()

    def teacher_forward() -> None:
        with torch.no_grad():
            output, _ = step.student(student, batch)  # the transformed batch (and RoIs) the teacher is fed
        start = time.perf_counter()
        distiller.run_teacher(batch, output)
        timings["teacher"].append(time.perf_counter() - start)

    def distill_step() -> None:
        sum(distiller(batch).losses.values()).backward()

    timings: dict[str, list[float]] = {"student": [], "teacher": [], "distill": []}
    for repeat in range(args.repeats + 2):
        for key, fn in (("student", student_step), ("distill", distill_step)):
            start = time.perf_counter()
            fn()
            if repeat >= 2:  # two warm-up rounds
                timings[key].append(time.perf_counter() - start)
            student.zero_grad(set_to_none=True)
        teacher_forward()
    timings["teacher"] = timings["teacher"][2:]
    ms = {k: 1000 * statistics.median(v) for k, v in timings.items()}
    ratio = ms["distill"] / (ms["student"] + ms["teacher"])
    print(f"{args.family}, batch {args.batch} x 96 px, threads {args.threads}, {args.repeats} repeats (median ms): "
          f"student step {ms['student']:.1f}, teacher forward {ms['teacher']:.1f}, distill step {ms['distill']:.1f}; "
          f"distill / (student + teacher) = {ratio:.2f}")


if __name__ == "__main__":
    main()
