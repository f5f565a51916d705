"""load_weights: checkpoint formats, strictness, one-line errors, and safe reading; weights_sha256."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from distkd.errors import CheckpointError
from distkd.models import create_model
from distkd.models.weights import WRAPPER_KEYS, load_weights, weights_sha256


def small_net(num_classes: int = 10) -> nn.Module:
    return create_model("cifar_resnet8", num_classes=num_classes)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("wrapper", [None, *WRAPPER_KEYS])
def test_checkpoint_file_loads_under_each_wrapper_key(wrapper: str | None, tmp_path: Path) -> None:
    source = small_net()
    payload = source.state_dict() if wrapper is None else {wrapper: source.state_dict(), "epoch": 240}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    target = small_net()
    load_weights(target, path)
    assert_same_weights(source, target)


def test_wrapper_key_wins_over_other_entries(tmp_path: Path) -> None:
    source = small_net()
    path = tmp_path / "train_state.pt"
    torch.save({"optimizer": {"state": {}}, "model": source.state_dict(), "best_acc": torch.tensor(0.7)}, path)
    target = small_net()
    load_weights(target, path)
    assert_same_weights(source, target)


def test_data_parallel_prefix_is_stripped() -> None:
    source = small_net()
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = small_net()
    load_weights(target, {"state_dict": wrapped})
    assert_same_weights(source, target)


def test_missing_batch_counters_of_old_checkpoints_are_tolerated() -> None:
    source = small_net()
    old = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = small_net()
    load_weights(target, old)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in old.items())


def test_misfit_is_one_error_listing_missing_unexpected_and_shapes(tmp_path: Path) -> None:
    state = small_net(num_classes=100).state_dict()
    del state["layer1.0.conv1.weight"]
    state["projector.weight"] = torch.zeros(3)
    path = tmp_path / "teacher.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(small_net(num_classes=10), path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "'cifar_resnet8'" in message
    assert "1 missing key(s) (layer1.0.conv1.weight)" in message
    assert "1 unexpected key(s) (projector.weight)" in message
    assert "2 shape mismatch(es)" in message and "fc.weight: checkpoint [100, 64] vs model [10, 64]" in message
    assert "strict=False" in message


def test_long_key_lists_are_cut_with_a_count() -> None:
    state = small_net().state_dict()
    renamed = {f"backbone.{k}": v for k, v in state.items()}
    with pytest.raises(
        CheckpointError,
        match=rf"{len(state)} unexpected key\(s\) \(backbone\.conv1\.weight, .*, \.\.\. {len(state) - 3} more\)",
    ):
        load_weights(small_net(), renamed)


def test_non_strict_loads_what_fits_and_warns_about_the_rest() -> None:
    source = small_net(num_classes=100)
    target = small_net(num_classes=10)
    head_before = target.fc.weight.clone()
    with pytest.warns(UserWarning, match="fc.weight"):
        load_weights(target, source.state_dict(), strict=False)
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert torch.equal(target.fc.weight, head_before)


def test_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist; check the path"):
        load_weights(small_net(), tmp_path / "nope.pth")


def test_directory_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory; point to the checkpoint file inside it"):
        load_weights(small_net(), tmp_path)


def test_unreadable_file_says_how_to_resave(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*torch\.save\(model\.state_dict\(\), path\)"):
        load_weights(small_net(), path)


def test_file_without_tensors_lists_its_keys(tmp_path: Path) -> None:
    path = tmp_path / "meta.pth"
    torch.save({"epoch": 3, "arch": "resnet8"}, path)
    with pytest.raises(CheckpointError, match=r"holds no tensors .*\(its keys: epoch, arch\)"):
        load_weights(small_net(), path)


class _TouchOnLoad:
    """Unpickling this would create ``marker``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_code_in_a_checkpoint_is_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"model": _TouchOnLoad(marker)}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_weights(small_net(), path)
    assert not marker.exists()


def test_sha256_matches_hashlib_on_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save(small_net().state_dict(), path)
    assert weights_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_sha256_of_a_missing_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        weights_sha256(tmp_path / "missing.pth")


def test_create_model_loads_local_weights(tmp_path: Path) -> None:
    source = small_net()
    path = tmp_path / "w.pth"
    torch.save({"model": source.state_dict()}, path)
    assert_same_weights(source, create_model("cifar_resnet8", num_classes=10, weights=path))
