"""The README's "Distil your own model" section, run as written on a generated image folder.

Its config files are written from its YAML blocks and its ``distkd`` commands run in order; training commands get
overrides that only make them small (one epoch, a batch that fits 24 images, no worker processes, one thread). The
pretrained file the README saves from the hub is made here with the same model, untrained (nothing is downloaded).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from distkd.cli import main
from distkd.models import create_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
README = Path(__file__).resolve().parents[1] / "README.md"
SMALL = ("train.epochs=1", "data.batch_size=8", "data.eval_batch_size=16", "data.num_workers=0", "train.threads=1",
         "train.progress=none")


def _section() -> str:
    text = README.read_text()
    start = text.index("## Distil your own model")
    return text[start : text.index("\n## ", start + 1)]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_the_readme_section_runs_from_image_folder_to_predictions(tmp_path, monkeypatch, capsys,
                                                                   image_folder) -> None:
    section = _section()
    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "my_images")
    torch.save(create_model("timm_resnet18", num_classes=1000).state_dict(), tmp_path / "resnet18.pth")
    configs = _blocks(section, "yaml")
    assert len(configs) == 2
    for block in configs:
        name = block.splitlines()[0].removeprefix("# ").strip()
        (tmp_path / name).write_text(block)
    commands = [line for block in _blocks(section, "bash") for line in block.splitlines() if line.startswith("distkd")]
    assert [c.split()[1] for c in commands] == ["train", "train", "eval", "export", "predict"]
    outputs = []
    for command in commands:
        argv = shlex.split(command.split("#")[0])[1:]
        if argv[0] == "train":
            argv += SMALL
        assert main(argv) == 0, command
        outputs.append(capsys.readouterr().out)
    teacher_out, student_out, eval_out, export_out, predict_out = outputs
    assert "model.weights: loaded resnet18.pth except its classifier (fc.weight [1000, 512], fc.bias [1000]): a new " \
           "3-class head" in teacher_out
    assert student_out.startswith("run folder: runs/mine/student\nteacher: timm_resnet18 (recorded in ")
    metrics = json.loads(eval_out)
    assert metrics["split"] == "val" and metrics["confusion"]["classes"] == ["ant", "bee", "cat"]
    assert "max |logit difference|" in export_out
    sidecar = json.loads(Path("runs/mine/student/export/student.onnx.json").read_text())
    assert sidecar["model"]["name"] == "timm_mobilenetv3_small_100" and sidecar["input_shape"] == [3, 64, 64]
    lines = predict_out.splitlines()
    assert len(lines) == 1 + 9 and all(len(line.split()) == 1 + 2 * 3 for line in lines[1:])
    report = Path("runs/mine/student/report.md").read_text()
    assert "the test figures are the val figures" in report
