"""The reference's weight quantizers (refqwen/quant.py), bit for bit, as parallel Numba loops.

A load quantizes every matrix of a float checkpoint: 630 million weights for the demo model (embedding and
untied lm_head included). NumPy's version of the same arithmetic makes float temporaries the size of each
chunk and passes over them a dozen times (`python tools/bench_quantize.py` on this project's 2-core machine:
~12 ns a weight for int8-g32, ~28 ns for int4-g32, so ~7.6 s of a numba-int8 load and ~17 s of a numba-int4
one); here each group is read once, rounded in registers and written, in both threads (1.6 and 2.2 ns).

The arithmetic is the reference's, step for step, so the integers and scales are identical (the tests
compare them with np.array_equal): int8 in float32 (max |w| / 127, w / s rounded half to even, clipped to
+-127), int4 in float64 (quant.int4_scales: the scale rounded down to float32, the zero point and the values
rounded half away from zero). A NaN in a group gives that group the reference's NaN scale and zero
integers; the loaders refuse infinities before a backend sees a weight (checkpoint/weights.check_finite).
The int8 rounding of a group (`int8_scale`, `to_int8`) is also the one numba-w8a8 and numba-w4a8 apply to a
token's activations (backends/int_gemv.py, and `round_trip_activations` for prefill).
"""

import numpy as np

from refqwen import quant

try:
    from numba import njit, prange
except ImportError:  # the Numba backends report it (unavailable_reason)
    njit = None


def quantize_scheme(w, scheme: str, name: str = "weight", rows_per_chunk: int = 4096):
    """w [R, I] float -> the QuantizedWeight or QuantizedInt4Weight quant.quantize_scheme(w, scheme) returns.
    Rows are read in chunks, as the reference reads them: a GGUF embedding (checkpoint/gguf.GGUFMatrix)
    is dequantized a chunk at a time and never held whole in float32."""
    if scheme not in quant.SCHEMES or njit is None:
        return quant.quantize_scheme(w, scheme, name)  # its error names the schemes
    bits, group = quant.SCHEMES[scheme]
    R, I = w.shape
    if bits == 4:
        quant.check_group(I, group, name)
        packed, scales, zeros = np.empty((R, I // 2), np.uint8), np.empty((R, I // group), np.float32), \
            np.empty((R, I // group), np.uint8)
    else:  # group None: per channel, one group per row
        q, scales = np.empty((R, I), np.int8), np.empty((R, -(-I // (group or I))), np.float32)
    for r0 in range(0, R, rows_per_chunk):
        rows = np.ascontiguousarray(w[r0:r0 + rows_per_chunk], np.float32)  # a float32 memory map: in place
        r1 = r0 + len(rows)
        if bits == 4:
            _int4_rows(rows, group, packed[r0:r1], scales[r0:r1], zeros[r0:r1])
        else:
            _int8_rows(rows, group or I, q[r0:r1], scales[r0:r1])
    if bits == 4:
        return quant.QuantizedInt4Weight(packed, scales, zeros, group)
    return quant.QuantizedWeight(q, scales if group else scales[:, 0])


def round_trip_activations(x) -> np.ndarray:
    """quant.dequantize(*quant.quantize_activations(x)), bit for bit, in one parallel pass: the activations a
    W8A8 or W4A8 prefill multiplies in float32 (x [T, I]; NumPy's version passed over a [T, I] array about ten
    times: ~19 ms for a 512-token prompt's down projection input)."""
    x = np.ascontiguousarray(x, np.float32)
    if njit is None:
        return quant.dequantize(*quant.quantize_activations(x))
    out = np.empty_like(x)
    _int8_round_trip_rows(x, quant.GROUP, out)
    return out


if njit is not None:

    @njit(inline="always", cache=True)
    def int8_scale(row, a, b):
        """The int8 scale of row[a:b]: max |w| / 127 in float32, NaN if the group holds a NaN (quant.quantize)."""
        m, nan = np.float32(0), False
        for j in range(a, b):
            v = abs(row[j])
            nan |= v != v
            m = max(m, v)
        return np.float32(np.nan) if nan else m / np.float32(127)

    @njit(inline="always", cache=True)
    def to_int8(v, s):
        """round(v / s) half to even, clipped to +-127; 0 for a NaN or zero scale (np.where(s > 0, ..., 0))."""
        return np.int8(min(max(np.rint(v / s), np.float32(-127)), np.float32(127))) if s > 0 else np.int8(0)

    @njit(parallel=True, cache=True)
    def _int8_rows(w, group, q, scales):
        """w [R, I] float32 -> q [R, I] int8, scales [R, ceil(I / group)] float32 (quant.quantize)."""
        R, I = w.shape
        for r in prange(R):
            for g in range(scales.shape[1]):
                a, b = g * group, min(g * group + group, I)  # the last group may be shorter
                s = scales[r, g] = int8_scale(w[r], a, b)
                for j in range(a, b):
                    q[r, j] = to_int8(w[r, j], s)

    @njit(parallel=True, cache=True)
    def _int8_round_trip_rows(x, group, out):
        """out [T, I] = the int8 values of x [T, I] times their scales: quant.dequantize(*quant.quantize(x))."""
        T, I = x.shape
        for t in prange(T):
            for a in range(0, I, group):
                b = min(a + group, I)
                s = int8_scale(x[t], a, b)
                for j in range(a, b):
                    out[t, j] = np.float32(to_int8(x[t, j], s)) * s

    @njit(parallel=True, cache=True)
    def _int4_rows(w, group, packed, scales, zeros):
        """w [R, I] float32 -> packed [R, I/2] uint8, scales [R, G] float32, zeros [R, G] uint8
        (quant.quantize_int4 with quant.int4_scales and quant.pack_int4)."""
        R, I = w.shape
        for r in prange(R):
            for g in range(I // group):
                a = g * group
                lo, hi, nan = 0.0, 0.0, False  # 0 is always representable
                for j in range(a, a + group):
                    v = np.float64(w[r, j])
                    nan |= v != v
                    lo, hi = min(lo, v), max(hi, v)
                exact = (hi - lo) / 15
                s = np.float32(exact)
                if s > exact:  # rounded up: one float32 step down, so that lo and hi stay in 0..15
                    s = np.float32(np.nextafter(s, np.float32(0)))
                z = min(max(np.floor(-lo / s + 0.5), 0.0), 15.0) if s > 0 else 0.0
                if nan:
                    s, z = np.float32(np.nan), 0.0
                scales[r, g], zeros[r, g] = s, np.uint8(z)
                for j in range(a, a + group, 2):
                    pair = 0
                    for k in range(2):
                        x = np.float64(w[r, j + k]) / np.float64(s)
                        v = np.trunc(x + np.copysign(0.5, x)) + z if s > 0 else z  # round half away from zero
                        pair |= np.int64(min(max(v, 0.0), 15.0)) << (4 * k)  # column 2k low, 2k + 1 high
                    packed[r, j // 2] = np.uint8(pair)
