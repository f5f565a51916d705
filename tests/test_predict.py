"""``distkd predict``: top-k classes of image files from a run, a checkpoint or each exported format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distkd.cli import main
from distkd.data.silhouettes import CLASSES, MEAN, STD
from distkd.errors import ConfigError, DataError
from distkd.export import FORMATS, export
from distkd.models import create_model
from distkd.predict import image_files, predict

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Four files: two grayscale 28x28, an RGB 40x30 and one in a sub-folder."""
    rng = np.random.default_rng(3)
    (tmp_path / "img" / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "img" / "b.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / "c.png")
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "img" / "sub" / "d.png")
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    return tmp_path / "img"


def test_probabilities_are_the_softmax_of_the_students_logits(teacher_run, images) -> None:
    run_dir, _ = teacher_run
    results = predict(run_dir, [images / "a.png"], top_k=3)
    model = create_model("small_cnn3_w4", num_classes=10)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"])
    pixels = torch.from_numpy(np.asarray(Image.open(images / "a.png"), dtype=np.float32) / 255)
    x = ((pixels - MEAN[0]) / STD[0])[None, None]  # a 28x28 grayscale file goes in as it is, normalised
    probs = model.eval()(x).softmax(1)[0].double()
    top = probs.topk(3)
    got = results[0]["predictions"]
    assert [p["index"] for p in got] == top.indices.tolist()
    assert [p["class"] for p in got] == [CLASSES[i] for i in top.indices.tolist()]
    assert [p["probability"] for p in got] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_folders_are_searched_for_images_in_sorted_order(images) -> None:
    assert [p.relative_to(images).as_posix() for p in image_files([images])] == ["a.png", "b.jpg", "c.png",
                                                                                  "sub/d.png"]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_every_export_format_predicts_as_the_checkpoint(teacher_run, images, tmp_path) -> None:
    run_dir, _ = teacher_run
    expected = predict(run_dir / "checkpoints" / "best.pt", [images], top_k=2)
    assert len(expected) == 4
    for fmt, suffix in FORMATS.items():
        path = export(run_dir, fmt, tmp_path / f"student{suffix}")["path"]
        got = predict(path, [images], top_k=2)
        assert [[p["index"] for p in r["predictions"]] for r in got] == \
            [[p["index"] for p in r["predictions"]] for r in expected]
        for r, e in zip(got, expected, strict=True):
            assert [p["probability"] for p in r["predictions"]] == \
                pytest.approx([p["probability"] for p in e["predictions"]], abs=1e-4)


def test_cli_prints_a_table_or_json(teacher_run, images, capsys) -> None:
    run_dir, _ = teacher_run
    assert main(["predict", str(run_dir), str(images / "a.png"), str(images / "c.png"), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["image", "top", "classes", "(probability)"] and len(lines) == 3
    assert lines[1].startswith(str(images / "a.png")) and len(lines[1].split()) == 5
    assert main(["predict", str(run_dir), str(images / "sub"), "--json", "--top-k", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == str(images / "sub" / "d.png") and len(out[0]["predictions"]) == 1


def test_bad_predict_inputs_are_one_line_errors(teacher_run, images, tmp_path, capsys) -> None:
    run_dir, _ = teacher_run
    with pytest.raises(DataError, match="does not exist; give image files or folders"):
        predict(run_dir, [images / "missing.png"])
    with pytest.raises(DataError, match="cannot read image .*notes.txt"):
        predict(run_dir, [images / "notes.txt"])
    with pytest.raises(ConfigError, match="--top-k must be >= 1"):
        predict(run_dir, [images], top_k=0)
    with pytest.raises(ConfigError, match="--min-score chooses a detector's boxes; a classifier's classes are "
                                          "counted by --top-k"):
        predict(run_dir, [images], min_score=0.5)
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(run_dir), str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds no image files" in err and err.count("\n") == 1


def test_a_malformed_sidecar_is_a_one_line_error(teacher_run, images, tmp_path) -> None:
    from distkd.errors import CheckpointError

    run_dir, _ = teacher_run
    path = Path(export(run_dir, "state_dict", tmp_path / "s.pt")["path"])
    sidecar = json.loads(Path(f"{path}.json").read_text())
    Path(f"{path}.json").write_text(json.dumps({**sidecar, "preprocess": {"channels": 2}}))
    with pytest.raises(CheckpointError, match=r"the preprocessing record .* is malformed \(KeyError"):
        predict(path, [images / "a.png"])
    Path(f"{path}.json").write_text(json.dumps({"format": "state_dict"}))
    with pytest.raises(CheckpointError, match="is not a distkd export sidecar"):
        predict(path, [images / "a.png"])
    Path(f"{path}.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"s\.pt\.json is not valid JSON \(.*\); re-export with distkd export"):
        predict(path, [images / "a.png"])
