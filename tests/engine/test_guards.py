"""Input mistakes that must end in one clear line rather than a traceback, and what resume tolerates."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from distkd.config import load_config
from distkd.data.batch import Batch
from distkd.distill import Distiller, Term
from distkd.errors import ConfigError
from distkd.losses import build_loss
from distkd.models import create_model


def test_an_empty_loss_is_refused(make_config, run_train, tmp_path):
    with pytest.raises(ConfigError, match="the loss is empty"):
        run_train(make_config("demo/student.yaml", tmp_path, "loss.ce_weight=0"))


def test_a_number_given_for_a_string_field_is_taken_as_its_text():
    assert load_config(None, ["name=2021"]).name == "2021"


def test_a_term_naming_an_output_entry_the_model_lacks_is_a_config_error():
    student = create_model("small_cnn3_w2", num_classes=10)
    teacher = create_model("small_cnn3_w2", num_classes=10)
    distiller = Distiller(student, teacher, [Term("kd_aux", build_loss("kd"), 1.0, "aux", "aux")])
    with pytest.raises(ConfigError, match="output is one tensor, not 'aux'"):
        distiller(Batch(torch.randn(2, 1, 28, 28), torch.tensor([0, 1])))


def test_resume_accepts_other_threads_device_and_progress_settings(make_config, run_train, tmp_path):
    run_train(make_config("demo/student.yaml", tmp_path, "train.epochs=1"))
    changed = make_config("demo/student.yaml", tmp_path, "train.epochs=1", "train.threads=2", "train.device=cpu",
                          "train.progress=lines")
    summary = run_train(changed, resume=True)
    assert summary["epochs"] == 1


def test_importing_distkd_does_not_import_torch():
    code = "import sys, distkd; assert 'torch' not in sys.modules; distkd.DIST; assert 'torch' in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.slow
def test_train_compile_compiles_the_training_forward_and_keeps_plain_checkpoints(make_config, run_train, tmp_path):
    from torch._dynamo.utils import counters

    counters.clear()
    cfg = make_config("demo/student.yaml", tmp_path, "train.epochs=1", "train.compile=true")
    summary = run_train(cfg)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the student's forward
    assert 0 <= summary["best_test"] <= 100
    state = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert not any(k.startswith("_orig_mod.") for k in state)


def test_a_teacher_with_hub_weights_needs_no_checkpoint_but_one_without_either_is_refused():
    from distkd.config import ModelConfig
    from distkd.tasks.common import build_model

    with pytest.raises(ConfigError, match="teacher.checkpoint is required"):
        build_model(ModelConfig(name="small_cnn3_w2"), 10, "teacher")
    # pretrained=True reaches the model's own hub loading (offline here: its one-line error, not ours)
    from distkd.errors import CheckpointError

    with pytest.raises(CheckpointError, match="weights"):
        build_model(ModelConfig(name="timm_resnet18", kwargs={"pretrained": True}), 10, "teacher")
