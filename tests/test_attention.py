"""Blocked attention equals the textbook formula, and its memory does not grow with T x T."""

import tracemalloc

import numpy as np
import pytest

from refqwen.model.attention import causal_attention
from refqwen.model.moe import softmax


def textbook_attention(q, k, v, start, window):
    """softmax(q kᵀ / sqrt(D) + mask) v with the full score matrix, head by head."""
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
    # float32 sums in a different order: errors of a few ulps of values of magnitude ~3
    np.testing.assert_allclose(got, textbook_attention(q, k, v, S - T, window), rtol=0, atol=1e-5)


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
