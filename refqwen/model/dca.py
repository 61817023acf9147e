"""Dual Chunk Attention (DCA, Qwen2.5-1M): attention past the trained window without new training.

The sequence is cut into chunks of c = chunk_size - local_size positions. Keys are rotated by their
position inside their chunk, j mod c. A query at position i is rotated three ways, one per group of
keys it sees, so that every query-key distance the model meets stays inside what it was trained on:

    intra-chunk     keys of its own chunk (causal)        query position  i mod c
    previous-chunk  keys of the chunk just before         query position  min(i mod c + c, chunk_size)
    earlier-chunk   keys of every chunk before that       query position  min(2c - 1, chunk_size)

The three groups are separate attentions, each with its log-sum-exp; merging them by their
log-sum-exp gives exactly one softmax over all visible keys. Logits are multiplied by s^2 with the
length temperature s = max(1, 0.1 ln(L / original_max_position_embeddings) + 1) (L: the sequence
length so far; s = 1 without an original length). Inside one chunk DCA is plain rotary attention.
"""

import math

import numpy as np

from refqwen.model.hooks import UNTRACED
from refqwen.model.rope import apply_rotary, rotary_cos_sin

QUERY_BLOCK = 64  # queries per step: scores use H x 64 x S floats at most


def chunk_length(dca) -> int:
    return dca.chunk_size - dca.local_size


def key_positions(positions: np.ndarray, dca) -> np.ndarray:
    """The position each key is rotated by: its place inside its chunk."""
    return positions % chunk_length(dca)


def query_positions(positions: np.ndarray, dca) -> dict:
    """The three positions each query is rotated by, one per group of keys.  -> name -> [T]"""
    c = chunk_length(dca)
    return {"intra": positions % c,
            "previous": np.minimum(positions % c + c, dca.chunk_size),
            "earlier": np.full_like(positions, min(2 * c - 1, dca.chunk_size))}


def length_temperature(length: int, dca) -> float:
    """s: DCA multiplies attention logits by s^2 once the sequence outgrows the original window."""
    if dca.original_max_position_embeddings <= 0:
        return 1.0
    return max(1.0, 0.1 * math.log(length / dca.original_max_position_embeddings) + 1.0)


def group_ranges(q_pos: np.ndarray, dca) -> dict:
    """The keys each query sees in each group: positions lo .. hi-1, whole chunks.  -> name -> (lo, hi), [T] each"""
    c = chunk_length(dca)
    chunk_start = q_pos // c * c  # first position of the query's chunk
    previous_start = np.maximum(chunk_start - c, 0)
    return {"intra": (chunk_start, q_pos + 1),  # causal inside its own chunk
            "previous": (previous_start, chunk_start),  # empty in the first chunk
            "earlier": (np.zeros_like(q_pos), previous_start)}  # empty in the first two chunks


def group_masks(q_pos: np.ndarray, k_pos: np.ndarray, dca) -> dict:
    """Which keys each query sees in each group.  -> name -> [T, S] bool"""
    return {name: (k_pos[None, :] >= lo[:, None]) & (k_pos[None, :] < hi[:, None])
            for name, (lo, hi) in group_ranges(q_pos, dca).items()}


def rotate_queries(q, positions, inv_freq, attention_factor: float) -> np.ndarray:
    """q [T, H, D] rotated by one position per query, positions [T] (one group's).  -> [T, H, D]"""
    cos, sin = rotary_cos_sin(inv_freq, positions, attention_factor)
    return apply_rotary(q, cos, sin)


def attend_with_lse(q, k, v, visible):
    """softmax attention of q [T, H, D] (already scaled) over the visible keys of k, v [S, KV, D].

    -> (out [T, H, D], lse [T, H]); a query that sees no key gets out 0 and lse -inf.
    """
    T, H, D = q.shape
    k, v = np.repeat(k, H // k.shape[1], axis=1), np.repeat(v, H // v.shape[1], axis=1)  # [S, H, D]
    scores = np.where(visible[None], np.einsum("thd,shd->hts", q, k), -np.inf)  # [H, T, S]
    top = scores.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, np.float32(0))  # no visible key: exp(-inf - 0) = 0
    p = np.exp(scores - top)
    total = p.sum(axis=-1)  # [H, T]
    out = np.einsum("hts,shd->thd", p, v) / np.maximum(total, np.float32(1e-30)).T[:, :, None]
    with np.errstate(divide="ignore"):
        lse = (np.log(total) + top[..., 0]).T  # [T, H]
    return out.astype(np.float32), lse.astype(np.float32)


def merge_by_lse(outs: list, lses: list) -> np.ndarray:
    """One softmax over the union of the groups: weight each group's output by exp(its lse).
    outs [T, H, D] each, lses [T, H] each -> [T, H, D]"""
    top = np.max(lses, axis=0)  # [T, H]; every query sees at least itself, so it is finite
    weights = [np.exp(lse - top) for lse in lses]
    return sum(w[..., None] * out for w, out in zip(weights, outs)) / sum(weights)[..., None]


def dual_chunk_attention(q, keys, values, start: int, inv_freq, attention_factor: float, dca,
                         hook=UNTRACED) -> np.ndarray:
    """DCA of the T queries q [T, H, D] (not rotated) at positions start .. start+T-1 over the cache's
    keys (rotated by key_positions) and values, [S, KV, D].  -> [T, H, D]"""
    T, H, D = q.shape
    S = keys.shape[0]
    scale = np.float32(length_temperature(S, dca) ** 2 / math.sqrt(D))
    groups = query_positions(np.arange(start, start + T), dca)
    outs = {name: np.empty((T, H, D), np.float32) for name in groups}
    lses = {name: np.empty((T, H), np.float32) for name in groups}
    for t0 in range(0, T, QUERY_BLOCK):
        t1 = min(t0 + QUERY_BLOCK, T)
        masks = group_masks(np.arange(start + t0, start + t1), np.arange(S), dca)
        for name, rotate_by in groups.items():
            q_g = rotate_queries(q[t0:t1], rotate_by[t0:t1], inv_freq, attention_factor) * scale
            outs[name][t0:t1], lses[name][t0:t1] = attend_with_lse(q_g, keys, values, masks[name])
    outs = [hook(f"dca_{name}", out) for name, out in outs.items()]
    return merge_by_lse(outs, list(lses.values()))
