"""Prefill's matrix products for quantized weights, in Numba's thread pool: y = x Wᵀ, x [T, I] float32.

Why not BLAS on the dequantized weight: OpenBLAS keeps its own worker threads, which spin for a while
after each call; the decode step that follows runs in Numba's pool, and the first steps after a prefill
ran at a third of their speed while the two pools fought over 2 cores (`refqwen bench` shows the first
decode steps one by one). Here everything runs in one pool.

How. Each parallel task owns PANELS panels of COLS (16) weight rows: it dequantizes them once into a
transposed float32 panel [I, 16] (exactly the values `weight.rows()` gives: q·s, or (q - z)·s for int4)
and runs the 6 × 16 register tiles of backends/float_tiles.py down the tokens, each tile summing over
the whole input. Six rows of x (6 × I floats, in L2) serve the task's PANELS panels before the next six
are read, so x is streamed from memory O / (16 · PANELS) times, not O / 16.
The sums run in another order than BLAS's: results differ from the reference's x @ Wᵀ by float32 rounding.
"""

import numpy as np

try:
    from numba import njit, prange

    from refqwen.backends.float_tiles import COLS, MT, NV, make_tile, tile_store
except ImportError:  # the backends that use this module report numba as unavailable
    njit = None

PANELS = 4  # panels of COLS weight rows per parallel task
FAST = {"reassoc", "contract"}


def matmul(x, weight) -> np.ndarray:
    """x [T, I] float32 @ the dequantized weight's rows, transposed -> [T, O]; weight a QuantizedWeight
    (int8, per channel or per group of 32) or a QuantizedInt4Weight."""
    from refqwen.quant import GROUP, QuantizedInt4Weight

    x = np.ascontiguousarray(x, np.float32)
    if isinstance(weight, QuantizedInt4Weight):
        y = np.empty((x.shape[0], weight.shape[0]), np.float32)
        _matmul_int4(x, weight.q_packed, weight.scales, weight.zeros, weight.group, y)
        return y
    y = np.empty((x.shape[0], weight.q.shape[0]), np.float32)
    scales = weight.scales if weight.scales.ndim == 2 else weight.scales[:, None]  # per channel: one "group"
    _matmul_int8(x, weight.q, scales, weight.q.shape[1] if weight.scales.ndim == 1 else GROUP, y)
    return y


if njit is not None:
    tile_row = make_tile(1, NV, accumulate=False)  # the last tokens, when fewer than MT are left

    @njit(fastmath=FAST, cache=True)
    def _pack_int8(q, scales, group, o0, n, panel):
        """panel[i, c] = q[o0 + c, i] * scales[o0 + c, i // group] for c < n, 0 beyond: [I, COLS]"""
        for c in range(COLS):
            if c < n:
                row, row_scales = q[o0 + c], scales[o0 + c]
                for g in range(row_scales.shape[0]):  # group by group: no division per weight
                    s = row_scales[g]
                    for i in range(g * group, min(g * group + group, row.shape[0])):
                        panel[i, c] = np.float32(row[i]) * s
            else:
                panel[:, c] = 0.0

    @njit(fastmath=FAST, cache=True)
    def _pack_int4(packed, scales, zeros, group, o0, n, panel):
        """panel[i, c] = (q - z) * s of weight (o0 + c, i), the low nibble holding the even column."""
        for c in range(COLS):
            if c < n:
                row, row_scales, row_zeros = packed[o0 + c], scales[o0 + c], zeros[o0 + c]
                half = group // 2  # bytes of a group
                for g in range(row_scales.shape[0]):  # group by group: no division per weight
                    z, s = np.float32(row_zeros[g]), row_scales[g]
                    for k in range(g * half, g * half + half):
                        byte = np.int32(row[k])
                        panel[2 * k, c] = (np.float32(byte & 15) - z) * s
                        panel[2 * k + 1, c] = (np.float32(byte >> 4) - z) * s
            else:
                panel[:, c] = 0.0

    @njit(cache=True)
    def _run_tiles(x, panels, n_panels, o0, O, y):
        """y[:, o0 + 16p + c] = x @ panels[p][:, c] for the task's panels, six tokens at a time."""
        T, I = x.shape
        out = np.empty((MT, COLS), np.float32)
        for t in range(0, T, MT):
            rows = min(MT, T - t)
            for p in range(n_panels):
                panel = panels[p]
                if rows == MT:
                    tile_store(x[t:].ctypes.data, I * 4, panel.ctypes.data, COLS * 4, out.ctypes.data, COLS * 4, I)
                else:  # the last tokens, one by one
                    for r in range(rows):
                        tile_row(x[t + r:].ctypes.data, I * 4, panel.ctypes.data, COLS * 4, out[r:].ctypes.data,
                                 COLS * 4, I)
                first = o0 + p * COLS
                for r in range(rows):
                    for c in range(min(COLS, O - first)):
                        y[t + r, first + c] = out[r, c]

    @njit(cache=True)
    def _task_panels(task, O, I):
        """The weight rows o0 .. of a task and room for their panels: (o0, n_panels, panels [n_panels, I, COLS])."""
        o0 = task * COLS * PANELS
        n_panels = (min(COLS * PANELS, O - o0) + COLS - 1) // COLS
        return o0, n_panels, np.empty((n_panels, I, COLS), np.float32)

    @njit(parallel=True, cache=True)
    def _matmul_int8(x, q, scales, group, y):
        O, I = q.shape
        for task in prange((O + COLS * PANELS - 1) // (COLS * PANELS)):
            o0, n_panels, panels = _task_panels(task, O, I)
            for p in range(n_panels):
                _pack_int8(q, scales, group, o0 + p * COLS, min(COLS, O - o0 - p * COLS), panels[p])
            _run_tiles(x, panels, n_panels, o0, O, y)

    @njit(parallel=True, cache=True)
    def _matmul_int4(x, packed, scales, zeros, group, y):
        O, I = packed.shape[0], packed.shape[1] * 2
        for task in prange((O + COLS * PANELS - 1) // (COLS * PANELS)):
            o0, n_panels, panels = _task_panels(task, O, I)
            for p in range(n_panels):
                _pack_int4(packed, scales, zeros, group, o0 + p * COLS, min(COLS, O - o0 - p * COLS), panels[p])
            _run_tiles(x, panels, n_panels, o0, O, y)
