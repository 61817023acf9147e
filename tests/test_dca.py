"""Dual Chunk Attention: the readable three-group form (refqwen/model/dca.py) against an independent
formulation, one softmax over remapped positions; plain rotary inside one chunk; config checks."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import LOGITS_ATOL

import refqwen
from refqwen.errors import ConfigError
from refqwen.model import dca
from refqwen.model.config import DualChunkAttention
from refqwen.model.rope import apply_rotary, default_inv_freq, rotary_cos_sin

EPS32 = float(np.finfo(np.float32).eps)


def rotate(x, positions, inv_freq):
    """x [N, D] each rotated by its own position [N]."""
    cos, sin = rotary_cos_sin(inv_freq, np.asarray(positions), 1.0)
    return apply_rotary(x[:, None, :], cos, sin)[:, 0, :]


def one_softmax_dca(q, k, v, inv_freq, cfg: DualChunkAttention, length):
    """The definition, pair by pair: query i and key j <= i rotated by remapped positions, then one
    softmax over all of query i's keys. q [T, H, D], k, v [T, KV, D] (not rotated), positions 0..T-1."""
    T, H, D = q.shape
    G = H // k.shape[1]
    c = cfg.chunk_size - cfg.local_size
    s = dca.length_temperature(length, cfg)
    out = np.zeros((T, H, D))
    for i in range(T):
        j = np.arange(i + 1)
        behind = i // c - j // c  # how many chunks key j lies behind query i
        q_pos = np.where(behind == 0, i % c, np.where(behind == 1, min(i % c + c, cfg.chunk_size),
                                                         min(2 * c - 1, cfg.chunk_size)))
        for h in range(H):
            q_rot = rotate(np.repeat(q[i, h][None], i + 1, axis=0), q_pos, inv_freq)  # [i+1, D]
            k_rot = rotate(k[j, h // G], j % c, inv_freq)  # [i+1, D]
            scores = (q_rot.astype(np.float64) * k_rot).sum(-1) * s * s / math.sqrt(D)
            p = np.exp(scores - scores.max())
            out[i, h] = (p / p.sum()) @ v[j, h // G]
    return out


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), past=st.integers(0, 39), chunk=st.integers(2, 16), local=st.integers(1, 15),
       KV=st.integers(1, 2), G=st.integers(1, 3), D=st.sampled_from([4, 8]), original=st.sampled_from([0, 3, 64]),
       seed=st.integers(0, 2**31))
def test_three_groups_equal_one_softmax_over_remapped_positions(T, past, chunk, local, KV, G, D, original, seed):
    local = min(local, chunk - 1)
    past = min(past, T - 1)  # the first `past` tokens were run before: the rest continue from the cache
    cfg = DualChunkAttention(chunk, local, original)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, KV * G, D)).astype(np.float32)
    k, v = (rng.standard_normal((T, KV, D)).astype(np.float32) for _ in range(2))
    inv_freq = default_inv_freq(10000.0, D)
    k_cached = np.stack([rotate(k[:, h], dca.key_positions(np.arange(T), cfg), inv_freq) for h in range(KV)], 1)
    ours = dca.dual_chunk_attention(q[past:], k_cached, v, past, inv_freq, 1.0, cfg)
    expected = one_softmax_dca(q, k, v, inv_freq, cfg, T)[past:]
    # scores are float32 dot products of rotated vectors: a few roundings each of sum |q_d k_d| s^2/sqrt(D);
    # the weights move by twice that (relative), the output by that times max|v|, plus a few ulps of max|v|
    s2 = dca.length_temperature(T, cfg) ** 2
    score_error = (D + 8) * EPS32 * np.abs(q).max() * np.abs(k).max() * D * s2 / math.sqrt(D)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=(64 * EPS32 + 4 * score_error) * np.abs(v).max())


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 300), past=st.integers(0, 299), chunk=st.integers(2, 120), local=st.integers(1, 119),
       KV=st.integers(1, 2), G=st.integers(1, 7), D=st.sampled_from([8, 64]), original=st.sampled_from([0, 30]),
       seed=st.integers(0, 2**31))
def test_numba_dca_equals_the_reference(T, past, chunk, local, KV, G, D, original, seed):
    """The Numba backend's DCA (three calls of its range kernel, merged by log-sum-exp) against the reference."""
    from refqwen.backends import numba_attention

    local, past = min(local, chunk - 1), min(past, T - 1)
    cfg = DualChunkAttention(chunk, local, original)
    rng = np.random.default_rng(seed)
    q = (2 * rng.standard_normal((T - past, KV * G, D))).astype(np.float32)
    k, v = (rng.standard_normal((T, KV, D)).astype(np.float32) for _ in range(2))
    inv_freq = default_inv_freq(10000.0, D)
    expected = dca.dual_chunk_attention(q, k, v, past, inv_freq, 1.0, cfg)
    got = numba_attention.dual_chunk_attention(q, k, v, past, inv_freq, 1.0, cfg)
    # both sum float32 scores in different orders: each within the bound above of the exact result
    s2 = dca.length_temperature(T, cfg) ** 2
    score_error = (D + 8) * EPS32 * np.abs(q).max() * np.abs(k).max() * D * s2 / math.sqrt(D)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2 * (64 * EPS32 + 4 * score_error) * np.abs(v).max())


def test_length_temperature():
    cfg = DualChunkAttention(8, 2, 100)
    assert dca.length_temperature(100, cfg) == 1.0 and dca.length_temperature(50, cfg) == 1.0
    assert dca.length_temperature(1000, cfg) == pytest.approx(0.1 * math.log(10) + 1)
    assert dca.length_temperature(10**6, DualChunkAttention(8, 2, 0)) == 1.0


@pytest.mark.parametrize("backend", ["numpy", "numba-int8"])
def test_inside_one_chunk_dca_is_plain_rotary_attention(tiny_hf, rng, backend):
    folder = tiny_hf("dense-untied")[1]
    plain = refqwen.load(folder, progress=False, backend=backend)
    chunked = refqwen.load(folder, progress=False, backend=backend,
                           dual_chunk_attention={"chunk_size": 120, "local_size": 20})
    ids = rng.integers(0, 128, 100)  # 100 positions fit in one chunk of c = 100
    np.testing.assert_allclose(chunked.forward(ids), plain.forward(ids), rtol=0, atol=LOGITS_ATOL)
    longer = rng.integers(0, 128, 130)  # past one chunk: the remapped positions change the logits
    assert np.abs(chunked.forward(longer)[-10:] - plain.forward(longer)[-10:]).max() > 100 * LOGITS_ATOL


def test_dca_trace_points(tiny_hf, rng):
    model = refqwen.load(tiny_hf("dense-untied")[1], progress=False,
                         dual_chunk_attention={"chunk_size": 12, "local_size": 4})
    traced = refqwen.trace(model, rng.integers(0, 128, 30), ["layers.0.attn.dca_*", "layers.0.attn.z"])
    groups = [traced[f"layers.0.attn.dca_{g}"] for g in ("intra", "previous", "earlier")]
    assert all(g.shape == traced["layers.0.attn.z"].shape for g in groups)
    assert np.all(groups[2][:16] == 0) and np.any(groups[2][16:] != 0)  # earlier chunks exist from chunk 2 on


@pytest.mark.parametrize("block,message", [
    ({"chunk_size": 8, "local_size": 8}, r"local_size \(8\) must be smaller than chunk_size \(8\)"),
    ({"chunk_size": 8, "local_size": 9}, r"local_size \(9\) must be smaller than chunk_size \(8\)"),
    ({"chunk_size": 0, "local_size": 4}, "chunk_size must be an integer >= 1, got 0"),
    ({"chunk_size": 8, "local_size": -1}, "local_size must be an integer >= 1, got -1"),
    ({"chunk_size": 8, "local_size": 2, "original_max_position_embeddings": -5},
     "original_max_position_embeddings must be an integer >= 0"),
])
def test_bad_dca_config_is_refused_naming_the_field(block, message):
    raw = dict(architectures=["Qwen2ForCausalLM"], vocab_size=8, hidden_size=16, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, intermediate_size=8, dual_chunk_attention_config=block)
    with pytest.raises(ConfigError, match="config.json: invalid dual_chunk_attention_config: " + message):
        refqwen.Config.from_hf_dict(raw)
