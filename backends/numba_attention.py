"""Grouped-query attention over the KV cache as parallel Numba kernels, for prefill and decode.

Same semantics as `refqwen.model.attention.causal_attention` (the specification): query head h
reads key/value head h // G; the query at position i sees key j iff j <= i and, with a window,
i - j < window; softmax(q k / sqrt(D)) v with an online softmax, so memory stays bounded
(QUERY_BLOCK x G rows by KEY_BLOCK keys of scores per task, never a T x S matrix).

The kernel underneath, `attend_ranges`, is more general: query t sees the keys lo[t] .. hi[t]-1,
any contiguous range, with any logit scale, and it also returns each row's log-sum-exp. Causal
and sliding-window attention are two choices of ranges; Dual Chunk Attention (`dual_chunk_attention`)
is three calls, one per group of keys, merged by their log-sum-exp as the reference does.

Work is split into tasks (key/value head, block of QUERY_BLOCK positions): the G query heads that
share a key/value head and QUERY_BLOCK positions are R = G x QUERY_BLOCK rows that reuse every key
and value they load. Per block of KEY_BLOCK keys, the scores (rows x keys) and the weighted sum of
values (rows x head size) are matrix products done in register tiles (backends/float_tiles.py), and
between them each row's running maximum, weights and sum are updated with vectorized max and exp.
Decode (T = 1) is one task per key/value head where there are as many threads as heads; with more threads
(the 0.5B and 1.5B models have 2 key/value heads, the 7B 4) each head's keys are also cut into ranges of at
least SPLIT_KEYS, one task each, merged by their log-sum-exp (flash-decoding; `decode_splits`), so that
no thread sits idle while a long cache is read. A decode step's few rows (G <= COLS) take another route
(`_attend_few_rows`): with 7 rows, copying each block of keys transposed and of values into tile order
cost more than the products. There the scores come out transposed (keys x rows) from tiles that read the
keys where they lie in the cache, only the small block of weights is transposed, and the values are read
in place too (when the head size is a multiple of the tiles' COLS). Up to 8 rows (the demo's G = 7) take
one-vector tiles (8 keys x 8 rows for the scores, 8 rows x 8 dimensions for the values) instead of the
6 x 16 ones, whose 16 columns and 12 rows were half zeros there.
"""

import math

import numpy as np

from refqwen.model import dca
from refqwen.model.hooks import UNTRACED

try:
    from numba import get_num_threads, njit, prange

    from refqwen.backends.float_tiles import COLS, LANES, MT, make_tile, row_store, tile_add, tile_store, vector_max
    from refqwen.backends.numba_math import exp_nonpositive
    from refqwen.backends.prefetch import prefetch

    NARROW_KEYS = 8  # keys (rows) of a one-vector tile: 8 accumulators, 10 of the 16 vector registers
    narrow_store = make_tile(NARROW_KEYS, 1, accumulate=False)  # c[8, LANES] = a[8, :k] @ b[:k, LANES]
    narrow_add = make_tile(NARROW_KEYS, 1, accumulate=True)
    narrow_row_store = make_tile(1, 1, accumulate=False)
except ImportError:  # the backends that use this module report numba as unavailable
    njit = None

QUERY_BLOCK = 16  # query positions per task
KEY_BLOCK = 256  # keys per step of the online softmax (a multiple of the tiles' COLS)
KEYS_AHEAD = 24  # keys prefetched ahead of a decode query's tiles
SPLIT_KEYS = 256  # decode: the fewest keys a range of its own is worth
# Floating-point reassociation lets LLVM vectorize the sums; no "ninf"/"nnan": the masks rely on them.
FAST = {"reassoc", "contract"}
EMPTY = np.float32(-3.0e38)  # running maximum of a row that has seen no key yet


def attention(q, keys, values, start: int, window: int | None) -> np.ndarray:
    """q [T, H, D] at positions start .. start+T-1; keys, values [S, KV, D] -> [T, H, D]"""
    positions = np.arange(start, start + q.shape[0])
    out, _ = attend_ranges(q, keys, values, first_visible_key(positions, window), positions + 1, q.shape[2] ** -0.5)
    return out


def first_visible_key(positions, window: int | None):
    """The earliest key a query at each position sees (the causal mask's lower end; 0 without a window)."""
    return np.maximum(0, positions - window + 1) if window is not None else np.zeros_like(positions)


def attend_ranges(q, keys, values, lo, hi, scale: float, splits: int | None = None):
    """softmax(scale q k) v where query t [of q, T x H x D] sees keys lo[t] .. hi[t]-1 of keys, values [S, KV, D].
    -> (out [T, H, D], lse [T, H]); a query that sees no key gets out 0 and lse -inf. `splits`: for one query,
    the ranges each key/value head's keys are cut into (default: decode_splits)."""
    q = np.ascontiguousarray(q, np.float32)
    keys, values = np.ascontiguousarray(keys, np.float32), np.ascontiguousarray(values, np.float32)
    lo, hi = np.ascontiguousarray(lo, np.int64), np.ascontiguousarray(hi, np.int64)
    out, lse = np.empty_like(q), np.empty(q.shape[:2], np.float32)
    if splits is None:
        splits = decode_splits(int(hi[0] - lo[0]), keys.shape[1]) if q.shape[0] == 1 else 1
    _attention_kernel(q, keys, values, lo, hi, np.float32(scale), splits, out, lse)
    return out, lse


def decode_splits(keys: int, kv_heads: int) -> int:
    """Ranges each key/value head's keys are cut into for one query: enough for every thread to have a task
    (KV tasks leave threads idle where there are more), each of SPLIT_KEYS keys at least."""
    return max(1, min(-(-get_num_threads() // kv_heads), keys // SPLIT_KEYS))


def dual_chunk_attention(q, keys, values, start: int, inv_freq, attention_factor: float, cfg, hook=UNTRACED):
    """refqwen.model.dca.dual_chunk_attention with each group's attention in the kernel: the same three
    rotations of the queries, the same key ranges, merged by log-sum-exp.  -> [T, H, D]"""
    T, D = q.shape[0], q.shape[2]
    positions = np.arange(start, start + T)
    scale = dca.length_temperature(keys.shape[0], cfg) ** 2 / math.sqrt(D)
    ranges, outs, lses = dca.group_ranges(positions, cfg), [], []
    for name, rotate_by in dca.query_positions(positions, cfg).items():
        lo, hi = ranges[name]
        out, lse = attend_ranges(dca.rotate_queries(q, rotate_by, inv_freq, attention_factor), keys, values,
                                 lo, hi, scale)
        outs.append(hook(f"dca_{name}", out))
        lses.append(lse)
    return dca.merge_by_lse(outs, lses)


def warm_up():
    """Compile (or load from Numba's cache) the kernel."""
    x = np.ones((1, 1, 2), np.float32)
    one = np.ones(1, np.int64)
    _attention_kernel(x, x, x, one * 0, one, np.float32(1), 1, np.empty_like(x), np.empty((1, 1), np.float32))


if njit is not None:

    @njit(cache=True)
    def _balanced_block(task, n_blocks):
        """Query block of a task, interleaving short (early) and long (late) blocks: with static
        scheduling each thread then gets a similar share of the causal triangle."""
        half = task // 2
        return half if task % 2 == 0 else n_blocks - 1 - half

    @njit(inline="always", cache=True)
    def _prefetch_rows(address, stride, j0, j1, D):
        """Prefetch rows j0 .. j1-1 of D float32 each, `stride` bytes apart from `address` (backends/prefetch.py)."""
        for j in range(j0, j1):
            for b in range(0, 4 * D, 64):
                prefetch(address + j * stride + b)

    @njit(cache=True)
    def _round_up(n, m):
        return (n + m - 1) // m * m

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _attention_kernel(q, k, v, lo, hi, scale, splits, out, lse):
        T, H, D = q.shape
        KV = k.shape[1]
        G = H // KV
        if T == 1 and G <= COLS and splits > 1:
            _attend_in_splits(q, k, v, lo, hi, scale, splits, out, lse)
            return
        n_blocks = (T + QUERY_BLOCK - 1) // QUERY_BLOCK
        for task in prange(KV * n_blocks):
            kv = task % KV
            t0 = _balanced_block(task // KV, n_blocks) * QUERY_BLOCK
            t1 = min(t0 + QUERY_BLOCK, T)
            if (t1 - t0) * G <= COLS:
                _attend_few_rows(q, k, v, lo, hi, scale, kv, G, t0, t1, lo[t0:t1].min(), hi[t0:t1].max(), out, lse)
            else:
                _attend_rows(q, k, v, lo, hi, scale, kv, G, t0, t1, out, lse)

    @njit(parallel=True, fastmath=FAST, cache=True)
    def _attend_in_splits(q, k, v, lo, hi, scale, splits, out, lse):
        """One query (T = 1) with each key/value head's keys lo[0]..hi[0]-1 cut into `splits` ranges: KV x splits
        tasks, each range's softmax on its own, merged by log-sum-exp (flash-decoding)."""
        H, D = q.shape[1], q.shape[2]
        KV = k.shape[1]
        G = H // KV
        parts_out, parts_lse = np.empty((splits, 1, H, D), np.float32), np.empty((splits, 1, H), np.float32)
        for task in prange(KV * splits):
            kv, part = task % KV, task // KV
            a = lo[0] + (hi[0] - lo[0]) * part // splits
            b = lo[0] + (hi[0] - lo[0]) * (part + 1) // splits
            _attend_few_rows(q, k, v, lo, hi, scale, kv, G, 0, 1, a, b, parts_out[part], parts_lse[part])
        _merge_by_lse(parts_out, parts_lse, out, lse)

    @njit(fastmath=FAST, cache=True)
    def _attend_rows(q, k, v, lo, hi, scale, kv, G, t0, t1, out, lse):
        """Rows r = (t - t0) * G + g: query position t, query head kv * G + g. Arrays are padded with zeros
        to whole register tiles: rows to Rp, head size to Dp, a block's keys to n_cols."""
        D = q.shape[2]
        R, Rp, Dp = (t1 - t0) * G, _round_up((t1 - t0) * G, MT), _round_up(D, COLS)
        qs = np.zeros((Rp, Dp), np.float32)  # scaled queries
        _gather_queries(q, scale, kv, G, t0, R, qs)
        acc, row_max, denom = _running_sums(Rp, Dp)
        kt = np.zeros((Dp, KEY_BLOCK), np.float32)  # one block of keys, transposed
        vb = np.zeros((KEY_BLOCK, Dp), np.float32)  # the block's values
        p = np.zeros((Rp, KEY_BLOCK), np.float32)  # scores, then softmax weights
        first, last = lo[t0:t1].min(), hi[t0:t1].max()  # keys any row here sees: first .. last-1
        for s0 in range(first, last, KEY_BLOCK):
            n = min(KEY_BLOCK, last - s0)
            n_cols = _round_up(n, COLS)
            _copy_block(k[s0:s0 + n, kv], v[s0:s0 + n, kv], kt, vb, n_cols)
            _matmul(qs, kt, p, Rp, n_cols, Dp, False)  # p[r, j] = qs[r] . k[s0 + j]
            _softmax_rows(p, lo, hi, s0, n, n_cols, t0, G, R, acc, row_max, denom)
            _matmul(p, vb, acc, Rp, Dp, n_cols, True)  # acc[r, d] += sum_j p[r, j] v[s0 + j, d]
        _write_rows(acc, row_max, denom, kv, G, t0, R, out, lse)

    @njit(fastmath=FAST, cache=True)
    def _attend_few_rows(q, k, v, lo, hi, scale, kv, G, t0, t1, first, last, out, lse):
        """_attend_rows for R <= COLS rows, over keys first..last-1 of their ranges, reading keys (and values,
        when D is a multiple of COLS) in place."""
        D = q.shape[2]
        R, Rp, Dp = (t1 - t0) * G, _round_up((t1 - t0) * G, MT), _round_up(D, COLS)
        # up to 8 rows (a decode step's G <= 8 heads): one-vector tiles, without the 16-column tiles' zeros
        narrow = R <= LANES
        if narrow:
            Rp = max(Rp, NARROW_KEYS)  # the values' tiles take 8 rows of weights
        qt = np.zeros((D, COLS), np.float32)  # scaled queries, transposed: row r is column r
        _gather_queries(q, scale, kv, G, t0, R, qt.T)
        acc, row_max, denom = _running_sums(Rp, Dp)
        pt = np.empty((KEY_BLOCK, COLS), np.float32)  # scores, keys x rows
        p = np.zeros((Rp, KEY_BLOCK), np.float32)  # the same, rows x keys, then softmax weights
        values_in_place = D % COLS == 0  # else a tile's last columns would read past the head
        vb = np.zeros((0 if values_in_place else KEY_BLOCK, Dp), np.float32)
        ks, vs, row = k.strides[0], v.strides[0], 4 * COLS
        keys_per_tile = NARROW_KEYS if narrow else MT
        for s0 in range(first, last, KEY_BLOCK):
            n = min(KEY_BLOCK, last - s0)
            keys, values = k[s0, kv].ctypes.data, v[s0, kv].ctypes.data  # key s0 + j: j * ks bytes further
            whole = n // keys_per_tile * keys_per_tile
            for j in range(0, whole, keys_per_tile):  # pt[j, r] = k[s0 + j] . qs[r]
                # decode reads each layer's cache once, out of cache: ask for the keys KEYS_AHEAD on and for
                # this tile's values (read after the block's softmax) before the loads wait on them
                _prefetch_rows(keys, ks, j + KEYS_AHEAD, min(j + KEYS_AHEAD + keys_per_tile, last - s0), D)
                _prefetch_rows(values, vs, j, j + keys_per_tile, D)
                if narrow:
                    narrow_store(keys + j * ks, ks, qt.ctypes.data, row, pt[j:].ctypes.data, row, D)
                else:
                    tile_store(keys + j * ks, ks, qt.ctypes.data, row, pt[j:].ctypes.data, row, D)
            for j in range(whole, n):
                if narrow:
                    narrow_row_store(keys + j * ks, ks, qt.ctypes.data, row, pt[j:].ctypes.data, row, D)
                else:
                    row_store(keys + j * ks, ks, qt.ctypes.data, row, pt[j:].ctypes.data, row, D)
            for r in range(R):
                for j in range(n):
                    p[r, j] = pt[j, r]
            _softmax_rows(p, lo, hi, s0, n, _round_up(n, COLS), t0, G, R, acc, row_max, denom)
            if not values_in_place:
                vb[:n, :D] = v[s0:s0 + n, kv]
            source, stride = (values, vs) if values_in_place else (vb.ctypes.data, vb.strides[0])
            if narrow:  # acc[r, d] += sum_j p[r, j] v[s0 + j, d], rows 0..7 in one-vector tiles
                for d in range(0, Dp, LANES):
                    narrow_add(p.ctypes.data, p.strides[0], source + 4 * d, stride, acc[0, d:].ctypes.data,
                               acc.strides[0], n)
            else:
                _matmul_at(p.ctypes.data, p.strides[0], source, stride, acc.ctypes.data, acc.strides[0], Rp, Dp, n)
        _write_rows(acc, row_max, denom, kv, G, t0, R, out, lse)

    @njit(fastmath=FAST, cache=True)
    def _merge_by_lse(parts_out, parts_lse, out, lse):
        """out [T, H, D], lse [T, H] of one softmax over the union of the parts' keys, from each part's own
        (parts_out [P, T, H, D], parts_lse [P, T, H]; a part that saw no key has lse -inf: weight 0)."""
        P, T, H, D = parts_out.shape
        for t in range(T):
            for h in range(H):
                top = parts_lse[:, t, h].max()
                out[t, h] = 0.0
                if top == -np.inf:
                    lse[t, h] = -np.inf
                    continue
                total = np.float32(0.0)
                for part in range(P):
                    weight = np.exp(parts_lse[part, t, h] - top)
                    total += weight
                    for d in range(D):
                        out[t, h, d] += weight * parts_out[part, t, h, d]
                for d in range(D):
                    out[t, h, d] /= total
                lse[t, h] = top + np.log(total)

    @njit(fastmath=FAST, cache=True)
    def _gather_queries(q, scale, kv, G, t0, R, qs):
        """qs[r, :D] = scale * query row r (position t0 + r // G, head kv * G + r % G)."""
        for r in range(R):
            for d in range(q.shape[2]):
                qs[r, d] = q[t0 + r // G, kv * G + r % G, d] * scale

    @njit(cache=True)
    def _running_sums(Rp, Dp):
        """(weighted sums of values [Rp, Dp], running maximum [Rp], softmax denominator [Rp]), all empty."""
        return np.zeros((Rp, Dp), np.float32), np.full(Rp, EMPTY, np.float32), np.zeros(Rp, np.float32)

    @njit(fastmath=FAST, cache=True)
    def _softmax_rows(p, lo, hi, s0, n, n_cols, t0, G, R, acc, row_max, denom):
        """One softmax step for every row of p over keys s0 .. s0+n-1 (the padding rows from R on see none)."""
        for r in range(p.shape[0]):
            t = t0 + r // G
            a = max(lo[t], s0) - s0 if r < R else 0
            b = min(hi[t], s0 + n) - s0 if r < R else 0
            _softmax_step(p[r], a, b, n_cols, acc[r], row_max, denom, r)

    @njit(fastmath=FAST, cache=True)
    def _write_rows(acc, row_max, denom, kv, G, t0, R, out, lse):
        """out and lse of rows 0..R-1 from their running sums."""
        D = out.shape[2]
        for r in range(R):
            t, h = t0 + r // G, kv * G + r % G
            seen = denom[r] > 0
            for d in range(D):
                out[t, h, d] = acc[r, d] / denom[r] if seen else 0.0
            lse[t, h] = row_max[r] + np.log(denom[r]) if seen else -np.inf

    @njit(cache=True)
    def _matmul_at(a0, sa, b0, sb, c0, sc, rows, cols, inner):
        """c[:rows, :cols] += a[:rows, :inner] @ b[:inner, :cols], by addresses and row strides in bytes."""
        for r in range(0, rows, MT):
            for j in range(0, cols, COLS):
                tile_add(a0 + r * sa, sa, b0 + 4 * j, sb, c0 + r * sc + 4 * j, sc, inner)

    @njit(fastmath=FAST, cache=True)
    def _copy_block(keys, values, kt, vb, n_cols):
        """kt[:, :n] = keys [n, D] transposed, vb[:n] = values; zeros up to n_cols (weighted 0 anyway)."""
        n, D = keys.shape
        for j in range(n):
            key = keys[j]
            for d in range(D):
                kt[d, j] = key[d]
            vb[j, :D] = values[j]
        kt[:, n:n_cols] = 0.0
        vb[n:n_cols] = 0.0

    @njit(cache=True)
    def _matmul(a, b, c, rows, cols, inner, accumulate):
        """c[:rows, :cols] (+)= a[:rows, :inner] @ b[:inner, :cols] in whole register tiles (rows a multiple
        of MT, cols of COLS); a, b, c C-contiguous float32."""
        a0, b0, c0 = a.ctypes.data, b.ctypes.data, c.ctypes.data
        sa, sb, sc = a.strides[0], b.strides[0], c.strides[0]
        for r in range(0, rows, MT):
            for j in range(0, cols, COLS):
                if accumulate:
                    tile_add(a0 + r * sa, sa, b0 + 4 * j, sb, c0 + r * sc + 4 * j, sc, inner)
                else:
                    tile_store(a0 + r * sa, sa, b0 + 4 * j, sb, c0 + r * sc + 4 * j, sc, inner)

    @njit(fastmath=FAST, cache=True)
    def _row_max(x, lo, hi):
        """max of x[lo:hi] (hi > lo): whole vectors in the intrinsic, the rest one by one."""
        whole = (hi - lo) // LANES
        best = vector_max(x[lo:].ctypes.data, whole, x[lo])
        for j in range(lo + whole * LANES, hi):
            best = max(best, x[j])
        return best

    @njit(fastmath=FAST, cache=True)
    def _softmax_step(scores, lo, hi, n, acc_r, row_max, denom, r):
        """Row r sees keys lo..hi-1 of this block: turn its scores into weights under its running
        maximum (0 for the keys it does not see) and rescale what it has summed so far."""
        if lo >= hi:
            scores[:n] = 0.0
            return
        block_max = _row_max(scores, lo, hi)
        new_max = max(row_max[r], block_max)
        if new_max > row_max[r]:  # shrink what was summed under the old maximum
            rescale = np.exp(row_max[r] - new_max)
            acc_r *= rescale
            denom[r] *= rescale
        denom[r] += _exp_shifted(scores[lo:hi], new_max)
        scores[:lo] = 0.0
        scores[hi:n] = 0.0
        row_max[r] = new_max

    @njit(fastmath=FAST, cache=True)
    def _exp_shifted(x, shift):
        """x <- exp(x - shift) (all arguments <= 0); returns the sum. The loop runs from 0: LLVM does not
        vectorize a loop whose index might be negative (Numba wraps negative indices around)."""
        total = np.float32(0.0)
        for j in range(x.shape[0]):
            x[j] = exp_nonpositive(x[j] - shift)
            total += x[j]
        return total
