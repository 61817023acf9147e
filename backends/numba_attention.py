"""Causal grouped-query attention over the KV cache as parallel Numba kernels, for prefill and decode.

Same semantics as `refqwen.model.attention.causal_attention` (the specification): query head h
reads key/value head h // G; the query at position i sees key j iff j <= i and, with a window,
i - j < window; softmax(q k / sqrt(D)) v with an online softmax, so memory stays bounded
(QUERY_BLOCK x G rows by KEY_BLOCK keys of scores per task, never a T x S matrix).

Work is split into tasks (key/value head, block of QUERY_BLOCK positions): the G query heads that
share a key/value head and QUERY_BLOCK positions are R = G x QUERY_BLOCK rows that reuse every key
and value they load. Per block of KEY_BLOCK keys, scores and the weighted sum of values are both
dot products over a contiguous axis (the block's keys as they are, its values transposed), done
two rows by two columns at a time so that the sums stay in registers. Decode (T = 1) is one task
per key/value head.
"""

import numpy as np

try:
    from numba import njit, prange
except ImportError:  # the backends that use this module report numba as unavailable
    njit = None

QUERY_BLOCK = 16  # query positions per task
KEY_BLOCK = 128  # keys per step of the online softmax
# Floating-point reassociation lets LLVM vectorize the sums; no "ninf"/"nnan": the masks rely on them.
FAST = {"reassoc", "contract"}
NO_WINDOW = 0


def attention(q, keys, values, start: int, window: int | None) -> np.ndarray:
    """q [T, H, D] at positions start .. start+T-1; keys, values [S, KV, D] -> [T, H, D]"""
    q = np.ascontiguousarray(q, np.float32)
    keys, values = np.ascontiguousarray(keys, np.float32), np.ascontiguousarray(values, np.float32)
    out = np.empty_like(q)
    _attention_kernel(q, keys, values, start, NO_WINDOW if window is None else window, out)
    return out


def warm_up():
    """Compile (or load from Numba's cache) the kernel."""
    x = np.ones((1, 1, 2), np.float32)
    _attention_kernel(x, x, x, 0, NO_WINDOW, np.empty_like(x))


if njit is not None:

    @njit(cache=True)
    def _balanced_block(task, n_blocks):
        """Query block of a task, interleaving short (early) and long (late) blocks: with static
        scheduling each thread then gets a similar share of the causal triangle."""
        half = task // 2
        return half if task % 2 == 0 else n_blocks - 1 - half

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _attention_kernel(q, k, v, start, window, out):
        T, H, D = q.shape
        KV = k.shape[1]
        G = H // KV
        scale = np.float32(1.0 / np.sqrt(D))
        n_blocks = (T + QUERY_BLOCK - 1) // QUERY_BLOCK
        for task in prange(KV * n_blocks):
            kv = task % KV
            t0 = _balanced_block(task // KV, n_blocks) * QUERY_BLOCK
            t1 = min(t0 + QUERY_BLOCK, T)
            _attend_rows(q, k, v, start, window, kv, G, t0, t1, scale, out)

    @njit(fastmath=FAST, cache=True)
    def _attend_rows(q, k, v, start, window, kv, G, t0, t1, scale, out):
        """Rows r = (t - t0) * G + g: query position t, query head kv * G + g."""
        D = q.shape[2]
        R = (t1 - t0) * G
        qs = np.empty((R, D), np.float32)  # scaled queries
        for r in range(R):
            for d in range(D):
                qs[r, d] = q[t0 + r // G, kv * G + r % G, d] * scale
        acc = np.zeros((R, D), np.float32)
        row_max = np.full(R, np.float32(-3.0e38), np.float32)
        denom = np.zeros(R, np.float32)
        kb = np.empty((KEY_BLOCK, D), np.float32)  # one block of keys
        vt = np.empty((D, KEY_BLOCK), np.float32)  # the block's values, transposed
        p = np.empty((R, KEY_BLOCK), np.float32)  # scores, then softmax weights
        pv = np.empty((R, D), np.float32)
        powers = np.empty(KEY_BLOCK, np.int32)  # scratch of _exp_shifted
        first = 0 if window == NO_WINDOW else max(0, start + t0 - window + 1)
        last = start + t1 - 1
        for s0 in range(first, last + 1, KEY_BLOCK):
            n = min(KEY_BLOCK, last + 1 - s0)
            for j in range(n):
                for d in range(D):
                    kb[j, d] = k[s0 + j, kv, d]
                    vt[d, j] = v[s0 + j, kv, d]
            _dot_products(qs, kb, p, n, D)  # p[r, j] = qs[r] . k[s0 + j]
            for r in range(R):
                pos = start + t0 + r // G
                lo = s0 if window == NO_WINDOW else max(s0, pos - window + 1)
                hi = min(s0 + n, pos + 1)
                _softmax_step(p[r], lo - s0, hi - s0, n, powers, acc[r], row_max, denom, r)
            _dot_products(p, vt, pv, D, n)  # pv[r, d] = sum_j p[r, j] v[s0 + j, d]
            for r in range(R):
                for d in range(D):
                    acc[r, d] += pv[r, d]
        for r in range(R):
            t, h = t0 + r // G, kv * G + r % G
            for d in range(D):
                out[t, h, d] = acc[r, d] / denom[r]

    @njit(fastmath=FAST, cache=True)
    def _dot_products(a, b, c, cols, m):
        """c[r, j] = a[r, :m] . b[j, :m] for every row r of a and j < cols.

        Two rows by two columns at a time: four sums kept in registers, each loaded value used twice.
        """
        R = a.shape[0]
        for r in range(0, R - 1, 2):
            for j in range(0, cols - 1, 2):
                s00 = s01 = s10 = s11 = np.float32(0)
                for i in range(m):
                    s00 += a[r, i] * b[j, i]
                    s01 += a[r, i] * b[j + 1, i]
                    s10 += a[r + 1, i] * b[j, i]
                    s11 += a[r + 1, i] * b[j + 1, i]
                c[r, j], c[r, j + 1], c[r + 1, j], c[r + 1, j + 1] = s00, s01, s10, s11
        for r in range(R):  # the odd last row and column
            for j in range(cols):
                if (r < R - R % 2) and (j < cols - cols % 2):
                    continue
                s = np.float32(0)
                for i in range(m):
                    s += a[r, i] * b[j, i]
                c[r, j] = s

    @njit(fastmath=FAST, cache=True)
    def _softmax_step(scores, lo, hi, n, powers, acc_r, row_max, denom, r):
        """Row r sees keys lo..hi-1 of this block: turn its scores into weights under its running
        maximum (0 for the keys it does not see) and rescale what it has summed so far."""
        if lo >= hi:
            for j in range(n):
                scores[j] = 0.0
            return
        block_max = scores[lo]
        for j in range(lo + 1, hi):
            block_max = max(block_max, scores[j])
        new_max = max(row_max[r], block_max)
        rescale = np.exp(row_max[r] - new_max)  # shrink what was summed under the old maximum
        for d in range(acc_r.shape[0]):
            acc_r[d] *= rescale
        denom[r] = denom[r] * rescale + _exp_shifted(scores, lo, hi, new_max, powers)
        for j in range(lo):
            scores[j] = 0.0
        for j in range(hi, n):
            scores[j] = 0.0
        row_max[r] = new_max
    @njit(fastmath=FAST, cache=True)
    def _exp_shifted(x, n0, n1, shift, powers):
        """x[j] <- exp(x[j] - shift) for j in n0..n1-1 (all arguments <= 0); returns their sum.

        Cephes' expf (within 1 ulp on [-87, 0]) written as plain arithmetic so that LLVM vectorizes
        it, which a call to the libm exp prevents: exp(a) = 2^n e^r with n = round(a / ln 2), e^r a
        degree-7 polynomial on |r| <= ln2 / 2, and 2^n built from its float32 exponent bits in `powers`
        (an int32 scratch viewed as float32). Arguments below -87 are taken as -87: a weight of 1.6e-38
        instead of a smaller one, next to the row's largest weight, 1.
        """
        bits = powers.view(np.float32)
        for j in range(n0, n1):
            a = max(x[j] - shift, np.float32(-87.0))
            n = np.floor(a * np.float32(1.44269504) + np.float32(0.5))
            r = a - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
            poly = np.float32(1.9875691500e-4)
            poly = poly * r + np.float32(1.3981999507e-3)
            poly = poly * r + np.float32(8.3334519073e-3)
            poly = poly * r + np.float32(4.1665795894e-2)
            poly = poly * r + np.float32(1.6666665459e-1)
            poly = poly * r + np.float32(5.0000001201e-1)
            x[j] = poly * r * r + r + np.float32(1.0)
            powers[j] = (np.int32(n) + np.int32(127)) << np.int32(23)
        total = np.float32(0.0)
        for j in range(n0, n1):
            x[j] *= bits[j]
            total += x[j]
        return total
