"""The two ways the model reads a weight matrix: as a table of rows (the token embedding), and as
the affine map every projection uses, y = x Wᵀ + b, with W stored [out, in] as in PyTorch.
A tied model uses the one embedding matrix [V, C] both ways: rows in, lm_head out."""

import numpy as np


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Each token id picks its row of the embedding table.  ids [T] in [0, V), table [V, C] -> [T, C] float32"""
    return np.asarray(table[ids], np.float32)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x [T, in], weight [out, in], bias [out] -> [T, out]"""
    y = x @ weight.T
    return y if bias is None else y + bias
