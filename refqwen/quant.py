"""Symmetric int8 quantization of weights and activations: the definitions every int8 backend follows.

    per output channel ("channel"):  scale[o]    = max_j |w[o, j]| / 127
    per group of 32 ("g32"):         scale[o, g] = max_{j in group g} |w[o, j]| / 127   (like llama.cpp Q8_0)
    q = round(w / scale), in [-127, 127];   w ≈ q * scale,   |w - q * scale| <= scale / 2

Groups run along the input dimension; when it is not a multiple of 32 the last group is
shorter. An all-zero row or group gets scale 0 and q 0, so it dequantizes exactly.
"""

import numpy as np

from refqwen.errors import RefqwenError

GROUP = 32
LAYOUTS = ("channel", "g32")


def group_scales(w: np.ndarray, group: int | None) -> np.ndarray:
    """max |w| / 127 per row ([R, 1]) or per row and group ([R, G]) of w [R, I]."""
    R, I = w.shape
    if group is None:
        return (np.abs(w).max(axis=1, keepdims=True) / 127).astype(np.float32)  # [R, 1]
    G = -(-I // group)
    padded = np.zeros((R, G * group), np.float32)  # zero padding never raises a group's maximum
    padded[:, :I] = np.abs(w)
    return (padded.reshape(R, G, group).max(axis=2) / 127).astype(np.float32)  # [R, G]


def expand(scales: np.ndarray, I: int, group: int | None) -> np.ndarray:
    """Per-element scales [R, I] from per-row [R, 1] or per-group [R, G] scales."""
    return scales if group is None else np.repeat(scales, group, axis=1)[:, :I]


def quantize(w: np.ndarray, layout: str, rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """w [R, I] float32 -> (q [R, I] int8, scales [R] for "channel" or [R, G] for "g32").
    Rows are done in chunks so that the float temporaries stay small for a 151936-row embedding."""
    if layout not in LAYOUTS:
        raise RefqwenError(f"unknown int8 layout {layout!r}; expected one of {LAYOUTS}")
    group = GROUP if layout == "g32" else None
    R, I = w.shape
    q = np.empty((R, I), np.int8)
    scales = np.empty((R, 1 if group is None else -(-I // group)), np.float32)
    for r0 in range(0, R, rows_per_chunk):
        rows = np.asarray(w[r0:r0 + rows_per_chunk], np.float32)
        scales[r0:r0 + rows_per_chunk] = group_scales(rows, group)
        full = expand(scales[r0:r0 + rows_per_chunk], I, group)  # [rows, I]
        with np.errstate(divide="ignore", invalid="ignore"):
            q[r0:r0 + rows_per_chunk] = np.clip(np.where(full > 0, np.rint(rows / full), 0), -127, 127)
    return q, scales[:, 0] if group is None else scales


def dequantize(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(q [R, I], scales [R] or [R, G]) -> float32 [R, I]."""
    if scales.ndim == 1:
        return q.astype(np.float32) * scales[:, None]
    return q.astype(np.float32) * expand(scales, q.shape[1], GROUP)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic W8A8 activations: each token's vector in groups of 32.  x [T, I] -> (q [T, I], scales [T, G])"""
    return quantize(x, "g32")


class QuantizedWeight:
    """An int8 matrix as backends and checkpoints hold it: q [R, I] int8, scales [R] or [R, G] float32."""

    def __init__(self, q: np.ndarray, scales: np.ndarray):
        self.q, self.scales = q, scales
        self.shape = q.shape

    @property
    def layout(self) -> str:
        return "channel" if self.scales.ndim == 1 else "g32"

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Dequantized rows start..stop-1, float32."""
        return dequantize(self.q[start:stop], self.scales[start:stop])
