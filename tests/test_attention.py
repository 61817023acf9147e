"""Blocked attention equals the textbook formula, and its memory does not grow with T x T."""

import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refqwen.model.attention import attention_pattern, causal_attention, textbook_attention
from refqwen.model.moe import softmax

# float32 sums in a different order (online vs one softmax, blocked vs whole matmuls): errors of a few
# ulps of values of magnitude ~3 (q and k drawn with std 3, v with std 1, softmax weights <= 1)
ATOL = 1e-5


def per_head_attention(q, k, v, start, window):
    """softmax(q kᵀ / sqrt(D) + mask) v written a third way, one head at a time with moe.softmax:
    a check on textbook_attention that shares none of its code."""
    T, H, D = q.shape
    S, KV, _ = k.shape
    q_pos, k_pos = np.arange(start, start + T)[:, None], np.arange(S)[None, :]
    visible = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
    out = np.empty_like(q)
    for h in range(H):
        kv = h // (H // KV)
        scores = np.where(visible, q[:, h] @ k[:, kv].T / np.sqrt(D), -np.inf)
        out[:, h] = softmax(scores) @ v[:, kv]
    return out


@pytest.mark.parametrize("T,S,H,KV,window,block", [
    (1, 1, 4, 4, None, 4), (7, 7, 8, 1, None, 3), (5, 20, 6, 2, None, 4), (30, 30, 4, 2, 5, 4),
    (1, 33, 8, 8, 7, 8), (17, 50, 12, 3, 16, 5), (64, 64, 2, 1, 1, 16),
])
def test_blocked_equals_textbook(T, S, H, KV, window, block):
    rng = np.random.default_rng(T * S)
    q = rng.standard_normal((T, H, 16)).astype(np.float32) * 3
    k = rng.standard_normal((S, KV, 16)).astype(np.float32) * 3
    v = rng.standard_normal((S, KV, 16)).astype(np.float32)
    got = causal_attention(q, k, v, S - T, window, block=block)
    np.testing.assert_allclose(got, textbook_attention(q, k, v, S - T, window), rtol=0, atol=ATOL)


@st.composite
def attention_inputs(draw):
    """Random shapes (GQA ratios 1-4, caches longer than the new tokens, windows shorter than both)."""
    KV, G, D = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.sampled_from([2, 8, 16]))
    S = draw(st.integers(1, 40))
    T = draw(st.integers(1, S))
    window = draw(st.none() | st.integers(1, S + 2))
    block = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q = (3 * rng.standard_normal((T, KV * G, D))).astype(np.float32)
    k = (3 * rng.standard_normal((S, KV, D))).astype(np.float32)
    v = rng.standard_normal((S, KV, D)).astype(np.float32)
    return q, k, v, S - T, window, block


@settings(max_examples=60, deadline=None)
@given(attention_inputs())
def test_textbook_equals_blocked_and_per_head(inputs):
    """The equality attention.py states: causal_attention (blocked, online softmax) = textbook_attention
    (one softmax over the whole masked score matrix), and both = the per-head formula above."""
    q, k, v, start, window, block = inputs
    textbook = textbook_attention(q, k, v, start, window)
    np.testing.assert_allclose(causal_attention(q, k, v, start, window, block=block), textbook, rtol=0, atol=ATOL)
    np.testing.assert_allclose(per_head_attention(q, k, v, start, window), textbook, rtol=0, atol=ATOL)
    pattern = attention_pattern(q, k, start, window)  # [H, T, S]
    np.testing.assert_allclose(pattern.sum(axis=-1), 1, rtol=0, atol=1e-6)  # float32 sums of at most 40 terms
    q_pos, k_pos = np.arange(start, start + len(q))[:, None], np.arange(len(k))[None, :]
    hidden = (k_pos > q_pos) | ((q_pos - k_pos >= window) if window else False)
    assert np.all(pattern[:, hidden] == 0)  # masked keys get exactly zero weight


def peak_bytes(T, H=4, KV=2, D=16):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((T, KV, D)).astype(np.float32)
    v = rng.standard_normal((T, KV, D)).astype(np.float32)
    tracemalloc.start()
    causal_attention(q, k, v, 0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_attention_memory_is_linear_not_quadratic():
    """From T=1024 to T=4096, memory may grow by a few copies of q (output, transposes) but not
    by a T x T score matrix per head (4 heads x 4096² x 4 bytes = 268 MB)."""
    H, D = 4, 16
    growth = peak_bytes(4096) - peak_bytes(1024)
    per_copy_of_q = (4096 - 1024) * H * D * 4
    assert growth < 6 * per_copy_of_q, f"attention peak grew by {growth} bytes"


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), S=st.integers(1, 600), KV=st.integers(1, 3), G=st.integers(1, 8),
       D=st.sampled_from([2, 8, 64, 80]), scale=st.sampled_from([0.05, 0.3, 2.0]), seed=st.integers(0, 2**31),
       splits=st.sampled_from([None, 1, 2, 3, 8]))
# decode's few rows (T x G <= 16) over several key blocks, values read in place (D = 64) and copied (D = 80)
@example(T=1, S=600, KV=2, G=7, D=64, scale=0.3, seed=1, splits=1)
@example(T=2, S=600, KV=1, G=8, D=80, scale=0.3, seed=2, splits=None)
# one query's keys cut into ranges, merged by log-sum-exp (some ranges empty: 8 of a handful of keys)
@example(T=1, S=600, KV=2, G=7, D=64, scale=0.3, seed=3, splits=3)
@example(T=1, S=600, KV=1, G=14, D=64, scale=2.0, seed=4, splits=8)
def test_numba_attend_ranges_against_float64(T, S, KV, G, D, scale, seed, splits):
    """backends/numba_attention.attend_ranges: query t sees keys lo[t] .. hi[t]-1 (any range, empty too),
    out and log-sum-exp against the float64 definition; for one query, with its keys cut into `splits` ranges."""
    from refqwen.backends import numba_attention

    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, KV * G, D)).astype(np.float32)
    k, v = (rng.standard_normal((S, KV, D)).astype(np.float32) for _ in range(2))
    lo = rng.integers(0, S + 1, T)
    hi = np.minimum(S, lo + rng.integers(0, S + 1, T))
    empty = rng.random(T) < 0.2
    hi[empty] = lo[empty]
    out, lse = numba_attention.attend_ranges(q, k, v, lo, hi, scale, splits)
    for t in range(T):
        for h in range(KV * G):
            if lo[t] == hi[t]:
                assert np.all(out[t, h] == 0) and lse[t, h] == -np.inf
                continue
            scores = scale * (k[lo[t]:hi[t], h // G].astype(np.float64) @ q[t, h])
            top = scores.max()
            weights = np.exp(scores - top)
            # float32 scores: a few roundings of scale * sum |q_d k_d| each; weights move by twice that
            score_error = (D + 4) * 2.0 ** -23 * scale * (np.abs(k[lo[t]:hi[t], h // G]) @ np.abs(q[t, h])).max()
            np.testing.assert_allclose(lse[t, h], top + np.log(weights.sum()), rtol=0, atol=2 * score_error + 1e-5)
            expected = weights @ v[lo[t]:hi[t], h // G] / weights.sum()
            atol = (64 * 2.0 ** -23 + 4 * score_error) * np.abs(v).max()
            np.testing.assert_allclose(out[t, h], expected, rtol=0, atol=atol)
