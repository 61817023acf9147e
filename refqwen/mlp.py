"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), no biases."""

import numpy as np

from refqwen.linear import linear


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x).  exp(-x) may overflow to inf for x < -88, which correctly gives -0."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


class MLP:
    def __init__(self, gate_proj, up_proj, down_proj):
        self.gate_proj = gate_proj  # [I, C]
        self.up_proj = up_proj  # [I, C]
        self.down_proj = down_proj  # [C, I]

    @classmethod
    def from_weights(cls, w: dict, prefix: str) -> "MLP":
        return cls(w[f"{prefix}.gate_proj.weight"], w[f"{prefix}.up_proj.weight"], w[f"{prefix}.down_proj.weight"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [T, C] -> [T, C]"""
        hidden = silu(linear(x, self.gate_proj)) * linear(x, self.up_proj)  # [T, I]
        return linear(hidden, self.down_proj)
