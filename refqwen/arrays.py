"""Arrays that may live on a GPU: which array module holds one, and a host (NumPy) copy of it.

The reference works on NumPy arrays. A GPU backend (backends/cupy_gpu.py) hands the same model
code CuPy arrays instead; NumPy functions called on them run on the device (NEP 18 dispatch),
so the model code stays as it is, and only these two helpers need to know the difference.
"""

import sys

import numpy as np


def array_module(x):
    """numpy, or cupy for a CuPy array (found without importing CuPy where it is not in use)."""
    cupy = sys.modules.get("cupy")
    return cupy.get_array_module(x) if cupy is not None else np


def to_host(x) -> np.ndarray:
    """A NumPy array of x, copied from the device if it lives there."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)
