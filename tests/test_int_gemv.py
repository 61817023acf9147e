"""The decode GEMVs of backends/int_gemv.py (int4 x int8, int8 x int8) against int64 NumPy, on every
instruction set this CPU runs.

Their group sums are exact integers, so with unit scales (and sums below 2^24) the float32 result is the int64
result exactly, zero points included. With any scales: each lane's exact sum is multiplied by the rounded
product of two scales and added to a float32 accumulator (at most I/64 + 8 roundings of the magnitude
sum_j |ws xs q xq|); the zero-point term rounds the activations' group sums (5 roundings), its products (2) and
its sum over the G groups (G), and one subtraction: within (I/64 + G + 16) * 2^-23 of all magnitudes.
The int8 GEMV has no zero-point term: within (I/32 + 16) * 2^-23 of its magnitudes.
Subnormal scale products lose up to 2^-149 absolute per rounding. AVX2 and the generic IR compute the same
integers in the same order: bit for bit equal.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_int8_kernels import EPS32, TINY, draw_int8, draw_scales

from refqwen import quant
from refqwen.backends import int_gemv
from refqwen.errors import RefqwenError

INSTRUCTIONS = ["generic"] + (["avx2"] if int_gemv.target_has_avx2() else [])


def draw_weight(rng, O, I, group, values, scales):
    """A QuantizedInt4Weight with nibbles q [O, I] drawn as `values` says, and the q it holds."""
    if values == "extremes":
        q = rng.choice(np.array([0, 15], np.uint8), (O, I))
    else:
        q = rng.integers(0, 16, (O, I), dtype=np.uint8)
    G = I // group
    zeros = rng.integers(0, 16, (O, G), dtype=np.uint8)
    return quant.QuantizedInt4Weight(quant.pack_int4(q), draw_scales(rng, (O, G), scales), zeros, group), q


def int64_reference(weight, q, xq, xs):
    """(float64 result [O], sum of magnitudes [O]) from exact int64 sums per activation group of 32."""
    O, I = q.shape
    exact, magnitude = np.zeros(O), np.zeros(O)
    for a in range(I // 32):
        cols, g = slice(32 * a, 32 * a + 32), a * 32 // weight.group
        scale = weight.scales[:, g].astype(np.float64) * np.float64(xs[a])  # [O]
        centered = q[:, cols].astype(np.int64) - weight.zeros[:, g, None].astype(np.int64)  # [O, 32]
        exact += (centered @ xq[cols].astype(np.int64)) * scale
        x_abs = np.abs(xq[cols].astype(np.int64))
        magnitude += (q[:, cols].astype(np.int64) @ x_abs + weight.zeros[:, g].astype(np.int64) * x_abs.sum()) \
            * np.abs(scale)
    return exact, magnitude


@settings(max_examples=60, deadline=None)
@given(O=st.integers(1, 37), G=st.integers(1, 9), group=st.sampled_from([32, 128]),
       values=st.sampled_from(["random", "extremes", "min"]),
       scales=st.sampled_from(["ones", "random", "zeros", "subnormal"]), seed=st.integers(0, 2**31))
def test_int4_gemv_is_exact_per_group(O, G, group, values, scales, seed):
    rng = np.random.default_rng(seed)
    I = G * group  # G odd with groups of 32: the last group runs outside the vector loop
    weight, q = draw_weight(rng, O, I, group, values, scales)
    xq, xs = draw_int8(rng, I, values), draw_scales(rng, I // 32, scales)
    exact, magnitude = int64_reference(weight, q, xq, xs)
    results = {name: int_gemv.gemv_int4(weight, xq, xs, name) for name in INSTRUCTIONS}
    for name, y in results.items():
        assert y.shape == (O,) and y.dtype == np.float32
        if scales == "ones":  # |each sum| <= 1152 * 15 * 128 < 2^24: every float32 step is exact
            assert np.array_equal(y, exact), name
        else:
            bound = (I / 64 + G + 16) * EPS32 * magnitude + (I + G + 16) * 16 * 128 * TINY
            assert np.all(np.abs(y - exact) <= bound), name
    assert all(np.array_equal(y, results["generic"]) for y in results.values())


def test_gemvs_refuse_bad_arguments():
    weight = quant.quantize_scheme(np.ones((3, 64), np.float32), "int4-g32")
    with pytest.raises(RefqwenError, match=r"int_gemv: a weight of input 64 and activations \(32,\) with 1 scales"):
        int_gemv.gemv_int4(weight, np.ones(32, np.int8), np.ones(1, np.float32))
    with pytest.raises(RefqwenError, match="unknown instruction set 'neon' .*expected one of avx2, generic"):
        int_gemv.gemv_int8(quant.quantize_scheme(np.ones((3, 64), np.float32), "int8-g32"), np.ones(64, np.int8),
                           np.ones(2, np.float32), "neon")


def test_generic_kernel_on_a_cpu_without_avx2(tmp_path):
    """Compiled for baseline x86-64 (SSE2) in a child process: the choice falls to the generic kernel, asking
    for AVX2 is a clear error (never an instruction LLVM cannot select), and the result is still exact."""
    script = textwrap.dedent("""
        import numpy as np
        from refqwen import quant
        from refqwen.backends import int_gemv
        from refqwen.errors import RefqwenError
        assert int_gemv.instruction() == "generic"
        rng = np.random.default_rng(0)
        q = rng.integers(0, 16, (5, 96), dtype=np.uint8)
        zeros = rng.integers(0, 16, (5, 3), dtype=np.uint8)
        weight = quant.QuantizedInt4Weight(quant.pack_int4(q), np.ones((5, 3), np.float32), zeros, 32)
        xq = rng.integers(-128, 128, 96, dtype=np.int8)
        centered = q.astype(np.int64) - np.repeat(zeros, 32, axis=1)
        assert np.array_equal(int_gemv.gemv_int4(weight, xq, np.ones(3, np.float32)), centered @ xq.astype(np.int64))
        q8 = quant.QuantizedWeight(rng.integers(-128, 128, (5, 96), dtype=np.int8), np.ones((5, 3), np.float32))
        x8 = np.maximum(xq, -127)
        assert np.array_equal(int_gemv.gemv_int8(q8, x8, np.ones(3, np.float32)), q8.q.astype(np.int64) @ x8)
        try:
            int_gemv.gemv_int4(weight, xq, np.ones(3, np.float32), "avx2")
        except RefqwenError as e:
            print("refused:", e)
    """)
    env = dict(os.environ, NUMBA_CPU_NAME="x86-64", NUMBA_CPU_FEATURES="", NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "refused: the AVX2 GEMV needs a CPU with AVX2, not x86-64" in out.stdout


@settings(max_examples=60, deadline=None)
@given(G=st.integers(1, 12), group=st.sampled_from([32, 128]), mag=st.sampled_from([1e-40, 1e-3, 1.0, 1e30]),
       special=st.sampled_from(["none", "zeros", "halves"]), seed=st.integers(0, 2**31))
def test_token_quantizations_are_quant_quantize_activations(G, group, mag, special, seed):
    """The Numba quantizer of one token gives quant.quantize_activations' integers and scales bit for bit
    (so decode and prefill quantize alike), and the group sums of the dequantized values."""
    rng = np.random.default_rng(seed)
    I = G * 128
    x = (rng.standard_normal(I) * mag).astype(np.float32)
    if special == "zeros":
        x[:32] = 0
        x[rng.random(I) < 0.3] = 0
    elif special == "halves":  # values exactly half way between two integers of the scale: ties to even
        x = (rng.integers(-254, 255, I) / 2).astype(np.float32)
        x[::32] = 127
    xq, xs = quant.quantize_activations(x[None])
    x_even, x_odd = np.empty(I // 2, np.int8), np.empty(I // 2, np.int8)
    scales, sums = np.empty(I // 32, np.float32), np.empty(I // group, np.float32)
    int_gemv.quantize_token(x, group, x_even, x_odd, scales, sums)
    assert np.array_equal(x_even, xq[0, 0::2]) and np.array_equal(x_odd, xq[0, 1::2])
    assert np.array_equal(scales.view(np.int32), xs[0].view(np.int32))
    exact = (xq[0].reshape(-1, group).astype(np.float64) * np.repeat(xs[0], 32).reshape(-1, group)).sum(axis=1)
    magnitude = (np.abs(xq[0]).reshape(-1, group).astype(np.float64) * np.repeat(xs[0], 32).reshape(-1, group)).sum(1)
    assert np.all(np.abs(sums - exact) <= 5 * EPS32 * magnitude + 5 * TINY)
    row_q, row_s = np.empty(I - 7, np.int8), np.empty(-(-(I - 7) // 32), np.float32)  # a shorter last group
    int_gemv.quantize_row(x[:I - 7], row_q, row_s)
    xq, xs = quant.quantize_activations(x[None, :I - 7])
    assert np.array_equal(row_q, xq[0]) and np.array_equal(row_s.view(np.int32), xs[0].view(np.int32))


@settings(max_examples=60, deadline=None)
@given(O=st.integers(1, 37), I=st.integers(1, 300), values=st.sampled_from(["random", "extremes"]),
       scales=st.sampled_from(["ones", "random", "zeros", "subnormal"]), seed=st.integers(0, 2**31))
def test_int8_gemv_is_exact_per_group(O, I, values, scales, seed):
    """int8 weights (-128 too) times int8 activations (-127..127, as quantized); any I, a shorter last group."""
    rng = np.random.default_rng(seed)
    G = -(-I // 32)
    q = draw_int8(rng, (O, I), values)
    xq = np.maximum(draw_int8(rng, I, values), -127).astype(np.int8)
    weight = quant.QuantizedWeight(q, draw_scales(rng, (O, G), scales))
    xs = draw_scales(rng, G, scales)
    exact, magnitude = int64_reference_int8(q, weight.scales, xq, xs)
    results = {name: int_gemv.gemv_int8(weight, xq, xs, name) for name in INSTRUCTIONS}
    for name, y in results.items():
        assert y.shape == (O,) and y.dtype == np.float32
        if scales == "ones":  # |sum| <= 300 * 128 * 127 < 2^24
            assert np.array_equal(y, exact), name
        else:
            bound = (I / 32 + 16) * EPS32 * magnitude + (I + 16) * 128 * 128 * TINY
            assert np.all(np.abs(y - exact) <= bound), name
    assert all(np.array_equal(y, results["generic"]) for y in results.values())


def int64_reference_int8(q, ws, xq, xs):
    """(float64 result [O], sum of magnitudes [O]) from exact int64 group sums."""
    O, I = q.shape
    exact, magnitude = np.zeros(O), np.zeros(O)
    for g in range(-(-I // 32)):
        cols = slice(32 * g, 32 * g + 32)
        scale = ws[:, g].astype(np.float64) * np.float64(xs[g])
        exact += (q[:, cols].astype(np.int64) @ xq[cols].astype(np.int64)) * scale
        magnitude += (np.abs(q[:, cols].astype(np.int64)) @ np.abs(xq[cols].astype(np.int64))) * np.abs(scale)
    return exact, magnitude


@settings(max_examples=60, deadline=None)
@given(O=st.integers(1, 37), I=st.integers(1, 300), values=st.sampled_from(["random", "extremes"]),
       scales=st.sampled_from(["ones", "random", "zeros", "subnormal"]), seed=st.integers(0, 2**31))
def test_float_gemv_against_float64(O, I, values, scales, seed):
    """numba-int8's int8 x float32 GEMV: any I (a shorter last group), weights -128..127, float activations.
    Each weight's term meets at most I/32 + 8 roundings in the vector loop (product, quarter sums, scale,
    accumulator, lane sum) or 32 + 3 in the shorter last group: within (I/32 + 40) * 2^-23 of the sum of
    magnitudes, plus 2^-149 a rounding where the products are subnormal."""
    rng = np.random.default_rng(seed)
    G = -(-I // 32)
    weight = quant.QuantizedWeight(draw_int8(rng, (O, I), values), draw_scales(rng, (O, G), scales))
    x = rng.standard_normal(I).astype(np.float32) * np.float32(1e3 if values == "extremes" else 1)
    y = int_gemv.gemv_float(x, weight)
    terms = weight.q.astype(np.float64) * np.repeat(weight.scales.astype(np.float64), 32, axis=1)[:, :I] * x
    assert y.shape == (O,) and y.dtype == np.float32
    bound = (I / 32 + 40) * EPS32 * np.abs(terms).sum(axis=1) + (I + 40) * TINY
    assert np.all(np.abs(y - terms.sum(axis=1)) <= bound)


def test_float_gemv_refuses_a_mismatch():
    weight = quant.QuantizedWeight(np.ones((2, 64), np.int8), np.ones((2, 2), np.float32))
    with pytest.raises(RefqwenError, match="input 64 and 2 group scales does not match activations \\(65,\\)"):
        int_gemv.gemv_float(np.ones(65, np.float32), weight)


def test_decode_gemvs_prefetch_their_weights(tmp_path):
    """The decode GEMVs issue software prefetches (backends/prefetch.py) in their compiled loops: the int8
    and int4 GEMVs and numba-int8's float one (all here), compiled afresh in a child process (Numba shows no
    assembly of cached code)."""
    script = textwrap.dedent("""
        import numpy as np
        from refqwen.backends import int_gemv
        from refqwen.quant import QuantizedInt4Weight, QuantizedWeight

        w8 = QuantizedWeight(np.ones((4, 64), np.int8), np.ones((4, 2), np.float32))
        w4 = QuantizedInt4Weight(np.ones((4, 32), np.uint8), np.ones((4, 2), np.float32),
                                 np.zeros((4, 2), np.uint8), 32)
        x, y = np.ones(64, np.float32), np.empty(4, np.float32)
        int_gemv.linear_one_token(x, w8), int_gemv.linear_one_token(x, w4)
        int_gemv.gemv_float(x, w8)
        name = int_gemv.instruction()
        for f in (int_gemv._GEMV8S[name], int_gemv._GEMVS[name], int_gemv.gemv_float_rows):
            print(min(asm.count("prefetcht0") for asm in f.inspect_asm().values()))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))  # nothing cached: compiled here, inspectable
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = [int(n) for n in done.stdout.split()]
    assert len(counts) == 3 and min(counts) >= 1, counts
