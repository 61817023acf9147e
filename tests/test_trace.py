"""Trace points: capturing changes nothing, captures only what was asked, hooks flow through, files round-trip."""

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from oracle import random_weights, tiny_config

import refqwen
from refqwen import RefqwenError, Trace, trace
from refqwen.trace import point_names

KINDS = ["dense-untied", "dense-sliding", "moe-step2-mlp-only"]


@pytest.fixture(scope="module")
def models():
    return {kind: refqwen.Model(tiny_config(kind), random_weights(tiny_config(kind))) for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_tracing_does_not_change_the_logits(kind, models, rng):
    model = models[kind]
    ids = rng.integers(0, 128, 40)
    plain = model.forward(ids)
    traced = trace(model, ids, names=["*", "layers.*.attn.pattern"])
    assert np.array_equal(model.forward(ids), plain)
    assert np.array_equal(traced["logits"], plain)  # bit-identical, not merely close
    # decoding through a cache, one token at a time, traced and not
    traced_cache, plain_cache = model.new_cache(), model.new_cache()
    for t in range(len(ids)):
        step = trace(model, ids[t:t + 1], names=["logits", "*.pattern"], cache=traced_cache)
        assert np.array_equal(step["logits"], model.forward(ids[t:t + 1], plain_cache))
        assert step["layers.0.attn.pattern"].shape == (model.config.num_attention_heads, 1, t + 1)
        assert step.meta["start"] == t
    assert model.trace_points.tracer is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_documented_point_is_emitted_in_forward_order(kind, models):
    model = models[kind]
    traced = trace(model, np.arange(6), names=["*", "*.pattern"])
    assert list(traced) == point_names(model.config)
    cfg = model.config
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    assert traced["layers.1.attn.q"].shape == (6, H, D) and traced["layers.1.attn.k_rot"].shape == (6, KV, D)
    assert traced["layers.1.attn.pattern"].shape == (H, 6, 6)
    assert traced["logits"].shape == (6, cfg.vocab_size)
    assert traced.meta == {"model": "", "backend": "numpy", "ids": list(range(6)), "start": 0}


def test_pattern_is_opt_in_and_is_what_attention_applies(models, rng):
    model = models["dense-sliding"]  # layers 2 and 3 see a window of 8 keys
    ids = rng.integers(0, 128, 30)
    assert not any(name.endswith("pattern") for name in trace(model, ids, names=["*", "layers.3.*"]))
    t = trace(model, ids, names=["layers.*.attn.pattern", "layers.*.attn.v", "layers.*.attn.z"])
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    for i in (0, 3):
        pattern = t[f"layers.{i}.attn.pattern"]  # [H, T, S]
        np.testing.assert_allclose(pattern.sum(-1), 1, atol=1e-6)
        v = np.repeat(t[f"layers.{i}.attn.v"], G, axis=1)  # [S, H, D]
        z = np.einsum("hts,shd->thd", pattern, v)
        np.testing.assert_allclose(z, t[f"layers.{i}.attn.z"], atol=1e-5)
    assert np.all(t["layers.3.attn.pattern"][:, 20, :13] == 0)  # outside the window of 8


def test_a_hook_replacement_flows_into_the_rest_of_the_pass(models, rng):
    model = models["dense-untied"]
    a, b = rng.integers(0, 128, 12), rng.integers(0, 128, 12)
    run_a = trace(model, a, names=["layers.3.resid_post", "logits"])
    # activation patching: the last layer's output from run a decides run b's logits
    patched = trace(model, b, names=["logits"], hooks={"layers.3.resid_post": lambda n, v: run_a[n]})
    np.testing.assert_array_equal(patched["logits"], run_a["logits"])

    def zero_head_1(name, z):  # z [T, H, D]
        z = z.copy()
        z[:, 1] = 0
        return z

    seen = []
    zeroed = trace(model, b, names=["layers.*.attn.z", "logits"],
                   hooks={"layers.2.attn.z": zero_head_1, "layers.*.attn.z": lambda n, v: seen.append(n)})
    assert np.all(zeroed["layers.2.attn.z"][:, 1] == 0) and np.any(zeroed["layers.1.attn.z"][:, 1] != 0)
    assert not np.allclose(zeroed["logits"], model.forward(b))
    assert seen == [f"layers.{i}.attn.z" for i in range(4)]  # observers return None: nothing replaced


def test_bad_hooks_and_names_are_reported(models):
    model = models["dense-untied"]
    with pytest.raises(RefqwenError, match="names: 'layers.9.attn.q' matches no trace point"):
        trace(model, [1, 2], names=["layers.9.attn.q"])
    with pytest.raises(RefqwenError, match="hooks: 'layers.0.mlp.nope'"):
        trace(model, [1, 2], hooks={"layers.0.mlp.nope": lambda n, v: v})
    with pytest.raises(RefqwenError, match=r"hook for layers.0.attn.q returned shape \[2, 4\], expected \[2, 4, 16\]"):
        trace(model, [1, 2], hooks={"layers.0.attn.q": lambda n, v: v[..., 0]})
    with pytest.raises(RefqwenError, match=r"hooks\['embed'\]: expected a function"):
        trace(model, [1, 2], hooks={"embed": np.zeros(3)})
    with pytest.raises(RefqwenError, match="read-only"):
        trace(model, [1, 2], hooks={"layers.0.attn.pattern": lambda n, v: v * 2})
    assert model.trace_points.tracer is None  # a failed trace leaves the model untraced


def test_works_with_every_backend(rng):
    from refqwen import backends

    cfg = tiny_config("moe-step1-norm")
    ids = rng.integers(0, 128, 10)
    for name, why in backends.available().items():
        if why is None:
            model = refqwen.Model(cfg, random_weights(cfg), backend=backends.get(name))
            traced = trace(model, ids)
            assert list(traced) == [n for n in point_names(cfg) if "pattern" not in n]
            assert traced.meta["backend"] == name
            np.testing.assert_array_equal(traced["logits"], model.forward(ids))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load(suffix, models, tmp_path):
    traced = trace(models["moe-step2-mlp-only"], [5, 6, 7], names=["embed", "layers.1.moe.*", "logits"])
    path = tmp_path / f"run{suffix}"
    traced.save(path)
    loaded = refqwen.load_trace(path)
    assert list(loaded) == list(traced) and loaded.meta == traced.meta
    for name in traced:
        assert loaded[name].dtype == traced[name].dtype
        np.testing.assert_array_equal(loaded[name], traced[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind


def test_a_failed_save_leaves_the_old_file(models, tmp_path, monkeypatch):
    import sys

    trace_module = sys.modules["refqwen.trace"]  # the module; refqwen.trace is the function

    path = tmp_path / "run.npz"
    Trace({"embed": np.ones(3, np.float32)}).save(path)

    def broken(tmp, t):
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(trace_module, "_write_npz", broken)
    with pytest.raises(OSError):
        Trace({"embed": np.zeros(3, np.float32)}).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]
    np.testing.assert_array_equal(refqwen.load_trace(path)["embed"], np.ones(3))
    with pytest.raises(RefqwenError, match="run.txt: a trace is saved as .npz or .safetensors"):
        Trace({}).save(tmp_path / "run.txt")
    with pytest.raises(RefqwenError, match="missing.npz: no such trace file"):
        refqwen.load_trace(tmp_path / "missing.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"not a trace")
    with pytest.raises(RefqwenError, match="junk.safetensors: not a readable refqwen trace"):
        refqwen.load_trace(tmp_path / "junk.safetensors")


def test_one_selected_point_is_all_that_is_kept(models, rng):
    """On a long prompt, selecting one point retains that point's array and nothing else."""
    model = models["dense-untied"]
    ids = rng.integers(0, 128, 500)

    def peak(run):
        tracemalloc.start()
        try:
            result = run()
            return result, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _, plain_peak = peak(lambda: model.forward(ids))
    one, one_peak = peak(lambda: trace(model, ids, names=["layers.2.attn.q"]))
    assert list(one) == ["layers.2.attn.q"]
    kept = one["layers.2.attn.q"].nbytes  # 500 x 4 x 16 floats
    assert one.nbytes == kept and one["layers.2.attn.q"].base is None  # a copy, not a view into a bigger buffer
    assert one_peak - plain_peak <= kept + 64 * 1024
    everything = trace(model, ids)
    assert everything.nbytes > 50 * kept  # what the bound saves
