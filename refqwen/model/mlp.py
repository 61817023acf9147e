"""The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), no biases."""

import numpy as np

from refqwen.model.hooks import UNTRACED


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x).  exp(-x) may overflow to inf for x < -88, which correctly gives -0."""
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The gated activation: silu(gate) * up, both [T, I] -> [T, I]"""
    return silu(gate) * up


class MLP:
    hook = UNTRACED  # trace points gate, up, act, down; routed experts keep this no-op (refqwen/trace.py)

    def __init__(self, ops, gate_proj, up_proj, down_proj):
        self.ops = ops  # the backend that computes the operations
        self.gate_proj = gate_proj  # [I, C]
        self.up_proj = up_proj  # [I, C]
        self.down_proj = down_proj  # [C, I]

    @classmethod
    def from_weights(cls, w: dict, prefix: str, ops) -> "MLP":
        return cls(ops, *(ops.prepare_linear(f"{prefix}.{p}.weight", w[f"{prefix}.{p}.weight"])
                          for p in ("gate_proj", "up_proj", "down_proj")))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x [T, C] -> [T, C]"""
        gate = self.hook("gate", self.ops.linear(x, self.gate_proj))  # [T, I]
        up = self.hook("up", self.ops.linear(x, self.up_proj))  # [T, I]
        act = self.hook("act", self.ops.swiglu(gate, up))  # [T, I]
        return self.hook("down", self.ops.linear(act, self.down_proj))
