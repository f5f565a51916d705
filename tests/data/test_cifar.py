"""CIFAR readers on small files written in the official pickle format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distkd.data.cifar import expected_files, load_cifar, stratified_holdout
from distkd.errors import DataError, UnknownNameError


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f)


def _batch(rng: np.random.Generator, labels: np.ndarray, label_key: str) -> dict:
    n = len(labels)
    return {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: labels.tolist(),
        "filenames": [f"img_{i}.png" for i in range(n)],
    }


def write_cifar100(root: Path, per_class_train: int = 5, per_class_test: int = 2, seed: int = 0) -> dict:
    """``<root>/cifar-100-python/{train,test,meta}``; returns the pickled train/test dicts."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    out = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        fine = rng.permutation(np.repeat(np.arange(100), per_class))
        entry = _batch(rng, fine, "fine_labels")
        entry["coarse_labels"] = (fine // 5).tolist()
        _dump(folder / split, entry)
        out[split] = entry
    _dump(
        folder / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    return out


def write_cifar10(root: Path, per_batch: int = 20, test_size: int = 30, seed: int = 0) -> dict:
    """``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``; returns the dicts."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    out = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_size)]:
        entry = _batch(rng, np.arange(n) % 10, "labels")
        entry["batch_label"] = name
        _dump(folder / name, entry)
        out[name] = entry
    _dump(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072})
    return out


def _as_images(entry: dict) -> torch.Tensor:
    return torch.from_numpy(entry["data"].reshape(-1, 3, 32, 32))


def test_cifar100_reads_images_labels_and_standard_stats(tmp_path: Path) -> None:
    raw = write_cifar100(tmp_path)
    data = load_cifar("cifar100", str(tmp_path))
    assert data.train.images.shape == (500, 3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.train.labels.dtype == torch.int64
    assert torch.equal(data.train.images, _as_images(raw["train"]))  # row-major CHW, like the format
    assert data.train.labels.tolist() == raw["train"]["fine_labels"]
    assert torch.equal(data.test.images, _as_images(raw["test"]))
    assert data.num_classes == 100 and data.in_chans == 3
    assert data.mean == (0.5071, 0.4865, 0.4409) and data.std == (0.2673, 0.2564, 0.2762)


def test_val_size_zero_makes_val_the_official_test_split(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    data = load_cifar("cifar100", str(tmp_path))
    assert data.val is data.test
    assert len(data.val) == 200


def test_cifar10_concatenates_the_five_batches_in_order(tmp_path: Path) -> None:
    raw = write_cifar10(tmp_path)
    data = load_cifar("cifar10", str(tmp_path))
    batches = [raw[f"data_batch_{i}"] for i in range(1, 6)]
    assert torch.equal(data.train.images, torch.cat([_as_images(b) for b in batches]))
    assert data.train.labels.tolist() == sum((b["labels"] for b in batches), [])
    assert torch.equal(data.test.images, _as_images(raw["test_batch"]))
    assert data.num_classes == 10
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)


def test_val_holdout_is_stratified_disjoint_and_leaves_test_alone(tmp_path: Path) -> None:
    raw = write_cifar100(tmp_path)
    data = load_cifar("cifar100", str(tmp_path), val_size=100, seed=3)
    assert len(data.val) == 100 and len(data.train) == 400
    assert torch.bincount(data.val.labels, minlength=100).tolist() == [1] * 100
    assert torch.bincount(data.train.labels, minlength=100).tolist() == [4] * 100
    all_train = _as_images(raw["train"]).flatten(1)
    rows = {tuple(r.tolist()): i for i, r in enumerate(all_train)}  # random images are distinct
    val_rows = {rows[tuple(r.tolist())] for r in data.val.images.flatten(1)}
    train_rows = {rows[tuple(r.tolist())] for r in data.train.images.flatten(1)}
    assert not val_rows & train_rows and len(val_rows | train_rows) == 500
    assert torch.equal(data.test.images, _as_images(raw["test"]))


def test_val_holdout_depends_on_seed_only(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    a = load_cifar("cifar10", str(tmp_path), val_size=20, seed=1)
    b = load_cifar("cifar10", str(tmp_path), val_size=20, seed=1)
    c = load_cifar("cifar10", str(tmp_path), val_size=20, seed=2)
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.bincount(a.val.labels, minlength=10).tolist() == [2] * 10


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 30), min_size=2, max_size=8),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_stratified_holdout_sizes_add_up_and_follow_class_shares(counts: list[int], frac: float, seed: int) -> None:
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    n = len(labels)
    val_size = 1 + round(frac * (n - 2))
    keep, held = stratified_holdout(labels, val_size, seed)
    assert len(held) == val_size and len(keep) == n - val_size
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(n))
    per_class = torch.bincount(labels[held], minlength=len(counts))
    for c, count in enumerate(counts):
        assert abs(per_class[c].item() - count * val_size / n) < 1  # largest-remainder rounding


def test_missing_files_name_the_folder_and_the_download_switch(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_cifar("cifar100", str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-100-python") in message and "data.download=true" in message


def test_one_missing_file_is_named(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar("cifar10", str(tmp_path))


def test_damaged_file_is_a_data_error(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not read CIFAR-100"):
        load_cifar("cifar100", str(tmp_path))


def test_out_of_range_labels_are_a_data_error(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    entry = pickle.loads(path.read_bytes())
    entry["labels"][0] = 10
    _dump(path, entry)
    with pytest.raises(DataError, match="outside 0..9"):
        load_cifar("cifar10", str(tmp_path))


def test_val_size_must_leave_training_images(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="val_size=100"):
        load_cifar("cifar10", str(tmp_path), val_size=100)


def test_unknown_dataset_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="cifar10, cifar100"):
        load_cifar("cifar1000", str(tmp_path))  # type: ignore[arg-type]


def test_expected_files_match_the_official_layout(tmp_path: Path) -> None:
    names = [p.relative_to(tmp_path).as_posix() for p in expected_files("cifar100", tmp_path)]
    assert names == ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"]


class _RunsCode:
    """Unpickling this calls ``os.system`` (a crafted file would run any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_crafted_cifar_file_is_refused_in_one_line_and_never_run(tmp_path: Path, protocol: int) -> None:
    write_cifar100(tmp_path)
    marker = tmp_path / "ran"
    path = tmp_path / "cifar-100-python" / "train"
    path.write_bytes(pickle.dumps({"data": _RunsCode(marker), "fine_labels": [0]}, protocol=protocol))
    with pytest.raises(DataError) as err:
        load_cifar("cifar100", str(tmp_path))
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and f"refused to load {path}: it asks to run posix.system" in message
    assert "nothing was run" in message


def test_an_object_array_in_a_cifar_file_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    _dump(path, {"data": np.array([object()] * 4, dtype=object), "labels": [0]})
    with pytest.raises(DataError, match="an object dtype"):
        load_cifar("cifar10", str(tmp_path))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_files_pickled_with_any_protocol_read_the_same(tmp_path: Path, protocol: int) -> None:
    written = write_cifar10(tmp_path)
    reference = load_cifar("cifar10", str(tmp_path))
    for path in expected_files("cifar10", tmp_path):
        path.write_bytes(pickle.dumps(pickle.loads(path.read_bytes()), protocol=protocol))
    again = load_cifar("cifar10", str(tmp_path))
    assert torch.equal(again.train.images, reference.train.images) and torch.equal(again.test.labels,
                                                                                    reference.test.labels)
    assert len(reference.train) == sum(len(written[f"data_batch_{i}"]["labels"]) for i in range(1, 6))
