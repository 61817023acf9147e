"""Every operation of every backend that can run here, against the NumPy reference (hypothesis).

Tolerances come from the arithmetic, not from tuning:
- int8 and int4 weights: each dequantized weight is within half a quantization step s of the
  true weight, so an output is within  ½ Σ_j s[o, j] |x_j|  of the exact product (int4: plus
  15 · 2⁻²⁴ of a step, refqwen/quant.py int4_scales);
- int8 activations (W8A8) add  ½ Σ_j s_x[j] (|w_oj| + ½ s[o, j])  for the same reason;
- float32 arithmetic adds at most  (I + 4) · 2⁻²³ · Σ_j |w_oj x_j|  (a dot product of length I
  summed in any order, plus the rounding of dequantization and bias).
Operations a backend does not override are the reference's own code and must match exactly.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refqwen import backends, quant
from refqwen.backends import cuda_kernels, cupy_gpu
from refqwen.model.ops import Backend

HOST_MODE = " (host mode)"  # a cupy backend with NumPy and the kernels' NumPy twins standing in for the GPU
NAMES = ([name for name, why in backends.available().items() if why is None]
         + [name + HOST_MODE for name in cupy_gpu.VARIANTS])
REFERENCE = Backend()
EPS32 = 2.0 ** -23
F16_ROUND, BF16_ROUND = 2.0 ** -11, 2.0 ** -8  # unit roundoff: 10 and 7 fraction bits
F16_HALF_SUBNORMAL = 2.0 ** -25  # float16 below 2^-14 has a fixed spacing of 2^-24


def make(name):
    """A backend by name; "<cupy name> (host mode)" runs the cupy backend's array logic on NumPy."""
    if name.endswith(HOST_MODE):
        return cupy_gpu.VARIANTS[name.removesuffix(HOST_MODE)](host=True)
    return backends.get(name)


def reuses_reference(ops, method: str) -> bool:
    """Whether the backend runs the reference's own code for this operation: then it must match exactly."""
    return getattr(type(ops), method) is getattr(Backend, method)


def on(ops, a):
    """An input array where the backend keeps its arrays (the GPU for a cupy backend)."""
    return getattr(ops, "xp", np).asarray(a)


def off(ops, a):
    return np.asarray(ops.to_host(a))
# Beyond half a step, a dequantized weight carries float32 rounding: of w / scale, of q · scale
# (|q| <= 127: up to 64 ulps of a step), and for int4 the scale rounded down (quant.int4_scales).
HALF_STEP = 0.5 + 128 * EPS32


def draw_matrix(rng, shape, magnitude, special):
    """Normal values scaled to `magnitude`, with exact zeros and constant rows mixed in."""
    a = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    if special == "zeros":
        a[rng.random(shape) < 0.3] = 0
        a[: max(1, shape[0] // 3)] = 0  # whole rows of zeros too
    elif special == "constant-rows":
        a[:] = a[:, :1]
    return a


def steps(scales, R, I, group=32):
    """Per-element quantization step [R, I] from per-row [R] or per-group [R, G] scales."""
    scales = np.asarray(scales, np.float64)
    return np.repeat(scales[:, None], I, axis=1) if scales.ndim == 1 else quant.expand(scales, I, group)


def aligned(ops, n: int) -> int:
    """n rounded up to the input multiple the backend's on-load scheme needs (int4 groups tile the input)."""
    bits, group = quant.SCHEMES.get(getattr(ops, "layout", None), (8, None))
    return -(-n // group) * group if bits == 4 else n


dims = dict(T=st.sampled_from([1, 2, 3, 5, 9, 33]), O=st.integers(1, 70), I=st.integers(1, 140),
            x_mag=st.sampled_from([1e-3, 1.0, 30.0, 1e3]), w_mag=st.sampled_from([1e-2, 0.2, 1.0]),
            special=st.sampled_from(["none", "zeros", "constant-rows"]), seed=st.integers(0, 2**31))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=120, deadline=None)
@given(**dims, bias=st.booleans())
def test_linear_within_quantization_bound(name, T, O, I, x_mag, w_mag, special, seed, bias):
    rng = np.random.default_rng(seed)
    ops = make(name)
    I = aligned(ops, I)
    w, x = draw_matrix(rng, (O, I), w_mag, special), draw_matrix(rng, (T, I), x_mag, special)
    b = (rng.standard_normal(O) * w_mag).astype(np.float32) if bias else None
    prepared = ops.prepare_linear("w", w)
    got = off(ops, ops.linear(on(ops, x), prepared, None if b is None else ops.prepare_float("b", b)))
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if b is None else b)
    assert got.shape == (T, O) and got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= linear_bound(ops, prepared, w, x, b))


def storage_error(ops, prepared, w):
    """Per-weight bound [O, I] on |stored weight - w|: half a quantization step, or 16-bit rounding."""
    aw = np.abs(w).astype(np.float64)
    storage = getattr(ops, "storage", None)
    if storage == "float16":
        return F16_ROUND * aw + F16_HALF_SUBNORMAL
    if storage == "bfloat16":
        return BF16_ROUND * aw
    if not hasattr(prepared, "scales"):
        return np.zeros_like(aw)
    scales = off(ops, prepared.scales)
    return HALF_STEP * steps(scales, *w.shape, getattr(prepared, "group", None) or 32)


def linear_bound(ops, prepared, w, x, b):
    """The documented bound on |error| per output [T, O]."""
    if getattr(ops, "gpu", False):
        return gpu_linear_bound(ops, prepared, w, x, b)
    I = w.shape[1]
    ax, aw = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64)
    group = getattr(prepared, "group", None) or 32
    step = steps(prepared.scales, *w.shape, group) if hasattr(prepared, "scales") else np.zeros_like(aw)
    bound = HALF_STEP * ax @ step.T  # weight rounding
    if getattr(ops, "quantize_activations", False):
        _, x_scales = quant.quantize_activations(x)
        x_step = steps(x_scales, *x.shape)
        bound += 0.5 * x_step @ (aw + 0.5 * step).T  # activation rounding
    magnitude = (ax + 0.5 * (x_step if getattr(ops, "quantize_activations", False) else 0)) @ (aw + step).T
    bound += (I + 4) * EPS32 * (magnitude + (0 if b is None else np.abs(b)))  # float32 rounding
    return bound + 1e-30


def gpu_linear_bound(ops, prepared, w, x, b):
    """cupy backends. Decode (T <= 4): the stored weight's error plus float32 sums. Prefill: each
    token's x and each weight tile are divided by a power of two s >= their max |value| and rounded
    to float16 (2^-11 relative, plus half a subnormal step: 2^-25 s <= 2^-24 max), the products are
    summed in float32, the sum is rounded to float16 and scaled back in float32."""
    I = w.shape[1]
    ax, aw = np.abs(x).astype(np.float64), np.abs(w).astype(np.float64)
    dw = storage_error(ops, prepared, w)  # [O, I]
    b_mag = 0 if b is None else np.abs(b)
    if x.shape[0] <= cuda_kernels.MAX_TOKENS:
        return ax @ dw.T + (I + 4) * EPS32 * (ax @ (aw + dw).T + b_mag) + 1e-30
    x_max = ax.max(axis=1, keepdims=True)  # [T, 1]
    w_max = (aw + dw).max()
    dw = dw + F16_ROUND * (aw + dw) + 2.0 ** -24 * w_max  # the stored weight, then its float16 tile
    dx = F16_ROUND * ax + 2.0 ** -24 * x_max
    err = dx @ (aw + dw).T + ax @ dw.T  # rounding of inputs
    magnitude = (ax + dx) @ (aw + dw).T
    err += (I + 4) * EPS32 * magnitude  # float32 sums
    exact = np.abs(x.astype(np.float64) @ w.T.astype(np.float64))
    err += F16_ROUND * (exact + err) + 2.0 ** -23 * x_max * w_max  # the float16 result
    err += 4 * EPS32 * (exact + err + b_mag)  # scaling back, adding the bias
    return err + 1e-30


@settings(max_examples=200, deadline=None)
@given(R=st.integers(1, 40), I=st.integers(1, 140), mag=st.sampled_from([1e-6, 1.0, 1e3]),
       layout=st.sampled_from(quant.LAYOUTS), special=st.sampled_from(["none", "zeros", "constant-rows"]),
       seed=st.integers(0, 2**31))
def test_quantization_error_is_half_a_step(R, I, mag, layout, special, seed):
    w = draw_matrix(np.random.default_rng(seed), (R, I), mag, special)
    q, scales = quant.quantize(w, layout)
    step = steps(scales, R, I)
    assert np.all(np.abs(quant.dequantize(q, scales) - w) <= step * HALF_STEP)
    assert np.all(quant.dequantize(q, scales)[w == 0] == 0)
    q2, s2 = quant.quantize(quant.dequantize(q, scales), layout)  # quantizing again changes nothing
    assert np.array_equal(q2, q) and np.allclose(s2, scales, rtol=4 * EPS32, atol=0)


@settings(max_examples=200, deadline=None)
@given(R=st.integers(1, 20), G=st.integers(1, 4), group=st.sampled_from([32, 128]),
       mag=st.sampled_from([1e-6, 1.0, 1e3, 1e30]), seed=st.integers(0, 2**31),
       special=st.sampled_from(["none", "zeros", "constant-rows", "positive", "negative", "symmetric"]))
def test_int4_quantization_error_is_half_a_step(R, G, group, mag, special, seed):
    I = G * group
    w = draw_matrix(np.random.default_rng(seed), (R, I), mag, special if "rows" in special or special == "zeros"
                    else "none")
    if special in ("positive", "negative"):  # a group without one sign: the zero point sits at an end
        w = np.abs(w) * (1 if special == "positive" else -1)
    elif special == "symmetric":  # ±m exactly: the grid cannot hold both ends and 0, the bound still holds
        w = np.sign(w) * np.float32(mag)
    packed, scales, zeros = quant.quantize_int4(w, group)
    got = quant.dequantize_int4(packed, scales, zeros, group)
    assert packed.shape == (R, I // 2) and scales.shape == zeros.shape == (R, G) and zeros.max() <= 15
    assert np.all(np.abs(got.astype(np.float64) - w) <= steps(scales, R, I, group) * HALF_STEP)
    assert np.all(got[w == 0] == 0)
    p2, s2, z2 = quant.quantize_int4(got, group)  # quantizing again changes nothing
    assert np.array_equal(p2, packed) and np.array_equal(z2, zeros)
    assert np.allclose(s2, scales, rtol=4 * EPS32, atol=0)


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g128"])
@settings(max_examples=40, deadline=None)
@given(T=st.sampled_from([1, 2, 5, 9]), O=st.integers(1, 40), G=st.integers(1, 3), bias=st.booleans(),
       special=st.sampled_from(["none", "zeros", "constant-rows"]), seed=st.integers(0, 2**31))
def test_int4_checkpoint_weights_run_on_every_backend(scheme, T, O, G, bias, special, seed):
    """A pre-quantized int4 weight: the Numba GEMV (T <= 4) and tiles (T > 4) and the reference's dequantization."""
    rng = np.random.default_rng(seed)
    I = G * quant.SCHEMES[scheme][1]
    w, x = draw_matrix(rng, (O, I), 0.2, special), draw_matrix(rng, (T, I), 1.0, special)
    b = (rng.standard_normal(O) * 0.2).astype(np.float32) if bias else None
    weight = quant.quantize_scheme(w, scheme)
    exact = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if b is None else b)
    for name in NAMES:
        ops = make(name)
        if scheme not in getattr(ops, "runs_schemes", quant.SCHEMES) or getattr(ops, "gpu", False):
            continue  # the cupy backends' handling of checkpoints: tests/test_cupy_host.py
        got = ops.linear(x, ops.prepare_linear("w", weight), b)
        assert got.shape == (T, O) and got.dtype == np.float32
        assert np.all(np.abs(got - exact) <= linear_bound(ops, weight, w, x, b)), name


def test_int4_refuses_misaligned_inputs():
    with pytest.raises(quant.RefqwenError, match=r"layer.w: input size 48 is not a multiple of the group size 32; "
                                                 r"schemes that fit it: int8-channel, int8-g32"):
        quant.quantize_int4(np.ones((2, 48), np.float32), 32, name="layer.w")


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(V=st.integers(1, 300), C=st.integers(1, 100), T=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_embedding_rows(name, V, C, T, seed):
    rng = np.random.default_rng(seed)
    ops = make(name)
    C = aligned(ops, C)
    table = (rng.standard_normal((V, C)) * 0.1).astype(np.float32)
    ids = rng.integers(0, V, T)
    prepared = ops.prepare_embedding(table)
    got = off(ops, ops.embed(ids, prepared))
    assert got.shape == (T, C) and np.all(np.abs(got - table[ids]) <= storage_error(ops, prepared, table)[ids])


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), past=st.integers(0, 300), KV=st.integers(1, 4), ratio=st.integers(1, 8),
       D=st.sampled_from([2, 8, 64]), window=st.sampled_from([None, 1, 7, 64]), mag=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2**31))
def test_attention_over_cache(name, T, past, KV, ratio, D, window, mag, seed):
    rng = np.random.default_rng(seed)
    ops = make(name)
    H = KV * ratio
    q = (rng.standard_normal((T, H, D)) * mag).astype(np.float32)
    k, v = ((rng.standard_normal((past + T, KV, D)) * mag).astype(np.float32) for _ in range(2))
    results = []
    for backend in (ops, REFERENCE):
        cache = backend.new_cache(1, KV, D).layers[0]
        if past:
            cache.append(on(backend, k[:past]), on(backend, v[:past]))
        keys, values = cache.append(on(backend, k[past:]), on(backend, v[past:]))
        z = backend.attention(on(backend, q), keys, values, past, window)
        results.append(off(backend, z))
    # Each side rounds a score q.k/sqrt(D) by at most (D + 2) eps sum_d |q_d k_d| / sqrt(D) (a float32 dot
    # product, then the scale); softmax weights move by at most twice the score error (relative), so the
    # output by 2 * 2 * score_error * max|v|; the float32 softmax and weighted sums add a few ulps of max|v|.
    # A backend that runs the reference's attention must match it exactly.
    qk = np.einsum("thd,shd->hts", np.abs(q), np.abs(np.repeat(k, ratio, axis=1)))  # [H, T, S]
    score_error = (D + 2) * EPS32 * qk.max() / np.sqrt(D)
    atol = 0 if reuses_reference(ops, "attention") else (64 * EPS32 + 4 * score_error) * np.abs(v).max()
    np.testing.assert_allclose(results[0], results[1], rtol=0, atol=atol)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 33), C=st.integers(1, 200), mag=st.sampled_from([1e-3, 1.0, 800.0]),
       special=st.sampled_from(["none", "zeros", "constant-rows"]), seed=st.integers(0, 2**31))
def test_elementwise_ops(name, T, C, mag, special, seed):
    rng = np.random.default_rng(seed)
    ops = make(name)
    x = draw_matrix(rng, (T, C), mag, special)
    w = (1 + 0.2 * rng.standard_normal(C)).astype(np.float32)
    tol = 8 * EPS32  # a few roundings apart: exp, division, products
    # RMSNorm's mean square, summed in another order (a GPU's tree reduction), is within C eps (relative) of
    # NumPy's; 1/sqrt halves that; the roundings of sqrt, division and two products add a few eps.
    # A backend that runs the reference's RMSNorm must match it exactly.
    norm = off(ops, ops.rms_norm(on(ops, x), ops.prepare_float("w", w), 1e-6))
    if reuses_reference(ops, "rms_norm"):
        assert np.array_equal(norm, REFERENCE.rms_norm(x, w, 1e-6))
    else:
        np.testing.assert_allclose(norm, REFERENCE.rms_norm(x, w, 1e-6), rtol=(C + 8) * EPS32, atol=tol)
    swiglu = off(ops, ops.swiglu(on(ops, x), on(ops, w * x)))
    np.testing.assert_allclose(swiglu, REFERENCE.swiglu(x, w * x), rtol=tol, atol=1e-30)
    if C % 2 == 0:
        cos, sin = np.cos(x[:, :]), np.sin(x[:, :])
        heads = x[:, None, :].repeat(3, axis=1)
        np.testing.assert_allclose(off(ops, ops.apply_rotary(on(ops, heads), cos, sin)),
                                   REFERENCE.apply_rotary(heads, cos, sin), rtol=tol, atol=tol * mag)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 30), E=st.integers(1, 8), k=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_moe_dispatch_runs_each_chosen_expert_once(name, T, E, k, seed):
    rng = np.random.default_rng(seed)
    ops = make(name)
    k = min(k, E)
    x = rng.standard_normal((T, 16)).astype(np.float32)
    chosen = np.stack([rng.permutation(E)[:k] for _ in range(T)])  # [T, k], distinct per token
    weights = rng.random((T, k)).astype(np.float32)
    calls = []

    def expert(e):
        def run(rows):
            calls.append((e, len(rows)))
            return rows * (e + 1)
        return run

    got = off(ops, ops.moe_dispatch(on(ops, x), [expert(e) for e in range(E)], on(ops, chosen), on(ops, weights)))
    expected = sum(weights[:, j, None] * x * (chosen[:, j, None] + 1) for j in range(k))
    np.testing.assert_allclose(got, expected, rtol=8 * EPS32, atol=8 * EPS32 * np.abs(expected).max())
    assert sorted(e for e, _ in calls) == sorted(set(chosen.ravel()))  # only chosen experts, once each
    assert sum(n for _, n in calls) == T * k  # each on exactly the tokens that chose it


def test_numba_int4_keeps_a_misaligned_matrix_int8():
    ops = backends.get("numba-int4")
    assert ops.prepare_linear("w", np.ones((2, 48), np.float32)).scheme == "int8-g32"
    assert ops.prepare_linear("w", np.ones((2, 64), np.float32)).scheme == "int4-g32"
