"""The affine map every projection uses: y = x Wᵀ + b, with W stored [out, in] as in PyTorch."""

import numpy as np


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """x [T, in], weight [out, in], bias [out] -> [T, out]"""
    y = x @ weight.T
    return y if bias is None else y + bias
