"""Grouped-query self-attention with rotary positions, a KV cache and bounded memory.

Shapes: T new tokens, S positions in the cache (earlier ones plus the T new ones), C hidden
size, H query heads, KV key/value heads, G = H / KV query heads sharing one key/value head,
D head size.

    attention(q, K, V) = softmax(q Kᵀ / sqrt(D) + mask) V

`textbook_attention` computes exactly that, with one softmax over the full [H, T, S] score
matrix. `causal_attention`, which the model runs, computes the same thing one block of queries
against one block of keys at a time, with a running ("online") softmax as in FlashAttention:
memory for scores is O(block x block) per head whatever the prompt length. The two agree to
float32 rounding (tests/test_attention.py checks it on random shapes with hypothesis).
"""

import numpy as np

from refqwen.model.cache import LayerCache
from refqwen.model.hooks import UNTRACED

BLOCK = 256  # queries per block, keys per block 256 x 256 / queries: scores use KV x G x 256 x 256 floats at most


class Attention:
    hook = UNTRACED  # trace points q, k, v, q_rot, k_rot, pattern, z, out (refqwen/trace.py)

    def __init__(self, ops, q_proj, q_bias, k_proj, k_bias, v_proj, v_bias, o_proj, num_heads, num_kv_heads):
        self.ops = ops  # the backend that computes the operations
        self.q_proj, self.q_bias = q_proj, q_bias  # [H*D, C], [H*D]
        self.k_proj, self.k_bias = k_proj, k_bias  # [KV*D, C], [KV*D]
        self.v_proj, self.v_bias = v_proj, v_bias  # [KV*D, C], [KV*D]
        self.o_proj = o_proj  # [C, H*D], no bias
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.dca = None  # with Dual Chunk Attention: the model's Config (refqwen/model/dca.py)

    @classmethod
    def from_weights(cls, w: dict, prefix: str, cfg, ops) -> "Attention":
        def weight(name):
            return ops.prepare_linear(f"{prefix}.{name}.weight", w[f"{prefix}.{name}.weight"])

        def bias(name):  # qwen2_moe may switch q/k/v biases off (qkv_bias: false)
            return ops.prepare_float(f"{prefix}.{name}.bias", w[f"{prefix}.{name}.bias"]) if cfg.qkv_bias else None

        attn = cls(ops, weight("q_proj"), bias("q_proj"), weight("k_proj"), bias("k_proj"), weight("v_proj"),
                   bias("v_proj"), weight("o_proj"), cfg.num_attention_heads, cfg.num_key_value_heads)
        attn.dca = cfg if cfg.dual_chunk_attention else None
        return attn

    def __call__(self, x, cos, sin, cache: LayerCache, window: int | None) -> np.ndarray:
        """x [T, C]; cos, sin [T, D] for the T new positions -> [T, C]"""
        ops, hook, T = self.ops, self.hook, x.shape[0]
        q = hook("q", ops.linear(x, self.q_proj, self.q_bias).reshape(T, self.num_heads, -1))  # [T, H, D]
        k = hook("k", ops.linear(x, self.k_proj, self.k_bias).reshape(T, self.num_kv_heads, -1))  # [T, KV, D]
        v = hook("v", ops.linear(x, self.v_proj, self.v_bias).reshape(T, self.num_kv_heads, -1))  # [T, KV, D]
        q_raw = q  # DCA rotates the queries itself, three ways
        q = hook("q_rot", ops.apply_rotary(q, cos, sin))  # [T, H, D]
        k = hook("k_rot", ops.apply_rotary(k, cos, sin))  # [T, KV, D]
        start = cache.length  # position of the first new token
        keys, values = cache.append(k, v)  # [S, KV, D] each: every position so far, the T new ones last
        if hook.wants("pattern"):  # opt-in: the blocked attention below never forms this [H, T, S] matrix
            # cache.keys is [S, KV, D] in every cache, whatever layout `keys` has for the backend's attention
            hook("pattern", attention_pattern(q, cache.keys[:cache.length], start, window))
        if self.dca is not None:  # cos, sin rotated the keys by their place in their chunk; q is rotated 3 ways
            z = hook("z", ops.dual_chunk_attention(q_raw, keys, values, start, self.dca.rope_inv_freq,
                                                   self.dca.rope_attention_factor, self.dca.dual_chunk_attention,
                                                   hook))
        else:
            z = hook("z", ops.attention(q, keys, values, start, window))  # [T, H, D]
        return hook("out", ops.linear(z.reshape(T, -1), self.o_proj))


def textbook_attention(q, k, v, start: int, window: int | None = None) -> np.ndarray:
    """softmax(q kᵀ / sqrt(D) + mask) v with the whole score matrix at once: the definition.

    q [T, H, D] at positions start .. start+T-1; k, v [S, KV, D] at positions 0 .. S-1.  -> [T, H, D]
    Holds an [H, T, S] matrix, so the model runs causal_attention instead, which gives the same result.
    """
    p = attention_pattern(q, k, start, window)  # [H, T, S], each row sums to 1
    v = np.repeat(v, q.shape[1] // v.shape[1], axis=1)  # [S, H, D]: query head h reads value head h // G
    return np.einsum("hts,shd->thd", p, v)  # [T, H, D]


def causal_attention(q, k, v, start: int, window: int | None = None, block: int = BLOCK) -> np.ndarray:
    """textbook_attention, block by block: softmax(q kᵀ / sqrt(D) + mask) v without the [H, T, S] matrix.

    q [T, H, D] at positions start .. start+T-1; k, v [S, KV, D] at positions 0 .. S-1.
    Query head h reads key/value head h // (H / KV). A query at position i sees key j iff
    j <= i and, with a window, i - j < window.  -> [T, H, D]
    """
    T, H, D = q.shape
    KV = k.shape[1]
    G = H // KV  # query heads per key/value head
    q = q.reshape(T, KV, G, D).transpose(1, 0, 2, 3) * np.float32(D ** -0.5)  # [KV, T, G, D]
    k, v = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [KV, S, D]
    out = np.empty((KV, T, G, D), np.float32)
    for t0 in range(0, T, block):
        t1 = min(t0 + block, T)
        # as many keys per block as keep the score tile at block x block per head: a decode step's
        # single query scores the whole cache in one tile
        keys_per_block = block * block // (t1 - t0)
        out[:, t0:t1] = _attend_block(q[:, t0:t1], k, v, np.arange(start + t0, start + t1), window, keys_per_block)
    return out.transpose(1, 0, 2, 3).reshape(T, H, D)  # [T, H, D]


def attention_pattern(q, k, start: int, window: int | None = None) -> np.ndarray:
    """The attention weights softmax(q kᵀ / sqrt(D) + mask), one [T, S] matrix per query head.

    q [T, H, D] at positions start .. start+T-1; k [S, KV, D] at positions 0 .. S-1.  -> [H, T, S]
    A query at position i sees key j iff j <= i and, with a window, i - j < window.
    """
    T, H, D = q.shape
    S, KV = k.shape[:2]
    k = np.repeat(k, H // KV, axis=1)  # [S, H, D]: query head h reads key head h // G
    scores = np.einsum("thd,shd->hts", q * np.float32(D ** -0.5), k)  # [H, T, S]
    q_pos, k_pos = np.arange(start, start + T), np.arange(S)
    visible = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    if window is not None:
        visible &= q_pos[:, None] - k_pos[None, :] < window
    scores = np.where(visible, scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def _attend_block(q, k, v, q_pos, window, block):
    """One block of queries q [KV, t, G, D] at positions q_pos [t] against all visible keys, `block` keys
    at a time.  k, v [KV, S, D] -> [KV, t, G, D]"""
    KV, t, G, D = q.shape
    # the G query heads that read one key/value head are rows of one matrix: one product per key head
    rows = q.reshape(KV, t * G, D)  # [KV, t*G, D], position-major: row r is position r // G
    first = 0 if window is None else max(0, q_pos[0] - window + 1)  # earliest key any query here sees
    last = q_pos[-1]  # latest key any query here sees
    running_max = np.full((KV, t * G, 1), -np.inf, np.float32)
    denom = np.zeros((KV, t * G, 1), np.float32)
    acc = np.zeros((KV, t * G, D), np.float32)
    for s0 in range((first // block) * block, last + 1, block):
        s1 = min(s0 + block, last + 1)
        k_pos = np.arange(s0, s1)
        visible = k_pos[None, :] <= q_pos[:, None]  # [t, s]
        if window is not None:
            visible &= q_pos[:, None] - k_pos[None, :] < window
        scores = rows @ k[:, s0:s1].swapaxes(-1, -2)  # [KV, t*G, s]
        scores = np.where(np.repeat(visible, G, axis=0), scores, -np.inf)  # a position's G heads share its mask
        new_max = np.maximum(running_max, scores.max(axis=-1, keepdims=True))
        # a query that has seen no key yet has max -inf; shift it by 0 instead so exp gives 0, not NaN
        shift = np.where(np.isfinite(new_max), new_max, np.float32(0))
        rescale = np.exp(running_max - shift)  # shrink what was summed under the old maximum
        p = np.exp(scores - shift)  # [KV, t*G, s]
        denom = denom * rescale + p.sum(axis=-1, keepdims=True)
        acc = acc * rescale + p @ v[:, s0:s1]  # [KV, t*G, D]
        running_max = new_max
    return (acc / denom).reshape(KV, t, G, D)
