"""The int8 x int8 GEMM of backends/vnni.py against int64 NumPy, on every instruction this CPU can run, and the
choice of path (REFQWEN_INT8_PATH, the CPU's features).

The kernel's int32 sums of a group are exact, so with unit scales (and sums below 2^24) its float32 result is
the int64 result exactly. With any scales, each lane's exact four-term sum is multiplied by the rounded
product of the two group scales and added to a float32 accumulator: at most (steps + tail groups + 8)
roundings apart from the exact value, each of at most 2^-24 of the sum of magnitudes, so within
(I/32 + 8) * 2^-23 * sum_j |xs ws xq q|; subnormal scale products lose up to 2^-149 absolute per rounding.
The VNNI instruction and its generic twin compute the same lanes in the same order: bit for bit equal.
"""

import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_backends import draw_matrix, linear_bound

from refqwen import backends
from refqwen.backends import vnni
from refqwen.errors import RefqwenError

INSTRUCTIONS = ["generic"] + (["vnni"] if vnni.cpu_has_vnni() else [])
PATHS = ["portable"] + (["vnni"] if vnni.cpu_has_vnni() else [])
EPS32, TINY = 2.0 ** -23, 2.0 ** -149


def draw_int8(rng, shape, values):
    if values == "extremes":  # only -128 and 127: the largest products and the unsigned shift's edges
        return rng.choice(np.array([-128, 127], np.int8), shape)
    if values == "min":
        return np.full(shape, -128, np.int8)
    return rng.integers(-128, 128, shape, dtype=np.int8)


def draw_scales(rng, shape, kind):
    if kind == "ones":
        return np.ones(shape, np.float32)
    s = rng.random(shape).astype(np.float32)
    if kind == "zeros":
        s[rng.random(shape) < 0.5] = 0
    elif kind == "subnormal":
        s = (s * 2.0 ** -130).astype(np.float32)  # below float32's smallest normal, 2^-126
        s[rng.random(shape) < 0.3] = 1.0
    return s


def int64_reference(xq, xs, q, ws):
    """(float64 result [T, O], sum of magnitudes [T, O]) from exact int64 group sums."""
    T, I = xq.shape
    exact, magnitude = np.zeros((T, q.shape[0])), np.zeros((T, q.shape[0]))
    for g in range(-(-I // 32)):
        cols = slice(32 * g, 32 * g + 32)
        scale = xs[:, g, None].astype(np.float64) * ws[None, :, g].astype(np.float64)  # [T, O]
        sums = xq[:, cols].astype(np.int64) @ q[:, cols].T.astype(np.int64)  # [T, O]
        exact += sums * scale
        magnitude += np.abs(xq[:, cols].astype(np.int64)) @ np.abs(q[:, cols].T.astype(np.int64)) * np.abs(scale)
    return exact, magnitude


@settings(max_examples=60, deadline=None)
@given(T=st.sampled_from([1, 2, 3, 4, 5, 7, 9, 17, 70]), O=st.integers(1, 37), I=st.integers(1, 300),
       values=st.sampled_from(["random", "extremes", "min"]),
       scales=st.sampled_from(["ones", "random", "zeros", "subnormal"]), seed=st.integers(0, 2**31))
def test_int8_gemm_is_exact_per_group(T, O, I, values, scales, seed):
    rng = np.random.default_rng(seed)
    G = -(-I // 32)
    xq, q = draw_int8(rng, (T, I), values), draw_int8(rng, (O, I), values)
    xs, ws = draw_scales(rng, (T, G), scales), draw_scales(rng, (O, G), scales)
    exact, magnitude = int64_reference(xq, xs, q, ws)
    results = {name: vnni.matmul_w8a8(xq, xs, q, ws, name) for name in INSTRUCTIONS}
    for name, y in results.items():
        assert y.shape == (T, O) and y.dtype == np.float32
        if scales == "ones":  # |sum| <= 300 * 128^2 < 2^24: every float32 step is exact
            assert np.array_equal(y, exact), name
        else:
            bound = (I / 32 + 8) * EPS32 * magnitude + (I + 8) * 128 * 128 * TINY
            assert np.all(np.abs(y - exact) <= bound), name
    assert all(np.array_equal(y, results["generic"]) for y in results.values())


def test_int8_gemm_refuses_mismatched_shapes():
    with pytest.raises(RefqwenError, match="matmul_w8a8: shapes"):
        vnni.matmul_w8a8(np.ones((2, 64), np.int8), np.ones((2, 2), np.float32), np.ones((3, 32), np.int8),
                         np.ones((3, 1), np.float32), "generic")


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=30, deadline=None)
@given(T=st.sampled_from([5, 9, 33]), O=st.integers(1, 40), I=st.integers(1, 200),
       x_mag=st.sampled_from([1e-3, 1.0, 1e3]), special=st.sampled_from(["none", "zeros", "constant-rows"]),
       seed=st.integers(0, 2**31))
def test_w8a8_prefill_on_each_path_within_quantization_bound(path, T, O, I, x_mag, special, seed):
    """numba-w8a8 prefill (T > 4) forced onto each path this CPU runs, within tests/test_backends.py's bound."""
    with pytest.MonkeyPatch.context() as env:  # the path is chosen when the backend is made
        env.setenv(vnni.ENV, path)
        ops = backends.get("numba-w8a8")
    assert ops.int8_path == path
    rng = np.random.default_rng(seed)
    w, x = draw_matrix(rng, (O, I), 0.2, special), draw_matrix(rng, (T, I), x_mag, special)
    prepared = ops.prepare_linear("w", w)
    assert ops.uses_vnni(prepared) == (path == "vnni")
    error = np.abs(ops.linear(x, prepared) - x.astype(np.float64) @ w.T.astype(np.float64))
    assert np.all(error <= linear_bound(ops, prepared, w, x, None))


def test_path_choice(monkeypatch):
    monkeypatch.delenv(vnni.ENV, raising=False)
    assert vnni.path() == ("vnni" if vnni.cpu_has_vnni() else "portable")
    monkeypatch.setenv(vnni.ENV, "portable")
    assert vnni.path() == "portable" and backends.get("numba-w8a8").int8_path == "portable"
    monkeypatch.setenv(vnni.ENV, "avx9")
    with pytest.raises(RefqwenError, match=r"REFQWEN_INT8_PATH='avx9': expected one of auto, vnni, portable"):
        vnni.path()
    monkeypatch.setenv(vnni.ENV, "vnni")
    if vnni.cpu_has_vnni():
        assert vnni.path() == "vnni"
    else:  # never an illegal instruction: a clear error, and the kernel is not even compiled
        with pytest.raises(RefqwenError, match="REFQWEN_INT8_PATH=vnni but this CPU has no AVX-512 VNNI"):
            backends.get("numba-w8a8")
        with pytest.raises(RefqwenError, match="needs a CPU with AVX-512 VNNI"):
            vnni.gemm_function("vnni")


def test_vnni_tile_compiles_to_vpdpbusd():
    """The VNNI tile, compiled for a CPU that has the instruction (Zen 4) in a child process that only
    inspects the assembly and never runs it: the instruction is there, 16 per step of a 4 x 4 tile.
    (On a CPU that is not x86 there is no such target: there the path can only be portable.)"""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        assert vnni.path() == "portable"
        return
    script = textwrap.dedent("""
        from numba import njit, types
        from refqwen.backends import vnni
        tile = vnni.make_tile(4, 4, vnni._dot_vnni)

        @njit(types.void(*([types.int64] * 12)))
        def run(*args):
            tile(*args)

        print(run.inspect_asm(run.signatures[0]).count("vpdpbusd"))
    """).replace("*args", ", ".join(f"a{i}" for i in range(12)))
    env = dict(os.environ, NUMBA_CPU_NAME="znver4", NUMBA_CPU_FEATURES="")  # nothing cached is compiled there
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == 16
