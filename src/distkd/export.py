"""``distkd export``: the student of a run, alone, ready to run elsewhere (detectors: :mod:`distkd.export_detection`).

The student (no teacher, no adapters or other distillation-term state) is rebuilt from a checkpoint in eval mode
and written as a ``state_dict`` (``torch.save``), ``safetensors``, ``torchscript`` (traced) or ``onnx``
(``torch.onnx.export``), with a JSON sidecar ``<file>.json`` holding what a user of the file needs: the model
name and arguments, the class names (label order), the preprocessing and the input shape. Every written file is
read back and its logits compared with the PyTorch student's on a batch of ``CHECK_BATCH`` seeded inputs: the
state dicts must give the same logits exactly, TorchScript and ONNX (run by onnxruntime) within ``TOLERANCE``
of the largest logit (``max |difference| <= TOLERANCE * max(1, max |logit|)``).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distkd.data.preprocess import Preprocess
from distkd.engine.checkpoint import load_state
from distkd.errors import CheckpointError, ConfigError, ExportError, first_line
from distkd.export_detection import Detector, check_format, detector_from_state, export_detector

FORMATS: dict[str, str] = {"state_dict": ".pt", "safetensors": ".safetensors", "torchscript": ".torchscript.pt",
                           "onnx": ".onnx"}
CHECK_BATCH = 4
TOLERANCE = 1e-4
SIDECAR_SUFFIX = ".json"


@dataclass
class Student:
    """A trained student in eval mode with what deploying it needs. ``model`` maps float ``(N, *input_shape)``
    normalised images to logits ``(N, len(classes))``."""

    model: nn.Module
    name: str
    kwargs: dict[str, Any]
    classes: list[str]
    preprocess: Preprocess
    checkpoint: Path
    weights: str  # "best", "last", "best_ema" or "last_ema": which weights of the run
    epoch: int
    step: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one input image."""
        return (self.preprocess.channels, *self.preprocess.size)

    def describe(self) -> dict[str, Any]:
        """The sidecar's description of the model (JSON-ready)."""
        return {"model": {"name": self.name, "kwargs": self.kwargs}, "num_classes": len(self.classes),
                "classes": self.classes, "preprocess": self.preprocess.to_dict(), "input_shape": list(self.input_shape),
                "source": {"checkpoint": str(self.checkpoint), "weights": self.weights, "epoch": self.epoch,
                           "step": self.step}}


def find_checkpoint(source: str | Path, last: bool = False) -> Path:
    """The checkpoint ``source`` names: a run folder's ``checkpoints/best.pt`` (``last``: ``last.pt``), or a file."""
    path = Path(source)
    if path.is_dir():
        name = "last.pt" if last else "best.pt"
        found = path / "checkpoints" / name if (path / "checkpoints").is_dir() else path / name
        if not found.is_file():
            raise CheckpointError(f"{path} holds no checkpoints/{name}; give a run folder (out_dir/name) or a "
                                  "checkpoint file")
        return found
    if last:
        raise ConfigError(f"--last picks checkpoints/last.pt of a run folder; {path} is a file: give the run folder, "
                          "or the last.pt file without --last")
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run folder or a distkd checkpoint (best.pt, last.pt)")
    return path


def load_student(source: str | Path, *, last: bool = False, ema: bool = False) -> Student | Detector:
    """The student of run folder or checkpoint ``source`` in eval mode, on the CPU: best-on-val weights by
    default, ``last``: the run's last checkpoint, ``ema``: that checkpoint's EMA weights. A detection run's is a
    :class:`~distkd.export_detection.Detector`."""
    from distkd.models import create_model
    from distkd.models.weights import load_weights

    path = find_checkpoint(source, last)
    state = load_state(path)
    meta, config = state.get("meta"), state.get("config")
    if not config:
        raise CheckpointError(f"{path} holds no run config, so its model is unknown; export checkpoints of distkd runs")
    if not meta:
        meta = _meta_from_config(path, config)
    weights = state["model"]
    if ema:
        if state.get("ema") is None:
            raise ConfigError(f"--ema: {path} holds no EMA weights (the run had train.ema_decay unset); drop --ema")
        weights = state["ema"]
    label = ("last" if path.name == "last.pt" else "best") + ("_ema" if ema else "")
    if meta.get("task") == "detection":
        return detector_from_state(path, state, meta, weights, label)
    kwargs = {k: v for k, v in config["model"]["kwargs"].items() if k != "pretrained"}  # weights come from the file
    classes = [str(c) for c in meta["classes"]]
    model = create_model(config["model"]["name"], num_classes=len(classes), **kwargs)
    load_weights(model, weights, origin=f"checkpoint '{path}'")
    return Student(model.eval(), config["model"]["name"], kwargs, classes, Preprocess.from_dict(meta["preprocess"]),
                   path, label, int(state["epoch"]), int(state.get("step", 0)))


def _meta_from_config(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Class names and preprocessing of a checkpoint that predates their record: from its run's dataset, read again
    (it must still be where the config says)."""
    from distkd.config import RunConfig, from_dict
    from distkd.tasks import get_task

    try:
        cfg = from_dict(RunConfig, config)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its saved config is not valid for this distkd version ({exc})") from None
    task = get_task(cfg.task)
    if not hasattr(task, "metadata"):
        raise CheckpointError(f"{path} is a {cfg.task} run; export and predict take classification and detection "
                              f"students (the {cfg.task} student's weights are the checkpoint's 'model' entry)")
    print(f"{path} predates the record of class names and preprocessing: reading them from its dataset "
          f"'{cfg.data.name}'", file=sys.stderr, flush=True)
    return task.metadata(task.load_dataset(cfg.data, cfg.seed))


def model_of_state_file(path: Path, fmt: str, model: dict[str, Any], num_classes: int) -> nn.Module:
    """The model a ``state_dict`` or ``safetensors`` export at ``path`` holds, rebuilt from its sidecar's ``model``
    (``{"name", "kwargs"}``), in eval mode."""
    from distkd.models import create_model
    from distkd.models.weights import load_weights

    rebuilt = create_model(model["name"], num_classes=num_classes, **model["kwargs"])
    if fmt == "safetensors":
        from safetensors.torch import load_file

        rebuilt.load_state_dict(load_file(str(path)))
    else:
        load_weights(rebuilt, path)
    return rebuilt.eval()


def default_output(student: Student | Detector, fmt: str) -> Path:
    """``<run folder>/export/student[_last][_ema]<extension>``."""
    folder = student.checkpoint.parent
    run = folder.parent if folder.name == "checkpoints" else folder
    stem = "student" + "".join(f"_{p}" for p in student.weights.split("_") if p != "best")
    return run / "export" / f"{stem}{FORMATS[fmt]}"


def sidecar_path(path: Path) -> Path:
    """The JSON beside an exported file: ``<file>.json``."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def export(source: str | Path, fmt: str, out: str | Path | None = None, *, last: bool = False,
           ema: bool = False) -> dict[str, Any]:
    """Export the student of ``source`` as ``fmt`` to ``out`` (default :func:`default_output`), check it, write the
    sidecar; return the sidecar's content (``file``, ``sidecar``, ``check`` and the model's description)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")
    student = load_student(source, last=last, ema=ema)
    if isinstance(student, Detector):
        check_format(fmt)
    elif fmt == "onnx":
        require_onnx()
    path = Path(out) if out is not None else default_output(student, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": fmt, **student.describe()}
    check = export_detector(student, fmt, path) if isinstance(student, Detector) else _export_classifier(
        student, fmt, path, info)
    from distkd import __version__

    info = {"distkd_version": __version__, "file": path.name, **info, "check": check}
    sidecar_path(path).write_text(json.dumps(info, indent=2) + "\n")
    return info | {"path": str(path), "sidecar": str(sidecar_path(path))}


def _export_classifier(student: Student, fmt: str, path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``student`` as ``fmt`` to ``path``, read it back and compare its logits; return the check record."""
    x = torch.randn(CHECK_BATCH, *student.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _logits(student.model, x)
    written = _WRITERS[fmt](student, path, x, info)
    difference = float((written - expected).abs().max())
    bound = 0.0 if fmt in ("state_dict", "safetensors") else TOLERANCE * max(1.0, float(expected.abs().max()))
    if not difference <= bound:
        path.unlink(missing_ok=True)
        raise ExportError(f"the {fmt} export of {student.checkpoint} gives logits up to {difference:.3g} away from "
                          f"the PyTorch student's (allowed: {bound:.3g}); nothing was written")
    return {"inputs": f"{CHECK_BATCH} seeded N(0, 1) images", "against": "the PyTorch student in eval mode",
            "max_abs_difference": difference, "tolerance": bound,
            "rule": "exact" if bound == 0 else f"{TOLERANCE:g} * max(1, max |logit|)"}


class _Logits(nn.Module):
    """The model's main prediction alone (a dict output's ``out``), for the traced and ONNX graphs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """``x`` float (N, C, H, W) -> logits (N, K)."""
        from distkd.distill import logits_of

        return logits_of(self.model(x))


def _logits(model: nn.Module, x: Tensor) -> Tensor:
    from distkd.distill import logits_of

    return logits_of(model(x)).float()


def _write_state_dict(student: Student, path: Path, x: Tensor, info: dict[str, Any]) -> Tensor:
    from distkd.models import create_model

    torch.save(student.model.state_dict(), path)
    fresh = create_model(student.name, num_classes=len(student.classes), weights=path, **student.kwargs).eval()
    with torch.no_grad():
        return _logits(fresh, x)


def _write_safetensors(student: Student, path: Path, x: Tensor, info: dict[str, Any]) -> Tensor:
    from safetensors.torch import load_file, save_file

    from distkd.models import create_model

    tensors = {k: v.detach().contiguous().clone() for k, v in student.model.state_dict().items()}
    save_file(tensors, str(path), metadata={"distkd": json.dumps(info)})
    fresh = create_model(student.name, num_classes=len(student.classes), **student.kwargs)
    fresh.load_state_dict(load_file(str(path)))
    with torch.no_grad():
        return _logits(fresh.eval(), x)


def _write_torchscript(student: Student, path: Path, x: Tensor, info: dict[str, Any]) -> Tensor:
    with warnings.catch_warnings():  # torch >= 2.10 calls TorchScript deprecated; the format is asked for by name
        warnings.simplefilter("ignore", FutureWarning)
        try:
            with torch.no_grad():
                traced = torch.jit.trace(_Logits(student.model).eval(), x)
        except Exception as err:  # noqa: BLE001 - tracing fails in many ways, all mean the same to the user
            raise ExportError(f"TorchScript cannot trace model '{student.name}': {first_line(err)}; export it as "
                              "onnx or safetensors instead") from None
        torch.jit.save(traced, str(path), _extra_files={"distkd.json": json.dumps(info)})
        loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            return loaded(x).float()


def _write_onnx(student: Student, path: Path, x: Tensor, info: dict[str, Any]) -> Tensor:
    import onnxruntime

    batch = torch.export.Dim("batch")
    try:
        torch.onnx.export(_Logits(student.model).eval(), (x,), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True, external_data=False,
                          verbose=False)
    except Exception as err:  # noqa: BLE001 - the exporter's failures are many; the message is what helps
        raise ExportError(f"torch.onnx cannot export model '{student.name}': {first_line(err)}; export it as "
                          "safetensors instead") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]).float()


def require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime", "onnxscript") if not _importable(name)]
    if missing:
        raise ExportError(f"the onnx format needs {', '.join(missing)} (not installed); pip install "
                          "'distkd[export]'")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


_WRITERS = {"state_dict": _write_state_dict, "safetensors": _write_safetensors, "torchscript": _write_torchscript,
            "onnx": _write_onnx}
