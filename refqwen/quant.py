"""Weight quantization: the int8 and int4 definitions every quantized backend and checkpoint follows.

int8, symmetric:

    per output channel ("channel"):  scale[o]    = max_j |w[o, j]| / 127
    per group of 32 ("g32"):         scale[o, g] = max_{j in group g} |w[o, j]| / 127   (like llama.cpp Q8_0)
    q = round(w / scale), in [-127, 127];   w ≈ q * scale,   |w - q * scale| <= scale / 2

Groups run along the input dimension; when it is not a multiple of 32 the last group is
shorter. An all-zero row or group gets scale 0 and q 0, so it dequantizes exactly.

int4, asymmetric with a zero point, per row and group of `group` (32 or 128) inputs:
    lo = min(min_g w, 0),  hi = max(max_g w, 0)        (0 is always representable)
    scale = (hi - lo) / 15 (rounded down to float32),  zero = clip(round(-lo / scale), 0, 15)
    q = clip(round(w / scale) + zero, 0, 15);   w ≈ (q - zero) * scale,   |w - (q - zero) * scale| <= scale / 2
    (rounding half away from zero; see int4_scales for the last 15 · 2⁻²⁴ of a step)
Two 4-bit values per byte along the input, the even column in the low nibble. The input size
must be a multiple of the group (checked, with the sizes that would work). An all-zero group
gets scale 0 and dequantizes to exact zeros; a zero weight always dequantizes to exactly 0.
"""

import numpy as np

from refqwen.arrays import array_module
from refqwen.errors import RefqwenError

GROUP = 32
LAYOUTS = ("channel", "g32")
# scheme -> (bits, group along the input; None = one scale per output channel)
SCHEMES = {"int8-channel": (8, None), "int8-g32": (8, 32), "int4-g32": (4, 32), "int4-g128": (4, 128)}


def group_scales(w: np.ndarray, group: int | None) -> np.ndarray:
    """max |w| / 127 per row ([R, 1]) or per row and group ([R, G]) of w [R, I]."""
    xp = array_module(w)  # NumPy, or CuPy when a GPU backend quantizes on the device
    R, I = w.shape
    if group is None:
        return (xp.abs(w).max(axis=1, keepdims=True) / 127).astype(np.float32)  # [R, 1]
    G = -(-I // group)
    padded = xp.zeros((R, G * group), np.float32)  # zero padding never raises a group's maximum
    padded[:, :I] = xp.abs(w)
    return (padded.reshape(R, G, group).max(axis=2) / 127).astype(np.float32)  # [R, G]


def expand(scales: np.ndarray, I: int, group: int | None) -> np.ndarray:
    """Per-element scales [R, I] from per-row [R, 1] or per-group [R, G] scales."""
    return scales if group is None else array_module(scales).repeat(scales, group, axis=1)[:, :I]


def quantize(w: np.ndarray, layout: str, rows_per_chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """w [R, I] float32 -> (q [R, I] int8, scales [R] for "channel" or [R, G] for "g32").
    Rows are done in chunks so that the float temporaries stay small for a 151936-row embedding."""
    if layout not in LAYOUTS:
        raise RefqwenError(f"unknown int8 layout {layout!r}; expected one of {LAYOUTS}")
    group = GROUP if layout == "g32" else None
    xp = array_module(w)  # NumPy, or CuPy when a GPU backend quantizes on the device
    R, I = w.shape
    q = xp.empty((R, I), np.int8)
    scales = xp.empty((R, 1 if group is None else -(-I // group)), np.float32)
    for r0 in range(0, R, rows_per_chunk):
        rows = xp.asarray(w[r0:r0 + rows_per_chunk], np.float32)
        scales[r0:r0 + rows_per_chunk] = group_scales(rows, group)
        full = expand(scales[r0:r0 + rows_per_chunk], I, group)  # [rows, I]
        with np.errstate(divide="ignore", invalid="ignore"):
            q[r0:r0 + rows_per_chunk] = xp.clip(xp.where(full > 0, xp.rint(rows / full), 0), -127, 127)
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

    @property
    def scheme(self) -> str:
        return "int8-" + self.layout

    @property
    def group(self) -> int | None:
        return None if self.scales.ndim == 1 else GROUP

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows `ids` (an embedding lookup), float32 [len(ids), I]."""
        return dequantize(self.q[ids], self.scales[ids])


# ---- int4 ------------------------------------------------------------------------------------

def check_group(I: int, group: int, name: str = "weight") -> None:
    """int4 groups must tile the input exactly (the packed rows have no room for a shorter group)."""
    if I % group:
        fits = [s for s, (bits, g) in SCHEMES.items() if g is None or bits == 8 or I % g == 0]
        raise RefqwenError(f"{name}: input size {I} is not a multiple of the group size {group}; "
                           f"schemes that fit it: {', '.join(fits)}")


def quantize_int4(w: np.ndarray, group: int, rows_per_chunk: int = 1024, name: str = "weight"):
    """w [R, I] float32 -> (q_packed [R, I/2] uint8, scales [R, G] float32, zeros [R, G] uint8), G = I / group.
    Rows in chunks: the float64 temporaries of 1024 rows of an 18944-wide matrix are 155 MB each."""
    R, I = w.shape
    check_group(I, group, name)
    G = I // group
    packed = np.empty((R, I // 2), np.uint8)
    scales, zeros = np.empty((R, G), np.float32), np.empty((R, G), np.uint8)
    for r0 in range(0, R, rows_per_chunk):
        rows = np.asarray(w[r0:r0 + rows_per_chunk], np.float64).reshape(-1, G, group)  # [rows, G, group]
        s, z = int4_scales(rows.min(axis=2), rows.max(axis=2))  # [rows, G] each
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s[..., None] > 0, round_half_away(rows / s[..., None]), 0) + z[..., None]
        scales[r0:r0 + rows_per_chunk], zeros[r0:r0 + rows_per_chunk] = s, z
        packed[r0:r0 + rows_per_chunk] = pack_int4(np.clip(q, 0, 15).astype(np.uint8).reshape(len(rows), I))
    return packed, scales, zeros


def int4_scales(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group minimum and maximum (float64) -> (scale float32, zero point 0..15).

    The float32 scale is rounded down, never up, so that lo and hi land on q = 0 and q = 15
    (clipped): quantizing dequantized weights then gives the same integers (idempotence). For
    the same reason both roundings go half away from zero. The price is at most 15 · 2⁻²⁴ of
    a step beyond the half step."""
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # 0 is always representable
    exact = (hi - lo) / 15
    s = exact.astype(np.float32)
    s = np.where(s > exact, np.nextafter(s, np.float32(0)), s)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s > 0, np.clip(np.floor(-lo / s + 0.5), 0, 15), 0)
    return s, z.astype(np.uint8)


def round_half_away(x: np.ndarray) -> np.ndarray:
    return np.trunc(x + np.copysign(0.5, x))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """q [R, I] uint8 in 0..15, I even -> [R, I/2]: column 2k in the low nibble, 2k+1 in the high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """[R, I/2] uint8 -> q [R, I] uint8 in 0..15."""
    q = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
    return q


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int) -> np.ndarray:
    """(q_packed [R, I/2], scales [R, G], zeros [R, G]) -> float32 [R, I]"""
    q = unpack_int4(packed).astype(np.float32).reshape(len(packed), -1, group)  # [R, G, group]
    return ((q - zeros[..., None]) * scales[..., None]).reshape(len(packed), -1)


class QuantizedInt4Weight:
    """An int4 matrix: q_packed [R, I/2] uint8 (two values per byte), scales [R, G] float32, zeros [R, G] uint8."""

    def __init__(self, q_packed: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int):
        self.q_packed, self.scales, self.zeros, self.group = q_packed, scales, zeros, group
        self.shape = (q_packed.shape[0], q_packed.shape[1] * 2)

    @property
    def scheme(self) -> str:
        return f"int4-g{self.group}"

    @property
    def nbytes(self) -> int:
        return self.q_packed.nbytes + self.scales.nbytes + self.zeros.nbytes

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Dequantized rows start..stop-1, float32."""
        return dequantize_int4(self.q_packed[start:stop], self.scales[start:stop], self.zeros[start:stop], self.group)

    def take(self, ids: np.ndarray) -> np.ndarray:
        return dequantize_int4(self.q_packed[ids], self.scales[ids], self.zeros[ids], self.group)


QUANTIZED = (QuantizedWeight, QuantizedInt4Weight)  # what a pre-quantized checkpoint hands to prepare_linear


def quantize_scheme(w: np.ndarray, scheme: str, name: str = "weight"):
    """w [R, I] float32 -> the QuantizedWeight or QuantizedInt4Weight of a scheme in SCHEMES."""
    if scheme not in SCHEMES:
        raise RefqwenError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    bits, group = SCHEMES[scheme]
    if bits == 8:
        return QuantizedWeight(*quantize(w, "channel" if group is None else "g32"))
    return QuantizedInt4Weight(*quantize_int4(w, group, name=name), group)
