"""Load weights from a checkpoint file or a state_dict, with one clear error when they do not fit.

Checkpoints are read with ``torch.load(..., weights_only=True)``: only tensors and plain containers are
unpickled, so nothing a user loads is executed. Training checkpoints that wrap the weights (CRD's and
DKD's ``{"model": ...}``, ``{"state_dict": ...}``, ``{"model_state_dict": ...}``, ``{"student": ...}``)
are unwrapped, and a ``module.`` prefix left by DataParallel/DDP (or ``_orig_mod.`` by torch.compile)
is stripped.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from distkd.errors import CheckpointError, first_line

WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict", "model_state_dict", "student")
_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
_SHOWN = 3  # names listed per kind of problem in an error message


def load_weights(
    model: nn.Module, source: str | os.PathLike[str] | Mapping[str, Tensor], *, strict: bool = True,
    origin: str = "",
) -> None:
    """Copy the weights in ``source`` (a checkpoint path or a state_dict) into ``model`` in place.

    A model with a ``convert_state_dict(state) -> state`` method renames keys of another layout first
    (e.g. the DIST authors' segmentation checkpoints). ``strict=True``: every model key must be present with
    the same shape and no extra key may be left over, otherwise one ``CheckpointError`` lists the missing,
    unexpected and mis-shaped keys.
    ``strict=False``: load the keys whose names and shapes match and warn about the rest (e.g. a
    backbone checkpoint whose classifier has another number of classes). ``origin`` names the source in
    messages (default: the path, or "the given state_dict").
    """
    if not origin:
        origin = "the given state_dict" if isinstance(source, Mapping) else f"checkpoint '{os.fspath(source)}'"
    raw = source if isinstance(source, Mapping) else _read(Path(source))
    state = _strip_prefixes(extract_state_dict(raw, origin))
    convert = getattr(model, "convert_state_dict", None)  # a model that reads another code base's key layout
    if callable(convert):
        state = convert(state)
    missing, unexpected, mismatched = _compare(model, state)
    problems = _describe(missing, unexpected, mismatched)
    if problems and strict:
        raise CheckpointError(
            f"{origin} does not fit model {_model_name(model)}: {problems}; check that the checkpoint "
            "was trained for this architecture and num_classes, or load it with strict=False"
        )
    if problems:
        warnings.warn(f"{origin} loaded partly into {_model_name(model)}: {problems}", stacklevel=2)
    wrong_shape = {key for key, _, _ in mismatched}
    fitting = {key: value for key, value in state.items() if key not in wrong_shape}
    try:
        model.load_state_dict(fitting, strict=False)
    except RuntimeError as err:
        first = first_line(err)
        raise CheckpointError(f"{origin} could not be loaded into {_model_name(model)}: {first}") from err


def load_pretrained(model: nn.Module, path: str | os.PathLike[str], key: str = "model.weights") -> dict[str, list[int]]:
    """Start ``model`` from pretrained weights in file ``path``, with a new head when the classes differ.

    The classifier (timm's ``pretrained_cfg["classifier"]``, else the last ``nn.Linear``) is dropped by name when
    its tensors do not fit the model's (another number of classes); everything else must load strictly. Returns
    the dropped keys with their shapes in the file (empty when the file's head fits). ``key`` (the config key,
    e.g. ``teacher.weights``) names the source in messages.
    """
    origin = f"{key} '{os.fspath(path)}'"
    state = _strip_prefixes(extract_state_dict(_read(Path(path)), origin))
    convert = getattr(model, "convert_state_dict", None)
    if callable(convert):
        state = convert(state)
    expected = model.state_dict()
    heads = classifier_names(model)
    in_head = [k for k in state if any(k.startswith(f"{h}.") for h in heads)]
    dropped = [k for k in in_head if k not in expected or state[k].shape != expected[k].shape]
    kept = {k: v for k, v in state.items() if k not in dropped}
    missing, unexpected, mismatched = _compare(model, kept)
    if dropped:  # the model's own head keys are new, not missing
        missing = [k for k in missing if not any(k.startswith(f"{h}.") for h in heads)]
    if problems := _describe(missing, unexpected, mismatched):
        raise CheckpointError(f"{origin} does not fit model {_model_name(model)} apart from its classifier "
                              f"({', '.join(heads) or 'none found'}): {problems}; give weights of the same "
                              "architecture (the model's name and kwargs)")
    model.load_state_dict(kept, strict=False)
    return {k: list(state[k].shape) for k in dropped}


def classifier_names(model: nn.Module) -> list[str]:
    """Module paths of the model's classifier: timm's ``pretrained_cfg["classifier"]``, else its last Linear."""
    cfg = getattr(model, "pretrained_cfg", None)
    named = cfg.get("classifier") if isinstance(cfg, dict) else None
    if named:
        return [named] if isinstance(named, str) else list(named)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def extract_state_dict(obj: object, origin: str = "the checkpoint") -> dict[str, Tensor]:
    """The tensors of a checkpoint: under a known wrapper key (``model``, ``state_dict``,
    ``model_state_dict``, ``student``) if one holds tensors, else the tensors at top level."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{origin} holds a {type(obj).__name__}, not a dict of tensors; save weights with "
            "torch.save(model.state_dict(), path)"
        )
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            return {str(k): v for k, v in inner.items() if isinstance(v, Tensor)}
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:8])) or "none"
        raise CheckpointError(
            f"{origin} holds no tensors under {'/'.join(WRAPPER_KEYS)} or at top level (its keys: {keys}); "
            "point to a file saved with torch.save(model.state_dict(), path)"
        )
    return tensors


def weights_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (for the teacher cache and run records)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint '{os.fspath(path)}' does not exist; check the path") from err
    return digest.hexdigest()


def _read(path: Path) -> object:
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a directory; point to the checkpoint file inside it")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist; check the path (or download the weights there first)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for bad files: pickle, zip, EOF, runtime
        first = first_line(err)
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({type(err).__name__}: {first}); it must be a file written "
            "by torch.save holding tensors (a state_dict), re-save it with torch.save(model.state_dict(), path)"
        ) from err


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _compare(
    model: nn.Module, state: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Missing keys, unexpected keys, and ``(key, checkpoint shape, model shape)`` mismatches.

    A missing ``num_batches_tracked`` is not reported: BatchNorm fills it in, as for old checkpoints.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    return missing, unexpected, mismatched


def _describe(
    missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
) -> str:
    def listing(items: list[str]) -> str:
        more = f", ... {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
        return ", ".join(items[:_SHOWN]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({listing(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({listing(unexpected)})")
    if mismatched:
        shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} shape mismatch(es) ({listing(shapes)})")
    return "; ".join(parts)


def _model_name(model: nn.Module) -> str:
    name = getattr(model, "distkd_name", None)
    return f"'{name}'" if isinstance(name, str) else type(model).__name__
