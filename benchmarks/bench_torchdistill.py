"""distkd vs torchdistill: DIST training epochs of the same pair, batch and augmentation, in one process and run.

Both sides train the same student (distkd's CIFAR zoo definitions, created from the same seed) with CE + 2 x DIST
(tau 4, beta = gamma = 1), SGD (lr 0.05, momentum 0.9, weight decay 5e-4), batch 64, on CIFAR-shaped random uint8
images (3x32x32, 100 classes) with random crop (padding 4) + horizontal flip + normalisation:

- distkd: its training loop (``Trainer._train_epoch``: TensorLoader batch augmentation, Distiller, optimizer and
  scheduler step), teacher in eval mode under no_grad; with its default ``train.channels_last=true`` and,
  to separate that setting's share, with ``train.channels_last=false`` (torchdistill keeps PyTorch's NCHW);
- torchdistill: its ``DistillationBox`` (``forward_process`` / ``post_forward_process``) with its ``DISTLoss`` in
  a ``WeightedSumLoss`` beside CE, fed by a torch DataLoader over PIL images with torchvision's RandomCrop,
  RandomHorizontalFlip, ToTensor and Normalize, iterated as its example script's ``train_one_epoch`` does. Its
  example loop never puts the teacher in eval mode, so the teacher's BatchNorm normalises with batch statistics
  and updates its running statistics; ``torchdistill, teacher eval`` also runs with ``teacher.eval()`` for a fair
  comparison of the loop itself.

The four variants run round-robin, one epoch each per round, after one warm-up epoch each; the figure is the
median over rounds. Run it with a Python that has torchdistill, distkd on the path, e.g.

    python3 -m venv /tmp/tdvenv && /tmp/tdvenv/bin/pip install -c constraints.txt torchdistill
    PYTHONPATH=src /tmp/tdvenv/bin/python benchmarks/bench_torchdistill.py --teacher cifar_resnet56 \\
        --student cifar_resnet20

Without torchdistill the distkd half still runs and the torchdistill half is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967295"}
if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision.transforms as T  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from distkd.bench import machine  # noqa: E402
from distkd.config import RunConfig, TrainConfig  # noqa: E402
from distkd.data.augment import CropFlip  # noqa: E402
from distkd.data.base import Split  # noqa: E402
from distkd.data.loaders import TensorLoader  # noqa: E402
from distkd.distill import Distiller, SingleInputStep, Term  # noqa: E402
from distkd.engine.trainer import Trainer, TrainSetup  # noqa: E402
from distkd.losses import build_loss  # noqa: E402
from distkd.models import create_model  # noqa: E402

MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)  # CIFAR-100
LR, MOMENTUM, WEIGHT_DECAY, DIST_WEIGHT, TAU = 0.05, 0.9, 5e-4, 2.0, 4.0


class PILImages(Dataset):
    """``(image, label)`` from uint8 HWC arrays through PIL, as torchvision's CIFAR datasets yield them."""

    def __init__(self, images: np.ndarray, labels: list[int], transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(Image.fromarray(self.images[index])), self.labels[index]


def models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """A fresh (teacher, student) pair; every call gives the same weights."""
    torch.manual_seed(0)
    return create_model(args.teacher, num_classes=args.classes), create_model(args.student, num_classes=args.classes)


def distkd_epoch(args: argparse.Namespace, split: Split, run_dir: Path, channels_last: bool) -> Callable[[int], None]:
    """One epoch of distkd's own loop, as ``distkd train`` runs it."""
    teacher, student = models(args)
    cfg = RunConfig(train=TrainConfig(epochs=1000, device="cpu", channels_last=channels_last, progress="none"))
    cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = LR, MOMENTUM, WEIGHT_DECAY
    cfg.schedule.name = "constant"
    loader = TensorLoader(split, batch_size=args.batch, mean=MEAN, std=STD, augment=CropFlip(4, True), shuffle=True,
                          drop_last=True, channels_last=channels_last)

    def cross_entropy(output: Tensor, target: Tensor) -> dict[str, Tensor]:
        return {"ce": F.cross_entropy(output.float(), target)}

    dist = build_loss("dist", beta=1.0, gamma=1.0, tau=TAU)
    distiller = Distiller(student, teacher, [Term("dist", dist, DIST_WEIGHT)], SingleInputStep(cross_entropy))
    trainer = Trainer(cfg, TrainSetup(distiller, loader, loader, None, lambda m, loader: {}, "top1"),
                      torch.device("cpu"), run_dir)

    def epoch(index: int) -> None:
        trainer.epoch = index
        trainer._train_epoch()

    return epoch


def torchdistill_epoch(args: argparse.Namespace, images: np.ndarray, labels: list[int],
                       teacher_eval: bool) -> Callable[[int], None]:
    """One epoch of torchdistill's DistillationBox, iterated as its example script's ``train_one_epoch``."""
    from torchdistill.core.distillation import get_distillation_box

    teacher, student = models(args)
    if teacher_eval:
        teacher.eval()
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    loader_config = {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
                     "kwargs": {"batch_size": args.batch, "num_workers": args.workers, "drop_last": True}}
    criterion = {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {
        "ce": {"criterion": {"key": "CrossEntropyLoss", "kwargs": {"reduction": "mean"}},
               "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                   "input": {"is_from_teacher": False, "module_path": ".", "io": "output"},
                   "target": {"uses_label": True}}},
               "weight": 1.0},
        "dist": {"criterion": {"key": "DISTLoss", "kwargs": {
            "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
            "teacher_module_io": "output", "beta": 1.0, "gamma": 1.0, "tau": TAU}},
            "weight": DIST_WEIGHT}}}}
    hooks = {"forward_proc": "forward_batch_only", "sequential": [], "forward_hook": {"input": [], "output": []}}
    train_config = {
        "num_epochs": 1000, "train_data_loader": loader_config,
        "teacher": {**hooks, "requires_grad": False},
        "student": {**hooks, "requires_grad": True, "frozen_modules": []},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "criterion": criterion,
    }
    box = get_distillation_box(teacher, student, {"train": PILImages(images, labels, transform)}, train_config,
                               torch.device("cpu"), None, False, 1.0)

    def epoch(index: int) -> None:
        box.pre_epoch_process(epoch=index)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            if not torch.isfinite(loss):
                raise ValueError(f"torchdistill's loss became {loss.item()}")

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="cifar_resnet56")
    parser.add_argument("--student", default="cifar_resnet20")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch (the dataset holds steps x batch)")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs of each variant, round-robin")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0, help="torchdistill DataLoader workers (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    count = args.steps * args.batch
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, args.classes, count).tolist()
    split = Split(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels))

    info = machine(torch.device("cpu"))
    variants: dict[str, Callable[[int], None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants["distkd"] = distkd_epoch(args, split, Path(tmp), channels_last=True)
        variants["distkd, NCHW (train.channels_last=false)"] = distkd_epoch(args, split, Path(tmp), channels_last=False)
        try:
            import torchdistill
        except ImportError:
            print("torchdistill is not installed in this Python: skipping its half (install it into a separate "
                  "venv: python3 -m venv /tmp/tdvenv && /tmp/tdvenv/bin/pip install -c constraints.txt "
                  "torchdistill, then run this script with /tmp/tdvenv/bin/python and PYTHONPATH=src)",
                  file=sys.stderr)
        else:
            info["torchdistill"] = torchdistill.__version__
            variants["torchdistill (example loop: teacher in train mode)"] = torchdistill_epoch(
                args, images, labels, teacher_eval=False)
            variants["torchdistill, teacher eval"] = torchdistill_epoch(args, images, labels, teacher_eval=True)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for epoch in variants.values():
            epoch(0)  # warm-up
        for round_index in range(1, args.rounds + 1):
            for name, epoch in variants.items():
                start = time.perf_counter()
                epoch(round_index)
                seconds[name].append(time.perf_counter() - start)
    info["load_average_end"] = list(os.getloadavg())
    rate = {name: count / statistics.median(s) for name, s in seconds.items()}
    result = {"settings": vars(args), "machine": info, "images_per_s": rate, "epoch_seconds": seconds,
              "distkd_speedup": {name: rate["distkd"] / r for name, r in rate.items() if name != "distkd"}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.steps} steps/epoch, {args.rounds} rounds; "
          f"torch {info['torch']}, {info['threads']} threads, torchdistill {info.get('torchdistill', 'absent')}, "
          f"DataLoader workers {args.workers}; load {info['load_average_start']} -> {info['load_average_end']}")
    for name, value in rate.items():
        speedup = result["distkd_speedup"].get(name)
        print(f"{name:<55}{value:>10.1f} images/s" + (f"   distkd is {speedup:.2f}x" if speedup else ""))


if __name__ == "__main__":
    main()
