"""Read pickle files without running code: only the globals a data format needs may be looked up.

A pickle names the functions it calls to rebuild its objects; a crafted file can name ``os.system``. The
:class:`RestrictedUnpickler` resolves only an explicit allow-list (for CIFAR: NumPy's array reconstruction
and dtype, the byte-string codec Python 2 pickles use) and refuses anything else in one line, before it runs.
NumPy dtypes are rebuilt through a check that refuses object dtypes (whose data would be raw pointers).
"""

from __future__ import annotations

import _codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from distkd.errors import DataError


def _numeric_dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype:
    """``numpy.dtype(obj, align, copy)`` for plain numeric dtypes only."""
    dtype = np.dtype(obj, align, copy)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an object dtype")
    return dtype


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # NumPy 2
    except ImportError:  # NumPy 1
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _numeric_dtype}
    for package in ("numpy.core", "numpy._core"):  # NumPy 1 and NumPy 2 spell the module differently
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


ARRAY_GLOBALS: dict[tuple[str, str], Any] = {**_numpy_globals(), ("_codecs", "encode"): _codecs.encode}


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` that resolves only the ``(module, name)`` pairs of ``allowed``."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any], **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"it asks to run {module}.{name}")
        return self.allowed[(module, name)]


def load_arrays_pickle(path: Path, what: str) -> Any:
    """The object in pickle file ``path`` built from plain containers, numbers, strings and NumPy arrays.

    Python 2 pickles (the official CIFAR files) are read with ``encoding="latin1"``. A file that names any
    other global is refused with a one-line ``DataError`` that says it was not run; ``what`` names the data.
    """
    try:
        with path.open("rb") as f:
            return RestrictedUnpickler(f, ARRAY_GLOBALS, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("it asks to run") or str(err) == "an object dtype":
            raise DataError(f"refused to load {path}: {err}, which {what} files never contain (nothing was run); "
                            "replace the file with one from the official archive") from None
        raise DataError(f"could not read {what} from {path}: {err}; the file looks damaged, "
                        "replace it with one from the official archive") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as err:
        raise DataError(f"could not read {what} from {path}: {type(err).__name__}: {err}; the file looks "
                        "damaged, replace it with one from the official archive") from None
