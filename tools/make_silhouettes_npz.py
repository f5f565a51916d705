"""Convert the Animal silhouettes data files of ``animal-mnist==0.4`` into distkd's embedded ``.npz``.

Run once by a maintainer (the result is committed); distkd never depends on the package:
    pip download --no-deps animal-mnist==0.4 && unzip animal_mnist-0.4-py3-none-any.whl
    python tools/make_silhouettes_npz.py animal_mnist/data/Animal_MNIST
The source files are gzip'd pickles of plain numpy arrays; they are read with a restricted unpickler
that accepts numpy array reconstruction only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import sys
from pathlib import Path

import numpy as np

ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
           ("numpy._core.multiarray", "_reconstruct")}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def _load(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return _ArrayUnpickler(io.BytesIO(f.read())).load()


def main(src: str, out: str = "src/distkd/assets/silhouettes.npz") -> None:
    src_dir = Path(src)
    files = {"images": "animal_data_version_3.gz", "labels": "animal_label_version_3.gz"}
    images, labels = (_load(src_dir / files[k]) for k in ("images", "labels"))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8, images.shape
    assert labels.shape == (10000,), labels.shape
    sha = {name: hashlib.sha256((src_dir / name).read_bytes()).hexdigest() for name in files.values()}
    np.savez_compressed(out, images=images, labels=labels.astype(np.int64))
    print(f"wrote {out}; sources: {sha}")


if __name__ == "__main__":
    main(*sys.argv[1:])
