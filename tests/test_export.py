"""``distkd export``: the student alone in every format, read back by the format's own runtime, with its sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

from distkd import export as export_module
from distkd.cli import main
from distkd.data.silhouettes import CLASSES, MEAN, STD
from distkd.engine.checkpoint import load_state
from distkd.errors import CheckpointError, ConfigError, ExportError
from distkd.export import export, load_student
from distkd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(count: int = 6) -> torch.Tensor:
    return torch.randn(count, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def _reference(run_dir: Path, name: str = "best.pt", key: str = "model") -> torch.nn.Module:
    """The student rebuilt by hand from the checkpoint's entry ``key``."""
    model = create_model("small_cnn3_w4", num_classes=10)
    model.load_state_dict(load_state(run_dir / "checkpoints" / name)[key])
    return model.eval()


def test_every_checkpoint_records_class_names_and_preprocessing(teacher_run) -> None:
    run_dir, _ = teacher_run
    for name in ("best.pt", "last.pt"):
        meta = load_state(run_dir / "checkpoints" / name)["meta"]
        assert meta["classes"] == list(CLASSES)
        assert meta["preprocess"] == {"channels": 1, "size": [28, 28], "resize": None, "interpolation": "bilinear",
                                      "mean": list(MEAN), "std": list(STD)}


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # reading TorchScript back is what is tested
@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "torchscript", "onnx"])
def test_each_format_holds_the_best_student_alone_and_reproduces_its_logits(teacher_run, tmp_path, fmt) -> None:
    run_dir, _ = teacher_run
    info = export(run_dir, fmt, tmp_path / f"model{export_module.FORMATS[fmt]}")
    path = Path(info["path"])
    x = _inputs()
    with torch.no_grad():
        expected = _reference(run_dir)(x)
    if fmt == "state_dict":
        state = torch.load(path, weights_only=True)
        assert set(state) == set(create_model("small_cnn3_w4", num_classes=10).state_dict())  # no teacher, no terms
        got = create_model("small_cnn3_w4", num_classes=10, weights=path).eval()(x)
    elif fmt == "safetensors":
        model = create_model("small_cnn3_w4", num_classes=10)
        model.load_state_dict(load_file(str(path)))
        got = model.eval()(x)
    elif fmt == "torchscript":
        got = torch.jit.load(str(path))(x)
    else:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])  # a batch of 6: the batch axis is dynamic
    tolerance = 0 if fmt in ("state_dict", "safetensors") else 1e-4 * max(1.0, expected.abs().max().item())
    assert (got.detach() - expected).abs().max().item() <= tolerance
    sidecar = json.loads(Path(info["sidecar"]).read_text())
    assert sidecar["classes"] == list(CLASSES) and sidecar["input_shape"] == [1, 28, 28]
    assert sidecar["model"] == {"name": "small_cnn3_w4", "kwargs": {}} and sidecar["format"] == fmt
    assert sidecar["source"]["weights"] == "best" and sidecar["check"]["max_abs_difference"] <= tolerance


def test_default_output_is_the_runs_export_folder_and_last_picks_last_pt(teacher_run, capsys) -> None:
    run_dir, _ = teacher_run
    assert main(["export", str(run_dir), "--format", "state_dict", "--last"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("exported last weights of") and "max |logit difference| 0 " in out
    path = run_dir / "export" / "student_last.pt"
    expected = _reference(run_dir, "last.pt").state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in torch.load(path, weights_only=True).items())


def test_ema_exports_the_ema_weights(make_config, run_train, tmp_path) -> None:
    cfg = make_config("demo/teacher.yaml", tmp_path, "train.max_steps=3", "train.ema_decay=0.5",
                      "model.name=small_cnn3_w4")
    run_train(cfg)
    info = export(cfg.run_dir, "state_dict", ema=True)
    assert info["source"]["weights"] == "best_ema" and info["path"].endswith("student_ema.pt")
    ema = load_state(cfg.run_dir / "checkpoints" / "best.pt")["ema"]
    assert all(torch.equal(v, ema[k]) for k, v in torch.load(info["path"], weights_only=True).items())


def test_bad_export_requests_are_one_line_errors(teacher_run, tmp_path, monkeypatch) -> None:
    run_dir, _ = teacher_run
    with pytest.raises(ConfigError, match="holds no EMA weights"):
        load_student(run_dir, ema=True)
    with pytest.raises(ConfigError, match="--last picks checkpoints/last.pt of a run folder"):
        load_student(run_dir / "checkpoints" / "best.pt", last=True)
    with pytest.raises(CheckpointError, match="holds no checkpoints/best.pt"):
        load_student(tmp_path)
    old = load_state(run_dir / "checkpoints" / "best.pt")
    del old["config"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="holds no run config, so its model is unknown"):
        load_student(tmp_path / "old.pt")
    monkeypatch.setattr(export_module, "_importable", lambda name: name != "onnxruntime")
    with pytest.raises(ExportError, match=r"needs onnxruntime \(not installed\); pip install 'distkd\[export\]'"):
        export(run_dir, "onnx", tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_a_checkpoint_older_than_the_record_gets_it_from_its_dataset(teacher_run, tmp_path, capsys) -> None:
    run_dir, _ = teacher_run
    state = load_state(run_dir / "checkpoints" / "best.pt")
    meta = state.pop("meta")
    torch.save(state, tmp_path / "old.pt")
    student = load_student(tmp_path / "old.pt")
    assert "predates the record of class names and preprocessing" in capsys.readouterr().err
    assert student.classes == meta["classes"] and student.preprocess.to_dict() == meta["preprocess"]


def test_a_segmentation_checkpoint_is_a_one_line_error_naming_its_task(tmp_path) -> None:
    from distkd.config import load_config, resolve_config_path, to_dict

    config = to_dict(load_config(resolve_config_path("demo/seg_student.yaml")))
    torch.save({"model": {}, "epoch": 1, "config": config}, tmp_path / "seg.pt")
    with pytest.raises(CheckpointError) as caught:
        load_student(tmp_path / "seg.pt")
    message = str(caught.value)
    assert "is a segmentation run; export and predict take classification and detection students" in message
    assert "\n" not in message
