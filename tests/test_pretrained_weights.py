"""Starting from pretrained weights (``model.weights``): a new head for your classes, the rest strict; and a teacher
whose distkd checkpoint names its model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distkd.cli import main
from distkd.config import load_config
from distkd.engine.checkpoint import load_state
from distkd.errors import CheckpointError, ConfigError
from distkd.models import create_model
from distkd.models.weights import load_pretrained
from distkd.tasks.common import build_model, resolve_teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_1000_class_timm_file_starts_a_3_class_model_with_a_new_head(tmp_path: Path) -> None:
    source = create_model("timm_resnet10t", num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "in1k.pth")
    model = create_model("timm_resnet10t", num_classes=3)
    fresh_head = model.fc.weight.detach().clone()
    dropped = load_pretrained(model, tmp_path / "in1k.pth")
    assert dropped == {"fc.weight": [1000, 512], "fc.bias": [1000]}
    state, loaded = source.state_dict(), model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if not k.startswith("fc."))
    assert torch.equal(model.fc.weight, fresh_head) and model.fc.weight.shape == (3, 512)


def test_a_file_whose_head_fits_loads_whole_and_another_architecture_is_refused(tmp_path: Path) -> None:
    source = create_model("small_cnn3_w4", num_classes=3)
    torch.save(source.state_dict(), tmp_path / "same.pt")
    model = create_model("small_cnn3_w4", num_classes=3)
    assert load_pretrained(model, tmp_path / "same.pt") == {}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    torch.save(create_model("small_cnn6_w32", num_classes=1000).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"^teacher.weights '.*other.pt' does not fit model 'small_cnn3_w4' "
                                              r"apart from its classifier \(fc\): .*missing.*shape mismatch"):
        load_pretrained(create_model("small_cnn3_w4", num_classes=3), tmp_path / "other.pt", "teacher.weights")


def test_fine_tuning_from_a_1000_class_file_on_an_image_folder(folder_run, tmp_path, capsys, fast_overrides,
                                                               folder_train) -> None:
    folder = folder_run[0]
    source = create_model("small_cnn3_w4", num_classes=1000, in_chans=3)
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    args = ["train", "demo/teacher.yaml", *fast_overrides, *folder_train, "model.name=small_cnn3_w4",
            f"data.root={folder}", f"model.weights={tmp_path / 'pretrained.pth'}", "optim.lr=1.0e-9",
            "optim.weight_decay=0", f"out_dir={tmp_path / 'runs'}", "name=finetuned"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"model.weights: loaded {tmp_path / 'pretrained.pth'} except its classifier (fc.weight [1000, 16], " \
           "fc.bias [1000]): a new 3-class head, initialised afresh" in out
    trained = load_state(tmp_path / "runs" / "finetuned" / "checkpoints" / "last.pt")["model"]
    assert trained["fc.weight"].shape == (3, 16)
    for key in ("features.0.weight", "features.4.weight", "features.8.weight"):  # lr 1e-9: still the file's
        assert torch.allclose(trained[key], source.state_dict()[key], atol=1e-6)


def test_weights_config_errors_name_the_key(tmp_path: Path) -> None:
    torch.save(create_model("small_cnn3_w4", num_classes=1000).state_dict(), tmp_path / "in1k.pt")
    with pytest.raises(ConfigError, match="give a model either checkpoint .* or weights .*, not both"):
        load_config("demo/teacher.yaml", ["model.checkpoint=a.pt", "model.weights=b.pt"])
    cfg = load_config("demo/kd.yaml", ["teacher.name=small_cnn3_w4", f"teacher.weights={tmp_path / 'in1k.pt'}"])
    with pytest.raises(ConfigError, match="^teacher.weights: the classifier of .* does not fit 10 classes"):
        build_model(cfg.teacher, 10, "teacher")
    cfg = load_config("demo/teacher.yaml", ["model.name=small_cnn3_w4", f"model.weights={tmp_path / 'in1k.pt'}",
                                            "model.kwargs.pretrained=true"])
    with pytest.raises(ConfigError, match="model.weights and model.kwargs.pretrained=true both give pretrained"):
        build_model(cfg.model, 10, "student")
    cfg = load_config("demo/teacher.yaml", ["model.checkpoint=" + str(tmp_path / "in1k.pt")])
    with pytest.raises(CheckpointError, match=r"^model.checkpoint '.*in1k.pt' does not fit model 'small_cnn6_w32'"):
        build_model(cfg.model, 10, "student")


def test_teacher_name_comes_from_a_distkd_checkpoint(teacher_run, tmp_path: Path, capsys) -> None:
    run_dir, _ = teacher_run
    best = run_dir / "checkpoints" / "best.pt"
    cfg = load_config("demo/student.yaml", [f"teacher.checkpoint={best}", "loss.distill=[{loss: kd}]"])
    assert cfg.teacher.name is None
    resolved = resolve_teacher(cfg)
    assert resolved.teacher.name == "small_cnn3_w4" and resolved.teacher.kwargs == {}
    assert capsys.readouterr().out == f"teacher: small_cnn3_w4 (recorded in {best})\n"
    torch.save(load_state(best)["model"], tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="^teacher.name is required: teacher.checkpoint .*plain.pt is not a distkd"):
        resolve_teacher(load_config("demo/student.yaml", [f"teacher.checkpoint={tmp_path / 'plain.pt'}"]))
    with pytest.raises(ConfigError, match=r"^teacher.name is required \(e.g. teacher.name=timm_resnet50\)"):
        resolve_teacher(load_config("demo/student.yaml", ["teacher.kwargs={}"]))
