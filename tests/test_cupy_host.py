"""The cupy backends without a GPU: their kernels compile, their array logic runs in host mode
(NumPy and the kernels' NumPy twins standing in), and what is particular to them is checked here:
float16 that would overflow, bfloat16 rounding, the fit check, pre-quantized checkpoints.
The operation-by-operation property suite covers them too (tests/test_backends.py, "host mode")."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import random_weights, tiny_config
from test_backends import gpu_linear_bound

from refqwen import quant
from refqwen.backends import cuda_kernels, cupy_gpu
from refqwen.backends.cupy_gpu import CupyBackend, CupyBF16Backend, CupyF16Backend, CupyInt8ChannelBackend
from refqwen.errors import RefqwenError, WeightsError
from refqwen.model import Model
from refqwen.model.attention import attention_pattern
from refqwen.published import published_config
from refqwen.trace import trace

F16_MAX = 65504.0


def test_every_kernel_compiles_for_hopper_without_spills():
    """NVRTC needs no GPU: compile the source to sm_90 machine code and read ptxas' report."""
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy is a test dependency; install .[test]")
    assert set(re.findall(r"\.entry (\w+)", cuda_kernels.compile_ptx())) == set(cuda_kernels.KERNEL_NAMES)
    program = nvrtc.createProgram(cuda_kernels.CUDA_SOURCE, "kernels.cu", [], [])
    nvrtc.compileProgram(program, ["-arch=sm_90", "-Xptxas=-v", *cuda_kernels.NVRTC_OPTIONS])
    log = nvrtc.getProgramLog(program)
    for name in cuda_kernels.KERNEL_NAMES:  # a kernel spilling registers to local memory would be slow
        report = log[log.index(f"Function properties for {name}"):]
        assert re.match(r"Function properties for \w+\s+ptxas\s+\.\s+0 bytes stack frame, 0 bytes spill stores, "
                        r"0 bytes spill loads", report), report[:300]
    assert len(nvrtc.getCUBIN(program)) > 0


def test_a_syntax_error_in_a_kernel_is_reported(monkeypatch):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="cupy is a test dependency; install .[test]")
    broken = cuda_kernels.CUDA_SOURCE.replace("acc[t] += sum * s;", "acc[t] +=")
    monkeypatch.setattr(cuda_kernels, "CUDA_SOURCE", broken)
    with pytest.raises(RuntimeError, match="NVRTC could not compile the kernels"):
        cuda_kernels.compile_ptx()


@settings(max_examples=200, deadline=None)
@given(bits=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=50))
def test_bfloat16_rounding_is_torchs(bits):
    w = np.array(bits, np.uint32).view(np.float32)
    w = w[np.isfinite(w) & (np.abs(w) < 3.3e38)]  # NaN payloads and values that round past the largest bfloat16
    ours = cupy_gpu.f32_to_bf16(w)
    theirs = torch.from_numpy(w.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)
    assert np.array_equal(cupy_gpu.bf16_to_f32(ours), torch.from_numpy(w.copy()).to(torch.bfloat16).float().numpy())


@settings(max_examples=100, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 40), mag=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 3e4, 1e7, 1e30]),
       seed=st.integers(0, 2**31))
def test_scaled_f16_never_overflows_and_divides_exactly(rows, cols, mag, seed):
    a = (np.random.default_rng(seed).standard_normal((rows, cols)) * mag).astype(np.float32)
    for per_row in (True, False):
        a16, s = cupy_gpu.scaled_f16(a, per_row)
        assert a16.dtype == np.float16 and np.all(np.isfinite(a16)) and np.all(np.abs(a16) <= 1)
        assert np.all(np.log2(s) == np.round(np.log2(s)))  # powers of two: the division is exact
        np.testing.assert_allclose(a16.astype(np.float32) * s, a, rtol=2.0 ** -11, atol=float(np.max(s)) * 2.0**-24)


@pytest.mark.parametrize("cls", [CupyBackend, CupyF16Backend, CupyBF16Backend])
def test_prefill_activations_past_float16_range(cls):
    """Qwen2's activations reach thousands; here they reach 1e6, far past float16's 65504."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((9, 96)) * 3e5).astype(np.float32)
    x[0, 0] = 1e6
    w = (rng.standard_normal((40, 96)) * 0.2).astype(np.float32)
    ops = cls(host=True)
    with np.errstate(over="ignore"):
        assert np.abs(x).max() > F16_MAX and not np.all(np.isfinite(x.astype(np.float16)))  # naive float16 overflows
    prepared = ops.prepare_linear("w", w)
    got = ops.linear(x, prepared)
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    assert np.all(np.isfinite(got)) and np.abs(exact).max() > F16_MAX
    assert np.all(np.abs(got - exact) <= gpu_linear_bound(ops, prepared, w, x, None))


def test_a_model_whose_activations_pass_float16_range():
    """A tiny model scaled so that the MLP's activations (the down projection's input) and the residual
    stream pass 65504, as Qwen2's do in float16: the float16-prefill backends' logits stay finite and
    agree with the float32 reference."""
    cfg = tiny_config("dense-untied")
    w = random_weights(cfg)
    for i in range(cfg.num_hidden_layers):  # weights stay well within float16's range; activations do not
        w[f"model.layers.{i}.mlp.gate_proj.weight"] *= 200
        w[f"model.layers.{i}.mlp.up_proj.weight"] *= 200
    ids = np.arange(1, 21)
    reference = Model(cfg, w)
    points = trace(reference, ids, ["layers.*.mlp.act", "layers.*.resid_post"]).arrays
    assert max(np.abs(a).max() for name, a in points.items() if name.endswith("act")) > F16_MAX
    assert max(np.abs(a).max() for name, a in points.items() if name.endswith("resid_post")) > F16_MAX
    expected = reference.forward(ids)
    for cls in (CupyF16Backend, CupyBackend):
        got = Model(cfg, w, backend=cls(host=True)).forward(ids)
        assert np.all(np.isfinite(got))
        # float16 and int8 weights on a 4-layer random model: measured max error 0.04 (float16) and 0.6
        # (int8) on logits of magnitude ~6; an overflow gives inf or NaN, a lost scale errors of order 1e4
        assert np.abs(got - expected).max() < 1.0, cls.name


def test_fit_check_says_what_would_fit():
    cfg = published_config("72b")
    ops = CupyF16Backend(host=True, free_bytes=139 * 2**30)  # an H200
    with pytest.raises(RefqwenError) as error:
        ops.check_fits(cfg, "Qwen2-72B-Instruct")
    message = str(error.value)
    assert "Qwen2-72B-Instruct: does not fit on the GPU with backend cupy-f16: it needs 139.9 GiB" in message
    assert "72.71 B parameters as float16" in message and "139.0 GiB is free" in message
    assert re.search(r"What would fit: cupy \(int8-g32\): 80\.\d GiB; cupy-int8-channel \(int8-channel\): 72\.\d GiB\.",
                     message)
    CupyBackend(host=True, free_bytes=139 * 2**30).check_fits(cfg, "Qwen2-72B-Instruct")  # int8 fits
    CupyF16Backend(host=True, free_bytes=139 * 2**30).check_fits(published_config("57b-a14b"), "57B")
    with pytest.raises(RefqwenError, match="No cupy backend fits it on this GPU"):
        CupyBackend(host=True, free_bytes=24 * 2**30).check_fits(cfg, "Qwen2-72B")


def test_fit_check_runs_before_loading(tmp_path, wide_source, monkeypatch):
    """refqwen.load asks the backend before reading any weight."""
    import refqwen
    from refqwen import backends

    monkeypatch.setattr(backends, "get", lambda name: CupyF16Backend(host=True, free_bytes=2**20))
    read = []
    monkeypatch.setattr(refqwen.model.model.Model, "__init__", lambda *a, **k: read.append(a))
    with pytest.raises(RefqwenError, match=r"wide.*: does not fit on the GPU with backend cupy-f16"):
        refqwen.load(wide_source, backend="cupy-f16", progress=False)
    assert not read


def test_prequantized_weights():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((24, 64)) * 0.2).astype(np.float32)
    g32, channel, int4 = (quant.quantize_scheme(w, s) for s in ("int8-g32", "int8-channel", "int4-g32"))
    prepared = CupyBackend(host=True).prepare_linear("w", g32)  # runs as written: the same bytes
    assert np.array_equal(prepared.data, g32.q) and np.array_equal(prepared.scales, g32.scales)
    prepared = CupyInt8ChannelBackend(host=True).prepare_linear("w", channel)
    assert np.array_equal(prepared.data, channel.q) and np.array_equal(prepared.scales, channel.scales)
    with pytest.raises(WeightsError, match=r"layers.0.w is int4-g32; backend cupy runs int8-g32"):
        CupyBackend(host=True).prepare_linear("layers.0.w", int4)
    with pytest.raises(WeightsError, match=r"is int8-channel; backend cupy runs int8-g32 \(use cupy-int8-channel"):
        CupyBackend(host=True).prepare_linear("w", channel)
    prepared = CupyF16Backend(host=True).prepare_linear("w", int4)  # dequantized, then float16
    assert np.array_equal(prepared.data, int4.rows().astype(np.float16))


def test_float16_weights_out_of_range_are_refused():
    with pytest.raises(WeightsError, match="big.w: a weight exceeds float16's range"):
        CupyF16Backend(host=True).prepare_linear("big.w", np.full((2, 8), 1e5, np.float32))


def test_device_cache_keeps_the_sequence():
    """Appends across the capacity doublings return every key so far, in order, as the reference's."""
    rng = np.random.default_rng(0)
    cache = CupyBackend(host=True).new_cache(2, 3, 8).layers[1]
    keys = []
    for T in (5, 300, 1, 400):
        k = rng.standard_normal((T, 3, 8)).astype(np.float32)
        keys.append(k)
        got_k, got_v = cache.append(k, -k)  # the whole buffers, [KV, capacity, D]
        got_k, got_v = got_k[:, :cache.length], got_v[:, :cache.length]
        expected = np.concatenate(keys).transpose(1, 0, 2)  # [KV, S, D]
        assert np.array_equal(got_k, expected) and np.array_equal(got_v, -expected)
    assert cache.length == 706 and np.array_equal(cache.keys[:706], np.concatenate(keys))


def test_gpu_bench_measures_in_host_mode():
    sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
    import gpu_bench

    row = gpu_bench.measure(tiny_config("moe-step1"), CupyBackend(host=True), prompt_tokens=20, decode_tokens=4)
    assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and row["decode_gb_s"] > 0
    model = gpu_bench.build(tiny_config("moe-step1"), CupyBackend(host=True))
    cfg = model.config  # every layer sparse: attention, shared expert, top_k of num_experts experts; lm_head
    C, D, H, KV = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    S, E, k = cfg.shared_expert_intermediate_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    matrices = [(H * D, C), (KV * D, C), (KV * D, C), (C, H * D), (S, C), (S, C), (C, S)]  # [out, in]
    expert = [(E, C), (E, C), (C, E)]

    def nbytes(out, inputs):  # int8 weights and a float32 scale per row and group of 32 inputs
        return out * inputs + out * -(-inputs // 32) * 4

    per_layer = sum(nbytes(*m) for m in matrices) + k / cfg.num_experts * sum(nbytes(*m) for m in expert) * \
        cfg.num_experts
    expected = cfg.num_hidden_layers * per_layer + nbytes(cfg.vocab_size, C)
    assert gpu_bench.weight_bytes_per_token(model) == pytest.approx(expected)


@pytest.mark.skipif(cuda_kernels.device_unavailable_reason() is None, reason="this machine has a CUDA GPU")
def test_without_a_gpu_the_backend_says_why():
    from refqwen import backends

    assert all(backends.available()[name] for name in cupy_gpu.VARIANTS)
    with pytest.raises(RefqwenError, match=r"backend 'cupy' cannot run here: (no usable CUDA device|cupy is not inst)"):
        backends.get("cupy")


WIDE_HEADS = dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, architectures=["Qwen2ForCausalLM"])  # D = 32


@pytest.mark.parametrize("extra", [{}, dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
                                   dict(max_position_embeddings=128, rope_parameters=dict(
                                       rope_type="yarn", factor=4.0, rope_theta=10000.0,
                                       original_max_position_embeddings=32))])
def test_decode_graph_steps_are_the_eager_steps(extra, monkeypatch):
    """A DecodeGraph's step reads token and position on the device; in host mode it runs eagerly, so
    its logits must equal the eager decode's exactly, across graph rebuilds (room for 4 more positions
    at a time here) and a prefill in between."""
    from refqwen import Config

    monkeypatch.setattr(cupy_gpu, "GRAPH_POSITIONS", 4)
    cfg = Config.from_hf_dict(dict(WIDE_HEADS, **extra))
    w = random_weights(cfg)
    eager = Model(cfg, w, backend=CupyBackend(host=True))
    graphed = Model(cfg, w, backend=CupyBackend(host=True, graphs=True))
    ids = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 10))
    eager_cache, graph_cache = eager.new_cache(), graphed.new_cache()
    eager.logits(ids, eager_cache), graphed.logits(ids, graph_cache)
    capacities = set()
    for step in range(40):
        token = (7 * step) % cfg.vocab_size
        got = graphed.ops.decode(graphed, token, graph_cache)
        assert np.array_equal(got, eager.ops.decode(eager, token, eager_cache))
        capacities.add(graph_cache.graph.capacity)
        if step == 20:  # more prefill, outside the graph: the next step picks up the new position
            more = [1, 2, 3, 4, 5]
            assert np.array_equal(graphed.logits(more, graph_cache), eager.logits(more, eager_cache))
    assert graph_cache.length == eager_cache.length == 55 and len(capacities) >= 3  # rebuilt as the cache grew


def test_decode_graph_is_not_used_for_moe():
    """MoE routing brings its choices to the host, which a captured graph cannot do: decode stays eager."""
    from refqwen import Config

    cfg = Config.from_hf_dict(dict(WIDE_HEADS, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                   shared_expert_intermediate_size=48, architectures=["Qwen2MoeForCausalLM"]))
    model = Model(cfg, random_weights(cfg), backend=CupyBackend(host=True, graphs=True))
    eager = Model(cfg, random_weights(cfg), backend=CupyBackend(host=True))
    cache, eager_cache = model.new_cache(), eager.new_cache()
    model.logits([1, 2, 3], cache), eager.logits([1, 2, 3], eager_cache)
    assert np.array_equal(model.ops.decode(model, 4, cache), eager.ops.decode(eager, 4, eager_cache))
    assert cache.graph is None


def test_attention_pattern_traced_on_a_device_cache():
    """The opt-in pattern trace reads the cache in the reference layout, whatever layout the backend keeps:
    exactly the pattern of the run's own rotated queries and keys."""
    cfg = tiny_config("dense-untied")
    model = Model(cfg, random_weights(cfg), backend=CupyBackend(host=True))
    t = trace(model, [1, 5, 7, 9, 3], names=["layers.*.attn.pattern", "layers.*.attn.q_rot", "layers.*.attn.k_rot"])
    for i in range(cfg.num_hidden_layers):
        q, k = t[f"layers.{i}.attn.q_rot"], t[f"layers.{i}.attn.k_rot"]
        np.testing.assert_array_equal(t[f"layers.{i}.attn.pattern"], attention_pattern(q, k, 0, cfg.window(i)))


def test_device_cache_reserve_keeps_what_it_holds():
    """DeviceKVCache.reserve (what generate asks of any cache): room for n positions in every layer, the
    positions already there kept, appends up to n in the same buffers."""
    ops = CupyBackend(host=True)
    cache = ops.new_cache(2, 2, 4)
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((3, 2, 4)).astype(np.float32) for _ in range(2))
    for layer in cache.layers:
        layer.append(k, v)
    cache.reserve(1000)
    buffers = [layer.k for layer in cache.layers]
    for layer in cache.layers:
        assert layer.k.shape[1] >= 1000 and layer.length == 3
        np.testing.assert_array_equal(layer.keys[:3], k)
        layer.append(k, v)
    assert all(layer.k is b for layer, b in zip(cache.layers, buffers))
