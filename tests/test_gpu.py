"""The cupy backends on a real GPU: each CUDA kernel against its NumPy twin, and whole models on the
device against the float32 reference. Skipped, with the reason, where no CUDA device is usable (CI
has none); tools/gpu_check.sh runs this file, with tests/test_backends.py's property suite, which
then includes the cupy backends' real kernels."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import random_weights, tiny_config

from refqwen import backends
from refqwen.backends import cuda_kernels, cupy_gpu
from refqwen.generate import Sampling, next_token
from refqwen.model import Model
from refqwen.published import published_config

REASON = cuda_kernels.device_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"needs a CUDA GPU: {REASON}")
EPS32 = 2.0 ** -23


@pytest.fixture(scope="module")
def kernels():
    return cuda_kernels.DeviceKernels(), cuda_kernels.HostKernels()


@pytest.mark.parametrize("name", list(cupy_gpu.VARIANTS))
@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, cuda_kernels.MAX_TOKENS), O=st.integers(1, 300),
       I=st.sampled_from([1, 7, 32, 37, 64, 100, 896, 4864]), seed=st.integers(0, 2**31))
def test_gemv_matches_its_twin(kernels, name, T, O, I, seed):
    """Both sum the same float32 products in another order: (I + 4) eps of sum |w x| apart at most."""
    import cupy as cp

    device, host = kernels
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((O, I)) * 0.2).astype(np.float32)
    x = rng.standard_normal((T, I)).astype(np.float32)
    on_device = cupy_gpu.VARIANTS[name]().prepare_linear("w", w)
    on_host = cupy_gpu.DeviceWeight(*(a.get() if isinstance(a, cp.ndarray) else a for a in
                                      (on_device.data, on_device.scales)), on_device.storage, None)
    b = (rng.standard_normal(O) * 0.2).astype(np.float32) if seed % 2 else None  # the bias is added in the kernel
    got = device.gemv(on_device, cp.asarray(x), None if b is None else cp.asarray(b)).get()
    expected = host.gemv(on_host, x, b)
    bound = (I + 4) * EPS32 * (np.abs(x) @ np.abs(on_host.rows()).T + (0 if b is None else np.abs(b)))
    assert np.all(np.abs(got - expected) <= bound + 1e-30)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), heads=st.integers(1, 8), D=st.sampled_from([2, 64, 128]), seed=st.integers(0, 2**31))
def test_rotary_matches_its_twin_exactly(kernels, T, heads, D, seed):
    import cupy as cp

    device, host = kernels
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, heads, D)).astype(np.float32)
    angles = rng.uniform(-100, 100, (T, D)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    got = device.rotary(cp.asarray(x), cp.asarray(cos), cp.asarray(sin)).get()
    assert np.array_equal(got, host.rotary(x, cos, sin))  # the same roundings, no fused multiply-add


@settings(max_examples=60, deadline=None)
@given(S=st.integers(1, 3000), KV=st.integers(1, 4), ratio=st.integers(1, 7), D=st.sampled_from([32, 64, 128, 256]),
       window=st.sampled_from([None, 1, 7, 1000]), mag=st.sampled_from([0.1, 3.0]), seed=st.integers(0, 2**31))
def test_decode_attention_matches_its_twin(kernels, S, KV, ratio, D, window, mag, seed):
    """The same bound as tests/test_backends.py's attention test: score rounding and a few ulps of max |v|."""
    import cupy as cp

    device, host = kernels
    rng = np.random.default_rng(seed)
    H, capacity = KV * ratio, S + int(rng.integers(0, 50))
    q = (rng.standard_normal((H, D)) * mag).astype(np.float32)
    keys, values = ((rng.standard_normal((KV, capacity, D)) * mag).astype(np.float32) for _ in range(2))
    got = device.decode_attention(cp.asarray(q), cp.asarray(keys), cp.asarray(values), S, window).get()
    expected = host.decode_attention(q, keys, values, S, window)
    position = cp.asarray([S - 1], cp.int32)  # the same, with the position read from the device
    at = device.decode_attention(cp.asarray(q), cp.asarray(keys), cp.asarray(values), 0, window, position).get()
    assert np.array_equal(at, got)
    qk = np.abs(q).reshape(KV, ratio, D) @ np.abs(keys[:, :S]).transpose(0, 2, 1)  # [KV, G, S]
    score_error = (D + 2) * EPS32 * qk.max() / np.sqrt(D)
    atol = (64 * EPS32 + 4 * score_error) * np.abs(values[:, :S]).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), C=st.integers(1, 5000), mag=st.sampled_from([1e-3, 1.0, 800.0]),
       seed=st.integers(0, 2**31))
def test_rms_norm_and_silu_match_their_twins(kernels, T, C, mag, seed):
    import cupy as cp

    device, host = kernels
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((T, C)) * mag).astype(np.float32)
    w = (1 + 0.2 * rng.standard_normal(C)).astype(np.float32)
    # the mean square summed in another order: C eps relative at most, half of it in 1/sqrt, plus roundings
    np.testing.assert_allclose(device.rms_norm(cp.asarray(x), cp.asarray(w), 1e-6).get(), host.rms_norm(x, w, 1e-6),
                               rtol=(C + 8) * EPS32, atol=1e-30)
    # CUDA's expf is within 2 ulps; the division and product add one each
    np.testing.assert_allclose(device.silu_mul(cp.asarray(x), cp.asarray(w * x)).get(), host.silu_mul(x, w * x),
                               rtol=8 * EPS32, atol=1e-30)


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 64), O=st.integers(1, 300), I=st.integers(1, 2000), seed=st.integers(0, 2**31))
def test_float16_matmul_accumulates_in_float32(kernels, T, O, I, seed):
    """cuBLAS and the twin sum the same exact products of float16 values in float32, then round to
    float16: one float16 rounding (2^-11 relative) apart, plus the float32 sums' (I + 4) eps."""
    import cupy as cp

    device, host = kernels
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, (T, I)).astype(np.float16)
    b = rng.uniform(-1, 1, (O, I)).astype(np.float16)
    got = device.matmul_f16(cp.asarray(a), cp.asarray(b)).get().astype(np.float64)
    expected = host.matmul_f16(a, b).astype(np.float64)
    magnitude = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)).T
    assert np.all(np.abs(got - expected) <= 2.0 ** -10 * np.abs(expected) + 2 * (I + 4) * EPS32 * magnitude + 2.0**-24)


@pytest.mark.parametrize("kind", ["dense-untied", "dense-yarn", "dense-sliding", "moe-step1-norm"])
@pytest.mark.parametrize("name", list(cupy_gpu.VARIANTS))
def test_tiny_models_on_the_device(kind, name):
    """Prefill, decode through the device cache, and the reference's logits; the same bound as host mode."""
    cfg = tiny_config(kind)
    w = random_weights(cfg)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 24)
    expected = Model(cfg, w).forward(ids)
    model = Model(cfg, w, backend=backends.get(name))
    host = Model(cfg, w, backend=cupy_gpu.VARIANTS[name](host=True))
    cache, host_cache = model.new_cache(), host.new_cache()
    got = np.concatenate([model.forward(ids[:20], cache)] + [model.forward([i], cache) for i in ids[20:]])
    in_host_mode = np.concatenate([host.forward(ids[:20], host_cache)] + [host.forward([i], host_cache)
                                                                         for i in ids[20:]])
    assert np.all(np.isfinite(got))
    assert np.abs(got - expected).max() < 1.0  # as in test_cupy_host: int8 on random tiny models errs ~0.6
    # the same operations as host mode, in another summation order (and float16 roundings that may tip)
    assert np.abs(got - in_host_mode).max() < 0.05


def test_sampling_on_the_device_chooses_what_the_host_would():
    import cupy as cp

    rng = np.random.default_rng(0)
    for seed in range(20):
        logits = (rng.standard_normal(151936) * 3).astype(np.float32)
        history = list(rng.integers(0, 151936, 50))
        for sampling in (Sampling(), Sampling(repetition_penalty=1.3), Sampling(temperature=0.7, top_k=40),
                         Sampling(temperature=1.0, top_p=0.9, min_p=0.05)):
            on_host = next_token(logits, history, sampling, np.random.default_rng(seed))
            on_device = next_token(cp.asarray(logits), history, sampling, np.random.default_rng(seed))
            if sampling.temperature == 0:
                assert on_device == on_host
            else:  # the same draw; only a cumulative sum rounded differently at a boundary could differ
                from refqwen.generate import penalize_repetition, sampling_probs

                probs = sampling_probs(penalize_repetition(logits, history, sampling.repetition_penalty), sampling)
                assert probs[on_device] > 0


def test_a_model_too_big_for_the_gpu_is_refused_before_loading():
    from refqwen.errors import RefqwenError

    free = cupy_gpu.CupyF16Backend()._free_bytes()
    config = published_config("72b")
    if cupy_gpu.bytes_needed(config, "float16") <= free:
        pytest.skip(f"this GPU has {free / 2**30:.0f} GiB free: the 72B model fits even in float16")
    with pytest.raises(RefqwenError, match="does not fit on the GPU with backend cupy-f16.*What would fit"):
        backends.get("cupy-f16").check_fits(config, "Qwen2-72B")


@pytest.mark.parametrize("name", list(cupy_gpu.VARIANTS))
def test_decode_graph_replays_the_eager_steps_exactly(name):
    """Captured and replayed, a decode step runs the same kernels as the eager step: the same bits."""
    from refqwen import Config

    cfg = Config.from_hf_dict(dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   architectures=["Qwen2ForCausalLM"]))  # head size 32
    w = random_weights(cfg)
    eager = Model(cfg, w, backend=cupy_gpu.VARIANTS[name](graphs=False))
    graphed = Model(cfg, w, backend=cupy_gpu.VARIANTS[name](graphs=True))
    eager_cache, graph_cache = eager.new_cache(), graphed.new_cache()
    eager.logits(list(range(10)), eager_cache), graphed.logits(list(range(10)), graph_cache)
    for step in range(30):
        got = graphed.ops.decode(graphed, step, graph_cache).get()
        assert graph_cache.graph is not None and graph_cache.graph.graph is not None  # captured, not eager
        assert np.array_equal(got, eager.ops.decode(eager, step, eager_cache).get()), step
