"""Every registered distillation method, a few steps end to end through `distkd train` on generated CIFAR-100 files:
the shape probe sizes its state, it trains, and its state lands in the checkpoint beside the bare student."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from distkd.config import load_config
from distkd.losses import list_losses
from distkd.models import create_model

sys.path.insert(0, str(Path(__file__).parent / "data"))
from test_cifar import write_cifar100  # noqa: E402

FEATURES = ["layer1", "layer2", "layer3"]
# What each method compares on the CIFAR ResNets (student cifar_resnet8, teacher cifar_resnet14): its usual tap.
TERMS: dict[str, dict] = {
    "kd": {}, "deit": {}, "dist": {}, "dkd": {}, "ls_kd": {}, "ls_dkd": {}, "ls_dist": {}, "mlkd": {}, "ctkd": {},
    "nkd": {}, "wttm": {},
    "fitnet": {"student": "layer2", "teacher": "layer2"},
    "mimic": {"student": "layer2", "teacher": "layer2"},
    "at": {"student": "layer3", "teacher": "layer3"},
    "nst": {"student": "layer3", "teacher": "layer3"},
    "sp": {"student": "layer3", "teacher": "layer3"},
    "vid": {"student": "layer3", "teacher": "layer3"},
    "ab": {"student": "layer3", "teacher": "layer3"},
    "ft": {"student": "layer3", "teacher": "layer3"},
    "ofd": {"student": "layer3", "teacher": "layer3"},
    "cc": {"student": "avgpool", "teacher": "avgpool", "transform": "flatten"},
    "rkd": {"student": "avgpool", "teacher": "avgpool", "transform": "flatten"},
    "pkt": {"student": "avgpool", "teacher": "avgpool", "transform": "flatten"},
    "crd": {"student": "avgpool", "teacher": "avgpool", "transform": "flatten", "kwargs": {"nce_k": 64}},
    "kdsvd": {"student": FEATURES, "teacher": FEATURES},
    "fsp": {"student": FEATURES, "teacher": FEATURES},
    "reviewkd": {"student": [*FEATURES, "avgpool"], "teacher": [*FEATURES, "avgpool"]},
}


def test_every_registered_method_has_an_end_to_end_case() -> None:
    assert sorted(TERMS) == list_losses()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Generated CIFAR-100 files (2 training images per class) and a random cifar_resnet14 teacher's weights."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root, per_class_train=2, per_class_test=1)
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    torch.save(create_model("cifar_resnet14", num_classes=100).state_dict(), teacher)
    return root, teacher


@pytest.mark.parametrize("method", sorted(TERMS))
def test_a_method_trains_end_to_end_and_saves_its_state(method: str, cifar, tmp_path: Path, run_train) -> None:
    root, teacher = cifar
    term = {"loss": method, "weight": 1.0, **TERMS[method]}
    cfg = load_config(None, [
        "data.name=cifar100", f"data.root={root}", "data.batch_size=16", "data.eval_batch_size=100",
        "model.name=cifar_resnet8", "teacher.name=cifar_resnet14", f"teacher.checkpoint={teacher}",
        f"loss.distill=[{term}]".replace("'", ""), "train.max_steps=3", "train.threads=1", "train.progress=none",
        "train.amp=none", "train.channels_last=false", "optim.lr=0.01", f"out_dir={tmp_path}", f"name={method}",
    ])
    summary = run_train(cfg)
    assert summary["steps"] == 3
    last = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)
    create_model("cifar_resnet8", num_classes=100).load_state_dict(last["model"], strict=True)
    saved = sum(v.numel() for v in last["terms"].values() if v.is_floating_point())
    assert saved >= summary["term_parameters"]  # the terms' trainable state is in the checkpoint
    record = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    logged = [k for k in record if k.startswith(f"train/{method}")]
    assert logged and all(math.isfinite(record[k]) for k in logged)
