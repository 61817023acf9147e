"""Elementwise math that LLVM vectorizes: exp of a non-positive argument, SwiGLU built on it, RMSNorm and
rotary embedding. (A decode step calls the last two ~100 times on a few thousand numbers each, where
NumPy's several passes and temporaries cost 15-30 us a call.)

A call to libm's expf inside a Numba loop keeps the loop scalar. `exp_nonpositive` is Cephes' expf
(within 1 ulp on [-87, 0]) written as plain arithmetic, inlined into the caller's loop, so the loop
becomes vector code: exp(a) = 2^n e^r with n = round(a / ln 2), e^r a degree-7 polynomial on
|r| <= ln2 / 2, and 2^n built from its float32 exponent bits. Arguments below -87 are taken as -87:
1.6e-38, still a normal float (no slow subnormal arithmetic downstream), instead of a smaller one.
Two more things keep a Numba loop scalar, and are avoided here: `max()` on floats (its NaN handling;
a comparison is used instead) and an index that might be negative (Numba wraps it around), so
loops run from 0 over views.
"""

import numpy as np

try:
    from numba import njit, prange

    from refqwen.backends.float_tiles import float_from_bits
except ImportError:  # the backends that use this module report numba as unavailable
    njit = None

FAST = {"reassoc", "contract"}

if njit is not None:

    @njit(fastmath=FAST, inline="always", cache=True)
    def exp_nonpositive(a):
        """exp(a) for a float32 a <= 0 (a > 0 is not supported: the caller shifts by a maximum)."""
        a = a if a > np.float32(-87.0) else np.float32(-87.0)
        n = np.floor(a * np.float32(1.44269504) + np.float32(0.5))
        r = a - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
        poly = np.float32(1.9875691500e-4)
        poly = poly * r + np.float32(1.3981999507e-3)
        poly = poly * r + np.float32(8.3334519073e-3)
        poly = poly * r + np.float32(4.1665795894e-2)
        poly = poly * r + np.float32(1.6666665459e-1)
        poly = poly * r + np.float32(5.0000001201e-1)
        two_n = float_from_bits((np.int32(n) + np.int32(127)) << np.int32(23))
        return (poly * r * r + r + np.float32(1.0)) * two_n

    @njit(parallel=True, fastmath=FAST, cache=True)
    def swiglu(gate, up, out):
        """out = silu(gate) * up, [T, I] float32 each: silu(g) = g / (1 + exp(-g)), with exp taken of -|g|
        (g < 0: e^g / (1 + e^g) is the same number) so that it never overflows."""
        T, width = gate.shape
        for t in prange(T):
            g_row, u_row, o_row = gate[t], up[t], out[t]
            for j in range(width):
                g = g_row[j]
                e = exp_nonpositive(-g if g > 0 else g)
                sigmoid = np.float32(1.0) / (np.float32(1.0) + e) if g > 0 else e / (np.float32(1.0) + e)
                o_row[j] = g * sigmoid * u_row[j]

    @njit(fastmath=FAST, cache=True)
    def rms_norm(x, weight, eps, out):
        """out = x / sqrt(mean(x^2) + eps) * weight, x [T, C] float32, weight [C]: refqwen/model/norm.py's
        arithmetic (the mean square summed in float32 lanes, in another order than NumPy's)."""
        T, C = x.shape
        for t in range(T):
            row = x[t]
            total = np.float32(0.0)
            for c in range(C):
                total += row[c] * row[c]
            inv = np.float32(1.0) / np.sqrt(total / np.float32(C) + eps)
            out_row = out[t]
            for c in range(C):
                out_row[c] = row[c] * inv * weight[c]

    @njit(cache=True)
    def apply_rotary(x, cos, sin, out):
        """out = x cos + rotate_half(x) sin, x [T, H, D], cos and sin [T, D]: refqwen/model/rope.py's
        arithmetic, rounding for rounding (no fastmath: no fused multiply-add)."""
        T, H, D = x.shape
        half = D // 2
        for t in range(T):
            c, s = cos[t], sin[t]
            for h in range(H):
                row, dst = x[t, h], out[t, h]
                for d in range(half):
                    dst[d] = row[d] * c[d] + (-row[d + half]) * s[d]
                for d in range(half, D):
                    dst[d] = row[d] * c[d] + row[d - half] * s[d]
