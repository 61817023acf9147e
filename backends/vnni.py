"""int8 x int8 matrix products with exact int32 sums: AVX-512 VNNI where the CPU has it, a portable path elsewhere.

    y[t, o] = sum over groups g of  xs[t, g] * ws[o, g] * sum_{j in g} xq[t, j] * q[o, j]

with activations xq [T, I] int8 and scales xs [T, G] (quant.quantize_activations: per token and group of 32)
and weights q [O, I] int8 with scales ws [O, G] (int8-g32). The sum inside a group is exact (int32).

How the kernel works. `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and adds each run of four
products to one of 16 int32 lanes. The activations are the unsigned operand, shifted by 128 (xq + 128 in
0..255); each lane's accumulator starts at -128 x (the sum of its four weights), which takes the shift back
out, so every lane holds the exact dot product of four activations with four weights. One 64-byte step covers
two groups of 32 (lanes 0-7 and 8-15): the lanes are converted to float32, multiplied by the two groups'
scale products lane-wise and added to a float32 accumulator; the 16 lanes are summed once per output.
A register tile of MT tokens x MR weight rows keeps its MT x MR accumulators in registers across the whole
input (the tile's loop is emitted as one LLVM function body by a Numba intrinsic), so each 64-byte load of a
weight row serves MT tokens and each activation load serves MR rows.

The same tile with the instruction written out in generic LLVM vector IR (widen, multiply, add runs of four;
`instruction="generic"`) computes the same lanes, bit for bit the same result, on any CPU: the tests check the
whole kernel exactly with it everywhere, and against the VNNI form where the CPU has VNNI. It is not fast
without VNNI (about 12 GOP/s on 2 AVX2 cores against 50 GFLOP/s for OpenBLAS), so the backends' portable path
dequantizes into BLAS instead.

Which path a backend runs: `path()`. `REFQWEN_INT8_PATH=vnni|portable` forces one (forcing vnni on a CPU
without it is a RefqwenError, never an illegal instruction: the VNNI kernel is not even compiled there);
otherwise VNNI where `llvmlite.binding.get_host_cpu_features()` reports avx512vnni (with avx512bw and
avx512f), else portable. An input size that is not a multiple of 64 leaves a tail of fewer than 64 columns,
summed by a plain Numba loop (the same int32-per-group arithmetic).
"""

import os

import numpy as np

from refqwen import quant
from refqwen.errors import RefqwenError

try:
    import llvmlite.binding as llvm_binding
    import numba
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # the Numba backends report it (unavailable_reason)
    numba = None

PATHS = ("vnni", "portable")
ENV = "REFQWEN_INT8_PATH"
STEP = 64  # input columns per instruction: 64 bytes, two groups of 32
ROWS_PER_TASK = 16  # weight rows per parallel task (4 tiles); their scales are expanded once per task
TOKENS_PER_BLOCK = 64  # tokens whose activations stay in cache while a task's rows pass over them


def cpu_has_vnni() -> bool:
    features = llvm_binding.get_host_cpu_features()
    return bool(features.get("avx512vnni") and features.get("avx512bw") and features.get("avx512f"))


def path() -> str:
    """The int8 kernel path for this process: forced by REFQWEN_INT8_PATH, else chosen from the CPU's features."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in PATHS + ("auto",):
        raise RefqwenError(f"{ENV}={forced!r}: expected one of auto, {', '.join(PATHS)}")
    if forced == "vnni" and not cpu_has_vnni():
        raise RefqwenError(f"{ENV}=vnni but this CPU has no AVX-512 VNNI "
                           f"({llvm_binding.get_host_cpu_name()}); use {ENV}=portable or auto")
    if forced in PATHS:
        return forced
    return "vnni" if cpu_has_vnni() else "portable"


# ---- the register tile, as LLVM IR ---------------------------------------------------------------------

if numba is not None:
    I8x64, I32x16, F32x16 = ir.VectorType(ir.IntType(8), 64), ir.VectorType(ir.IntType(32), 16), \
        ir.VectorType(ir.FloatType(), 16)
    I16x64, I32x32 = ir.VectorType(ir.IntType(16), 64), ir.VectorType(ir.IntType(32), 32)

    def _load(builder, base, offset, vtype):
        """Load a vector (unaligned) at address base + offset bytes."""
        addr = builder.add(base, offset)
        return builder.load(builder.inttoptr(addr, vtype.as_pointer()), align=1)

    def _indices(values):
        """A shufflevector mask."""
        values = list(values)
        return ir.Constant(ir.VectorType(ir.IntType(32), len(values)), values)

    def _dot_vnni(builder, acc, a, b):
        """acc [16 x i32] + runs of four products of a (unsigned bytes) and b (signed bytes): vpdpbusd."""
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32x16, [I32x16] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(a, I32x16), builder.bitcast(b, I32x16)])

    def _dot_portable(builder, acc, a, b):
        """What vpdpbusd computes, in generic vector IR: widen, multiply, add each run of four products."""
        # |(0..255) x (-128..127)| <= 32640: each product is exact in int16 (the form AVX2's vpmullw/vpmaddwd take)
        products = builder.mul(builder.zext(a, I16x64), builder.sext(b, I16x64))
        pairs = [builder.sext(builder.shuffle_vector(products, products, _indices(range(k, 64, 2))), I32x32)
                 for k in range(2)]
        pairs = builder.add(pairs[0], pairs[1])  # [32 x i32]: what vpmaddwd computes
        runs = [builder.shuffle_vector(pairs, pairs, _indices(range(k, 32, 2))) for k in range(2)]
        return builder.add(acc, builder.add(runs[0], runs[1]))

    def _horizontal_sum(builder, v):
        """Sum of the 16 float lanes, by halving."""
        n = 16
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, _indices(range(n)))
            hi = builder.shuffle_vector(v, v, _indices(range(n, 2 * n)))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    def make_tile(mt: int, mr: int, dot):
        """An intrinsic computing an mt x mr tile of outputs over `steps` 64-column steps. Arguments are
        addresses and strides in bytes (int64): activations (uint8, shifted), their expanded scales [steps, 16]
        per token, weight rows (int8), the rows' expanded scales and lane corrections [steps, 16] per row,
        the output (float32). out[t * out_stride + r * 4] = the tile's sum for token t, row r."""

        @intrinsic
        def tile(typingctx, xa, x_stride, sx, sx_stride, wb, w_stride, sw, cw, c_stride, steps, out, out_stride):
            sig = types.void(*([types.int64] * 12))

            def codegen(context, builder, signature, args):
                xa, x_stride, sx, sx_stride, wb, w_stride, sw, cw, c_stride, steps, out, out_stride = args
                i64 = ir.IntType(64)
                accs = [[cgutils.alloca_once_value(builder, ir.Constant(F32x16, None)) for _ in range(mr)]
                        for _ in range(mt)]
                with cgutils.for_range(builder, steps) as loop:
                    col = builder.mul(loop.index, ir.Constant(i64, STEP))
                    lane = builder.mul(loop.index, ir.Constant(i64, 64))  # 16 four-byte lanes per step
                    a = [_load(builder, xa, builder.add(builder.mul(ir.Constant(i64, t), x_stride), col), I8x64)
                         for t in range(mt)]
                    sa = [_load(builder, sx, builder.add(builder.mul(ir.Constant(i64, t), sx_stride), lane),
                                F32x16) for t in range(mt)]
                    for r in range(mr):
                        row = builder.mul(ir.Constant(i64, r), c_stride)
                        b = _load(builder, wb, builder.add(builder.mul(ir.Constant(i64, r), w_stride), col), I8x64)
                        sb = _load(builder, sw, builder.add(row, lane), F32x16)
                        c = _load(builder, cw, builder.add(row, lane), I32x16)
                        for t in range(mt):
                            exact = dot(builder, c, a[t], b)  # each lane: an exact four-term dot product
                            scale = builder.fmul(sa[t], sb)
                            term = builder.fmul(builder.sitofp(exact, F32x16), scale, flags=("contract",))
                            acc = builder.load(accs[t][r])
                            builder.store(builder.fadd(acc, term, flags=("contract",)), accs[t][r])
                for t in range(mt):
                    for r in range(mr):
                        total = _horizontal_sum(builder, builder.load(accs[t][r]))
                        addr = builder.add(out, builder.add(builder.mul(ir.Constant(i64, t), out_stride),
                                                            ir.Constant(i64, 4 * r)))
                        builder.store(total, builder.inttoptr(addr, ir.FloatType().as_pointer()))
                return context.get_dummy_value()

            return sig, codegen

        return tile

    @njit(cache=True)
    def _expand_rows(q, scales, o0, rows, steps, sw, cw):
        """Scales [rows, steps, 16] of weight rows o0.. (each group's scale on its 8 lanes) and lane corrections
        cw = -128 x (sum of the lane's four weights), which take the activations' +128 shift back out."""
        for r in range(rows):
            for s in range(steps):
                for k in range(16):
                    sw[r, s, k] = scales[o0 + r, 2 * s + k // 8]
                    j = s * STEP + 4 * k
                    cw[r, s, k] = -128 * (np.int32(q[o0 + r, j]) + np.int32(q[o0 + r, j + 1])
                                          + np.int32(q[o0 + r, j + 2]) + np.int32(q[o0 + r, j + 3]))

    @njit(parallel=True, cache=True)
    def _tail(xq, xs, q, scales, start, y):
        """Columns start.. (fewer than 64) of y[t, o] += sum over their groups of xs ws (exact int32 group sums)."""
        T, I = xq.shape
        O = q.shape[0]
        for o in prange(O):
            for t in range(T):
                acc = np.float32(0)
                for g0 in range(start, I, 32):
                    isum = np.int32(0)
                    for j in range(g0, min(g0 + 32, I)):
                        isum += np.int32(xq[t, j]) * np.int32(q[o, j])
                    acc += np.float32(isum) * (xs[t, g0 // 32] * scales[o, g0 // 32])
                y[t, o] += acc

    def make_gemm(dot, MT, MR):
        """The parallel driver over MT x MR register tiles, for one instruction path."""
        tile_full, tile_token, tile_one = make_tile(MT, MR, dot), make_tile(1, MR, dot), make_tile(1, 1, dot)

        @njit(parallel=True)
        def gemm(xa, sx, q, scales, y):
            """xa [T, I64] uint8 (activations + 128), sx [T, I64/64, 16] float32, q [O, I] int8,
            scales [O, G] float32 -> y [T, O] float32 over the first I64 columns."""
            T, I64 = xa.shape
            O, I = q.shape
            steps = I64 // STEP
            tasks = (O + ROWS_PER_TASK - 1) // ROWS_PER_TASK
            x_stride, sx_stride, w_stride, y_stride = I64, steps * 64, I, O * 4
            for task in prange(tasks):
                o0 = task * ROWS_PER_TASK
                rows = min(ROWS_PER_TASK, O - o0)
                sw = np.empty((rows, steps, 16), np.float32)
                cw = np.empty((rows, steps, 16), np.int32)
                _expand_rows(q, scales, o0, rows, steps, sw, cw)
                for t0 in range(0, T, TOKENS_PER_BLOCK):
                    t1 = min(t0 + TOKENS_PER_BLOCK, T)
                    for r in range(0, rows, MR):
                        w_row = q[o0 + r:].ctypes.data
                        s_row, c_row = sw[r:].ctypes.data, cw[r:].ctypes.data
                        if r + MR <= rows:
                            whole = t0 + (t1 - t0) // MT * MT  # tokens covered by whole tiles
                            for t in range(t0, whole, MT):
                                tile_full(xa[t:].ctypes.data, x_stride, sx[t:].ctypes.data, sx_stride, w_row,
                                          w_stride, s_row, c_row, sx_stride, steps, y[t, o0 + r:].ctypes.data,
                                          y_stride)
                            for t in range(whole, t1):
                                tile_token(xa[t:].ctypes.data, x_stride, sx[t:].ctypes.data, sx_stride, w_row,
                                           w_stride, s_row, c_row, sx_stride, steps, y[t, o0 + r:].ctypes.data,
                                           y_stride)
                        else:  # the last rows of the matrix, one at a time
                            for rr in range(r, rows):
                                for t in range(t0, t1):
                                    tile_one(xa[t:].ctypes.data, x_stride, sx[t:].ctypes.data, sx_stride,
                                             q[o0 + rr:].ctypes.data, w_stride, sw[rr:].ctypes.data,
                                             cw[rr:].ctypes.data, sx_stride, steps, y[t, o0 + rr:].ctypes.data,
                                             y_stride)

        return gemm

INSTRUCTIONS = ("vnni", "generic")
_GEMMS = {}


def gemm_function(instruction: str):
    """The compiled driver (on first use: the VNNI one only ever on a CPU that has it, since LLVM cannot
    even select the instruction for a CPU without it)."""
    if instruction not in _GEMMS:
        if instruction not in INSTRUCTIONS:
            raise RefqwenError(f"unknown int8 instruction {instruction!r}; expected one of {INSTRUCTIONS}")
        if instruction == "vnni" and not cpu_has_vnni():
            raise RefqwenError("the VNNI int8 kernel needs a CPU with AVX-512 VNNI, not "
                               f"{llvm_binding.get_host_cpu_name()}")
        # VNNI: 4 x 4 tiles of 16-lane accumulators fill AVX-512's 32 registers; the generic form is kept
        # small so that it does not spill on a 16-register AVX2 machine.
        _GEMMS[instruction] = (make_gemm(_dot_vnni, 4, 4) if instruction == "vnni"
                               else make_gemm(_dot_portable, 2, 2))
    return _GEMMS[instruction]


def prepare_activations(xq: np.ndarray, xs: np.ndarray):
    """(xq [T, I] int8, xs [T, G]) -> the kernel's operands: xa [T, I64] uint8 = xq + 128 over the first
    I64 = I // 64 * 64 columns, and sx [T, I64/64, 16] (each group's scale on its 8 lanes)."""
    T, I = xq.shape
    steps = I // STEP
    xa = (xq[:, :steps * STEP].view(np.uint8) ^ np.uint8(128))  # two's complement + 128 = flip the top bit
    sx = np.repeat(xs[:, :2 * steps], 8, axis=1).reshape(T, steps, 16)  # [T, steps, 16]
    return np.ascontiguousarray(xa), np.ascontiguousarray(sx, np.float32)


def matmul_w8a8(xq, xs, q, scales, instruction: str = "vnni") -> np.ndarray:
    """Exact int32 group sums, float32 scales: xq [T, I] int8, xs [T, G], q [O, I] int8, scales [O, G] -> [T, O]."""
    T, I = xq.shape
    O = q.shape[0]
    if q.shape[1] != I or scales.shape != (O, -(-I // 32)) or xs.shape != (T, -(-I // 32)):
        raise RefqwenError(f"matmul_w8a8: shapes {xq.shape} x {q.shape}, scales {xs.shape} and {scales.shape} "
                           "do not match (groups of 32 along the input)")
    y = np.zeros((T, O), np.float32)
    xa, sx = prepare_activations(xq, xs)
    if xa.shape[1]:
        gemm_function(instruction)(xa, sx, np.ascontiguousarray(q), np.ascontiguousarray(scales, np.float32), y)
    if xa.shape[1] < I:
        _tail(xq, np.asarray(xs, np.float32), q, np.asarray(scales, np.float32), xa.shape[1], y)
    return y


def linear_w8a8(x: np.ndarray, weight, instruction: str = "vnni") -> np.ndarray:
    """x [T, I] float32 quantized per token and group of 32, times an int8-g32 weight -> [T, O] float32."""
    xq, xs = quant.quantize_activations(x)
    return matmul_w8a8(xq, xs, weight.q, weight.scales, instruction)
