"""Token embedding: each token id selects one row of the embedding table."""

import numpy as np


def embed(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """ids [T] (integers in [0, V)), table [V, C] -> [T, C] float32"""
    return np.asarray(table[ids], np.float32)
