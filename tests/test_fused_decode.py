"""Decode through the Numba backends' fused projections (backends/numba_int8.py FusedProjections): q/k/v and
gate/up as one matrix each, bit for bit the result of the separate matrices, with fewer kernel calls."""

import numpy as np
import pytest
from oracle import random_weights, tiny_config

from refqwen import backends, quant
from refqwen.model.model import Model


def logits_and_calls(name, cfg, w, fuse):
    ops = backends.get(name)
    ops.fuse_projections = fuse
    model = Model(cfg, w, backend=ops)
    calls = []
    gemv = ops._gemv
    ops._gemv = lambda x, weight: calls.append(weight.shape) or gemv(x, weight)
    cache = model.new_cache()
    steps = [model.logits(np.arange(1, 9), cache, last_only=True)]  # prefill: no fusion there
    for token in (3, 5, 7):
        steps.append(ops.decode(model, token, cache))
    return np.concatenate(steps), len(calls)


@pytest.mark.parametrize("name", ["numba-int8", "numba-int8-channel", "numba-int4", "numba-w8a8", "numba-w4a8"])
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
