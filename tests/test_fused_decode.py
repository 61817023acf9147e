"""Decode through the Numba backends' fused projections (backends/numba_int8.py FusedProjections): q/k/v and
gate/up as one matrix each, bit for bit the result of the separate matrices, with fewer kernel calls; and
their lean decode step (backends/numba_decode.py), bit for bit the model's own step."""

import numpy as np
import pytest
from oracle import random_weights, tiny_config

from refqwen import backends, quant
from refqwen.errors import RefqwenError
from refqwen.model.model import Model
from refqwen.trace import Tracer

NUMBA_BACKENDS = ["numba-int8", "numba-int8-channel", "numba-int4", "numba-w8a8", "numba-w4a8"]


def logits_and_calls(name, cfg, w, fuse):
    ops = backends.get(name)
    ops.fuse_projections = fuse
    ops.lean_decode = False  # the model's own step, each projection through ops.linear
    model = Model(cfg, w, backend=ops)
    calls = []
    gemv = ops._gemv
    ops._gemv = lambda x, weight: calls.append(weight.shape) or gemv(x, weight)
    cache = model.new_cache()
    steps = [model.logits(np.arange(1, 9), cache, last_only=True)]  # prefill: no fusion there
    for token in (3, 5, 7):
        steps.append(ops.decode(model, token, cache))
    return np.concatenate(steps), len(calls)


@pytest.mark.parametrize("name", NUMBA_BACKENDS)
def test_fused_decode_matches_separate_projections(name):
    cfg = tiny_config("dense-untied")
    w = random_weights(cfg)
    fused, fused_calls = logits_and_calls(name, cfg, w, True)
    separate, separate_calls = logits_and_calls(name, cfg, w, False)
    assert np.array_equal(fused, separate)
    # per layer and step: q, k, v, o, gate, up, down -> qkv, o, gate-up, down; lm_head once per step, and
    # once after the prefill (its last token only)
    assert separate_calls == 3 * (7 * cfg.num_hidden_layers + 1) + 1
    assert fused_calls == 3 * (4 * cfg.num_hidden_layers + 1) + 1


def test_a_member_with_another_input_is_recomputed():
    ops = backends.get("numba-int8")
    rng = np.random.default_rng(0)
    weights = {p: rng.standard_normal((8 * (i + 1), 64)).astype(np.float32)
               for i, p in enumerate(("gate_proj", "up_proj"))}
    gate, up = (ops.prepare_linear(f"mlp.{p}.weight", weights[p]) for p in ("gate_proj", "up_proj"))
    assert gate.fused is up.fused and np.shares_memory(gate.q, gate.fused.weight.q)  # one matrix, no copies
    x1, x2 = rng.standard_normal((2, 1, 64)).astype(np.float32)
    got_gate = ops.linear(x1, gate)
    got_up = ops.linear(x2, up)  # another input: not the rows computed for x1
    for got, x, p in ((got_gate, x1, "gate_proj"), (got_up, x2, "up_proj")):
        expected = x @ quant.dequantize(*quant.quantize(weights[p], "g32")).T
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def decode_steps(name, kind, lean, steps=12):
    """Logits of an 8-token prefill and `steps` decode steps (the cache grows past 16 positions on the way),
    and the backend's LeanDecode for the model (None where the model's own step ran)."""
    cfg = tiny_config(kind)
    ops = backends.get(name)
    ops.lean_decode = lean
    model = Model(cfg, random_weights(cfg), backend=ops)
    cache = model.new_cache()
    logits = [model.logits(np.arange(1, 9), cache, last_only=True)]
    for step in range(steps):
        logits.append(ops.decode(model, (7 * step + 3) % cfg.vocab_size, cache))
    return np.concatenate(logits), ops._lean.get(model)


@pytest.mark.parametrize("kind", ["dense-untied", "dense-tied", "dense-sliding", "dense-yarn", "moe-step1"])
@pytest.mark.parametrize("name", NUMBA_BACKENDS)
def test_lean_decode_is_the_models_step(name, kind):
    """The same kernels on the same numbers: equal bit for bit, on sliding-window and YaRN models too; a MoE model
    takes the model's own step."""
    lean, plan = decode_steps(name, kind, True)
    model_step, _ = decode_steps(name, kind, False)
    assert np.array_equal(lean, model_step)
    assert (plan is None) == kind.startswith("moe")


# A decode query's keys cut into ranges (flash-decoding) and merged by log-sum-exp: the same softmax summed in
# another order, so float32 rounding apart; logits of these tiny models are O(1).
SPLIT_ATOL = 1e-4


@pytest.mark.parametrize("kind", ["dense-untied", "dense-sliding"])
def test_decode_with_keys_cut_into_ranges(kind, monkeypatch):
    """With more threads than key/value heads a decode query's keys are cut into ranges, one task each: the lean
    step still equals the model's step bit for bit, and both the step with whole ranges to rounding."""
    from refqwen.backends import numba_attention

    whole, _ = decode_steps("numba-w8a8", kind, True)
    monkeypatch.setattr(numba_attention, "get_num_threads", lambda: 8)  # 8 ranges per key/value head here
    monkeypatch.setattr(numba_attention, "SPLIT_KEYS", 2)
    assert numba_attention.decode_splits(12, 1) == 6
    lean, _ = decode_steps("numba-w8a8", kind, True)
    model_step, _ = decode_steps("numba-w8a8", kind, False)
    assert np.array_equal(lean, model_step)
    assert not np.array_equal(lean, whole)  # the ranges did run
    np.testing.assert_allclose(lean, whole, rtol=0, atol=SPLIT_ATOL)


def test_lean_decode_checks_its_input_and_steps_aside_for_a_trace():
    cfg = tiny_config("dense-untied")
    ops = backends.get("numba-w4a8")
    model = Model(cfg, random_weights(cfg), backend=ops)
    cache = model.new_cache()
    model.logits(np.arange(1, 9), cache)
    with pytest.raises(RefqwenError, match="outside the vocabulary"):
        ops.decode(model, cfg.vocab_size, cache)
    lean = ops.decode(model, 5, cache)
    assert ops._lean[model] is not None
    tracer = model.trace_points.tracer = Tracer()  # a running trace sees every point of the step
    traced = ops.decode(model, 5, cache)
    model.trace_points.tracer = None
    assert "layers.0.attn.q_rot" in tracer.arrays and "logits" in tracer.arrays
    cache_again = model.new_cache()
    model.logits(np.arange(1, 9), cache_again)
    ops.decode(model, 5, cache_again)
    assert np.array_equal(ops.decode(model, 5, cache_again), traced) and not np.array_equal(lean, traced)
    full = model.new_cache()
    model.logits(np.arange(cfg.context_window - 1) % cfg.vocab_size, full)
    ops.decode(model, 5, full)  # the last position the window holds
    with pytest.raises(RefqwenError, match="context"):
        ops.decode(model, 5, full)
