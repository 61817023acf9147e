"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel weight."""

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x [T, C], weight [C] -> [T, C].  Qwen2 multiplies by `weight` itself, not by 1 + weight."""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)  # [T, 1]
    return x * (np.float32(1) / np.sqrt(mean_square + np.float32(eps))) * weight
