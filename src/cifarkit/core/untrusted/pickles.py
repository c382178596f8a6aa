"""CIFAR's python pickles (CIFAR-100's meta file and coarse labels; torchvision reads the batches after checking
their MD5): unpickled with only the globals such a file names, so a crafted one cannot run code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cifarkit.core.errors import UserError
from cifarkit.core.untrusted.text import shown

try:  # NumPy 2 moved its core; files pickled by NumPy 1 (and the official Python 2 ones) name numpy.core
    from numpy._core import multiarray, numeric
except ImportError:  # NumPy 1
    from numpy.core import multiarray, numeric

# Everything a pickled dict of lists, strings and NumPy arrays names: the official files (Python 2, protocol 2)
# rebuild each array with _reconstruct, ndarray and dtype; files NumPy pickles with protocol 5 use _frombuffer.
ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler whose only callables are NumPy's array and dtype reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR's files never do")
        return found


def read_cifar_pickle(path: Path, fix: str) -> dict:
    """One of CIFAR's python pickles as a dict (decoded as torchvision decodes them, latin-1), or one line
    naming the file and ``fix`` when it is not such a pickle: nothing in it runs."""
    try:
        with open(path, "rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except Exception as e:  # a crafted global, a cut file, not a pickle at all
        why = shown(" ".join(f"{e.__class__.__name__}: {e}".split())[:200])
        raise UserError(f"{shown(path)} is not one of CIFAR's python pickles ({why}); {fix}") from e
    if not isinstance(data, dict):
        raise UserError(f"{shown(path)} is not one of CIFAR's python pickles (it holds a {type(data).__name__}); {fix}")
    return data
