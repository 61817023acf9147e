"""Decode GEMVs over integer weights, one token at a time, as LLVM IR: int4 x int8 (numba-w4a8), int8 x int8
(numba-w8a8), and int8 x float32 (numba-int8; at the end). For the first two the token's activations are
quantized per group of 32 (xq int8, scales xs; bit for bit quant.quantize_activations) and every group's dot
product is summed exactly in int32.

int4 x int8:

    y[o] = sum over groups g of  ws[o, g] * sum_{j in g} (q[o, j] - z[o, g]) * xs[a(j)] * xq[j]

with weights q 0..15 packed two per byte, scales ws and zero points z per row and group of 32 or 128
(refqwen/quant.py, int4-g32 / int4-g128), and activations xq int8 with scales xs per group a(j) of 32
(quant.quantize_activations). Split as

    y[o] = sum_g ws[o, g] xs[g] D[o, g]  -  sum_g ws[o, g] z[o, g] X[g]

where D is the exact int32 dot product of the nibbles with the activations over a group and X[g] is the sum
of the dequantized activations over the weight group (computed once per token): the zero points never enter
the inner loop.

Why int8 activations: with float32 activations every weight costs an unpack, a conversion, a subtraction and
a multiply-add, about 0.7 vector instructions per weight, so the old numba-int4 GEMV was bound by arithmetic at
about half numba-int8's speed although it reads half the bytes. Here one step covers 64 weights (32 packed
bytes, two groups of 32 activations) with about 15 instructions: mask and shift out the two nibble vectors,
`vpmaddubsw` each against 32 activations (unsigned nibble x signed byte, adjacent products summed into int16:
at most 2 x 15 x 127 per lane, so never saturated, and the two sums added still fit), `vpmaddwd` by ones
into 8 int32 lanes of four columns each (4 lanes per group of 32), convert, and one multiply-add by the lanes'
scales ws[o, g] xs[g]. This is llama.cpp's Q4 x Q8 recipe; it leaves the GEMV bound by memory again.

int8 x int8 (int8-g32 weights, |q| <= 127 as quant.quantize writes them, or -128 from another writer):

    y[o] = sum_g ws[o, g] xs[g] sum_{j in g} q[o, j] xq[j]

with the same instructions: `vpmaddubsw` wants one unsigned operand, so it takes |q| (`vpabsb`; -128 reads
as unsigned 128, still right) against xq with q's sign moved onto it (`vpsignb`; xq is never -128). One
step is one group of 32: ~8 instructions per 32 weights against ~16 for float activations.

The same steps in generic LLVM vector IR (widen to int16, multiply, add adjacent pairs; `instruction="generic"`)
compute the same integers, hence bit for bit the same result, on any CPU; the AVX2 instructions are used only
where `llvmlite.binding.get_host_cpu_features()` reports avx2 (LLVM could not even select them elsewhere).

int8 x float32 (int8-g32 weights, numba-int8's float activations):

    y[o] = sum_g ws[o, g] sum_{j in g} q[o, j] x[j]

per group: the 32 weights widened to float, the four 8-lane products with x summed by multiply-adds, then
one multiply-add by the group's scale into the row's 8 accumulators: 13 vector instructions per 32
weights, where a plain Numba loop scaled every product (16) and kept its 32 lanes in memory. In float32,
summed in another order than the reference's (as every float GEMV here).
"""

import functools
import os
import types as pytypes

import numpy as np

from refqwen.errors import RefqwenError

try:
    import llvmlite.binding as llvm_binding
    from llvmlite import ir
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from refqwen.backends.numba_quant import int8_scale, to_int8
    from refqwen.backends.prefetch import AHEAD, emit_prefetch
except ImportError:  # the Numba backends report it (unavailable_reason)
    njit = None

INSTRUCTIONS = ("avx2", "generic")
STEP_BYTES = 32  # packed bytes per step: 64 weights, two activation groups of 32


def target_has_avx2() -> bool:
    """Whether Numba compiles for a CPU with AVX2: this one, or the one NUMBA_CPU_NAME names (with the
    features NUMBA_CPU_FEATURES lists), as for code cached to run on other machines."""
    return _has_avx2(os.environ.get("NUMBA_CPU_NAME", "host"), os.environ.get("NUMBA_CPU_FEATURES", ""))


@functools.cache  # asking LLVM for the host's features takes ~0.2 ms: too long for every GEMV
def _has_avx2(cpu_name: str, cpu_features: str) -> bool:
    if cpu_name != "host":
        return "+avx2" in cpu_features.split(",")
    return bool(llvm_binding.get_host_cpu_features().get("avx2"))


def instruction() -> str:
    """The instruction set the GEMV runs with here."""
    return "avx2" if target_has_avx2() else "generic"


if njit is not None:
    I8x32, I16x16, I16x32 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 16), \
        ir.VectorType(ir.IntType(16), 32)
    I32x8, I32x16, F32x2, F32x8 = ir.VectorType(ir.IntType(32), 8), ir.VectorType(ir.IntType(32), 16), \
        ir.VectorType(ir.FloatType(), 2), ir.VectorType(ir.FloatType(), 8)
    F32x32 = ir.VectorType(ir.FloatType(), 32)
    I64 = ir.IntType(64)
    ahead = ir.Constant(I64, AHEAD)  # bytes: backends/prefetch.py

    def _indices(values):
        """A shufflevector mask."""
        values = list(values)
        return ir.Constant(ir.VectorType(ir.IntType(32), len(values)), values)

    def _load(builder, base, offset, vtype, align=1):
        return builder.load(builder.inttoptr(builder.add(base, offset), vtype.as_pointer()), align=align)

    def _adjacent_sums(builder, v, n):
        """[n x iK] -> [n/2 x iK]: v[0] + v[1], v[2] + v[3], ..."""
        return builder.add(builder.shuffle_vector(v, v, _indices(range(0, n, 2))),
                           builder.shuffle_vector(v, v, _indices(range(1, n, 2))))

    def _pairs_generic(builder, u, s):
        """u [32 x i8] unsigned, s [32 x i8] signed -> [16 x i16] sums of adjacent products."""
        return _adjacent_sums(builder, builder.mul(builder.zext(u, I16x32), builder.sext(s, I16x32)), 32)

    def _quads_generic(builder, p):
        """[16 x i16] -> [8 x i32] sums of adjacent pairs."""
        return _adjacent_sums(builder, builder.sext(p, I32x16), 16)

    def _pairs_avx2(builder, u, s):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I16x16, [I8x32, I8x32]),
                                            "llvm.x86.avx2.pmadd.ub.sw")
        return builder.call(fn, [u, s])

    def _quads_avx2(builder, p):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I32x8, [I16x16, I16x16]),
                                            "llvm.x86.avx2.pmadd.wd")
        return builder.call(fn, [p, ir.Constant(I16x16, [1] * 16)])

    def _signed_pairs_generic(builder, w, x):
        """w, x [32 x i8] signed -> [16 x i16] sums of adjacent products."""
        return _adjacent_sums(builder, builder.mul(builder.sext(w, I16x32), builder.sext(x, I16x32)), 32)

    def _signed_pairs_avx2(builder, w, x):
        """The same with vpmaddubsw: |w| (unsigned) against x carrying w's sign."""
        absolute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I8x32, [I8x32, ir.IntType(1)]),
                                                  "llvm.abs.v32i8")
        sign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(I8x32, [I8x32, I8x32]),
                                              "llvm.x86.avx2.psign.b")
        return _pairs_avx2(builder, builder.call(absolute, [w, ir.Constant(ir.IntType(1), 0)]),
                           builder.call(sign, [x, w]))

    def _lane_sum(builder, v):
        """The sum of a [8 x float], by halving."""
        n = 8
        while n > 1:
            n //= 2
            v = builder.fadd(builder.shuffle_vector(v, v, _indices(range(n))),
                             builder.shuffle_vector(v, v, _indices(range(n, 2 * n))))
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    def _splat(builder, value):
        v = builder.insert_element(ir.Constant(F32x8, None), value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, v, _indices([0] * 8))

    def _weight_scales(builder, ws, step, group):
        """The weight scale of each of a step's 8 lanes: lanes 0-3 and 4-7 are the step's two groups of 32."""
        if group == 32:
            two = _load(builder, ws, builder.mul(step, ir.Constant(I64, 8)), F32x2, 4)  # ws[2 step], ws[2 step + 1]
            return builder.shuffle_vector(two, two, _indices([0] * 4 + [1] * 4))
        one = _load(builder, ws, builder.mul(builder.udiv(step, ir.Constant(I64, group // 64)), ir.Constant(I64, 4)),
                    ir.FloatType(), 4)  # the step lies inside one group of 128
        return _splat(builder, one)

    def make_row_dot(pairs, quads, group: int):
        """The intrinsic  sum_g ws[g] xs[g] D[g]  for one packed row (float32)."""

        @intrinsic
        def row_dot(typingctx, packed, ws, x_even, x_odd, xs, steps):
            """Addresses of the row's packed bytes, its scales, the even and odd activations (int8) and their
            scales; `steps` of 32 bytes."""
            sig = types.float32(*([types.int64] * 6))

            def codegen(context, builder, signature, args):
                packed, ws, x_even, x_odd, xs, steps = args
                acc = cgutils.alloca_once_value(builder, ir.Constant(F32x8, None))
                nibble = ir.Constant(I8x32, [15] * 32)
                with cgutils.for_range(builder, steps) as loop:
                    offset = builder.mul(loop.index, ir.Constant(I64, STEP_BYTES))
                    emit_prefetch(builder, builder.add(packed, builder.add(offset, ahead)))  # backends/prefetch.py
                    q = _load(builder, packed, offset, I8x32)
                    low = builder.and_(q, nibble)  # even columns
                    high = builder.and_(builder.lshr(q, ir.Constant(I8x32, [4] * 32)), nibble)  # odd columns
                    p = builder.add(pairs(builder, low, _load(builder, x_even, offset, I8x32)),
                                    pairs(builder, high, _load(builder, x_odd, offset, I8x32)))
                    dots = builder.sitofp(quads(builder, p), F32x8)  # each lane: 8 columns of one group, exact
                    two = _load(builder, xs, builder.mul(loop.index, ir.Constant(I64, 8)), F32x2, 4)
                    scale = builder.fmul(_weight_scales(builder, ws, loop.index, group),
                                         builder.shuffle_vector(two, two, _indices([0] * 4 + [1] * 4)))
                    term = builder.fmul(dots, scale, flags=("contract",))
                    builder.store(builder.fadd(builder.load(acc), term, flags=("contract",)), acc)
                return _lane_sum(builder, builder.load(acc))

            return sig, codegen

        return row_dot

    def make_int8_row_dot(signed_pairs, quads):
        """The intrinsic  sum_g ws[g] xs[g] sum_{j in g} q[j] xq[j]  over `steps` whole groups of 32 of one
        int8 row (float32); arguments are the addresses of q, ws, xq, xs."""

        @intrinsic
        def row_dot(typingctx, q, ws, xq, xs, steps):
            sig = types.float32(*([types.int64] * 5))

            def codegen(context, builder, signature, args):
                q, ws, xq, xs, steps = args
                acc = cgutils.alloca_once_value(builder, ir.Constant(F32x8, None))
                with cgutils.for_range(builder, steps) as loop:
                    offset = builder.mul(loop.index, ir.Constant(I64, 32))
                    emit_prefetch(builder, builder.add(q, builder.add(offset, ahead)))
                    p = signed_pairs(builder, _load(builder, q, offset, I8x32), _load(builder, xq, offset, I8x32))
                    dots = builder.sitofp(quads(builder, p), F32x8)  # each lane: 4 columns, exact
                    at = builder.mul(loop.index, ir.Constant(I64, 4))
                    scale = builder.fmul(_load(builder, ws, at, ir.FloatType(), 4),
                                         _load(builder, xs, at, ir.FloatType(), 4))
                    term = builder.fmul(dots, _splat(builder, scale), flags=("contract",))
                    builder.store(builder.fadd(builder.load(acc), term, flags=("contract",)), acc)
                return _lane_sum(builder, builder.load(acc))

            return sig, codegen

        return row_dot

    def make_float_row_dot():
        """The intrinsic  sum_g ws[g] sum_{j in g} q[j] x[j]  over `steps` whole groups of 32 of one int8 row
        and float32 activations x (float32); arguments are the addresses of q, ws, x."""

        @intrinsic
        def row_dot(typingctx, q, ws, x, steps):
            sig = types.float32(*([types.int64] * 4))

            def codegen(context, builder, signature, args):
                q, ws, x, steps = args
                acc = cgutils.alloca_once_value(builder, ir.Constant(F32x8, None))
                with cgutils.for_range(builder, steps) as loop:
                    offset = builder.mul(loop.index, ir.Constant(I64, 32))
                    emit_prefetch(builder, builder.add(q, builder.add(offset, ahead)))
                    w = builder.sitofp(_load(builder, q, offset, I8x32), F32x32)
                    v = _load(builder, x, builder.mul(offset, ir.Constant(I64, 4)), F32x32, 4)
                    dot = None
                    for k in range(4):  # the group's four 8-lane quarters, summed by multiply-adds
                        lanes = _indices(range(8 * k, 8 * k + 8))
                        part = builder.fmul(builder.shuffle_vector(w, w, lanes), builder.shuffle_vector(v, v, lanes),
                                            flags=("contract",))
                        dot = part if dot is None else builder.fadd(dot, part, flags=("contract",))
                    scale = _load(builder, ws, builder.mul(loop.index, ir.Constant(I64, 4)), ir.FloatType(), 4)
                    term = builder.fmul(dot, _splat(builder, scale), flags=("contract",))
                    builder.store(builder.fadd(builder.load(acc), term, flags=("contract",)), acc)
                return _lane_sum(builder, builder.load(acc))

            return sig, codegen

        return row_dot

    @njit(cache=True)
    def quantize_token(x, group, x_even, x_odd, xs, x_sums):
        """x [I] float32 -> int8 halves x_even, x_odd [I/2], scales xs [I/32] (as quant.quantize_activations)
        and x_sums [I/group] (dequantized values summed per weight group): the int4 GEMV's operands."""
        x_sums[:] = 0
        for a in range(x.shape[0] // 32):
            s = int8_scale(x, 32 * a, 32 * a + 32)
            total = 0
            for k in range(32):
                v = to_int8(x[32 * a + k], s)
                total += np.int32(v)
                if k % 2 == 0:
                    x_even[16 * a + k // 2] = v
                else:
                    x_odd[16 * a + k // 2] = v
            xs[a] = s
            x_sums[a * 32 // group] += s * np.float32(total)

    @njit(cache=True)
    def quantize_row(x, xq, xs):
        """x [I] float32 -> xq [I] int8, xs [ceil(I/32)] (as quant.quantize_activations; the last group may be
        shorter): the int8 GEMV's operands."""
        I = x.shape[0]
        for a in range(xs.shape[0]):
            b = min(32 * a + 32, I)
            s = int8_scale(x, 32 * a, b)
            for j in range(32 * a, b):
                xq[j] = to_int8(x[j], s)
            xs[a] = s

    row_dot32 = make_row_dot(_pairs_generic, _quads_generic, 32)
    row_dot128 = make_row_dot(_pairs_generic, _quads_generic, 128)

    def gemv_rows(packed, ws, zeros, group, x_even, x_odd, xs, x_sums, y):
        """packed [O, I/2] uint8, ws [O, G] float32, zeros [O, G] uint8, x_even/x_odd [I/2] int8 (xq[0::2],
        xq[1::2]), xs [I/32] float32, x_sums [G] (dequantized activations summed per weight group) -> y [O]"""
        O, H = packed.shape
        G = ws.shape[1]
        steps = H // STEP_BYTES
        for o in prange(O):
            shift = np.float32(0)
            for g in range(G):
                shift += ws[o, g] * np.float32(zeros[o, g]) * x_sums[g]
            args = (packed[o].ctypes.data, ws[o].ctypes.data, x_even.ctypes.data, x_odd.ctypes.data,
                    xs.ctypes.data, steps)
            total = (row_dot32(*args) if group == 32 else row_dot128(*args)) - shift
            if steps * STEP_BYTES < H:  # an odd number of groups of 32: the last one here
                exact = np.int32(0)
                for k in range(steps * STEP_BYTES, H):
                    byte = np.int32(packed[o, k])
                    exact += (byte & 15) * np.int32(x_even[k]) + (byte >> 4) * np.int32(x_odd[k])
                total += np.float32(exact) * (ws[o, G - 1] * xs[G - 1])
            y[o] = total

    def gemv_token(x, w, y):
        """x [I] float32: quantized here, then the GEMV of w = (packed, ws, zeros, group): one call from Python
        per token and matrix."""
        packed, ws, zeros, group = w
        I = x.shape[0]
        x_even, x_odd = np.empty(I // 2, np.int8), np.empty(I // 2, np.int8)
        xs, x_sums = np.empty(I // 32, np.float32), np.empty(I // group, np.float32)
        quantize_token(x, group, x_even, x_odd, xs, x_sums)
        gemv_rows(packed, ws, zeros, group, x_even, x_odd, xs, x_sums, y)

    int8_row_dot = make_int8_row_dot(_signed_pairs_generic, _quads_generic)

    def gemv8_rows(q, ws, xq, xs, y):
        """q [O, I] int8, ws [O, G] float32, xq [I] int8, xs [G] float32 -> y [O]; the last group may be shorter."""
        O, I = q.shape
        full = I // 32
        for o in prange(O):
            total = int8_row_dot(q[o].ctypes.data, ws[o].ctypes.data, xq.ctypes.data, xs.ctypes.data, full)
            if full * 32 < I:
                exact = np.int32(0)
                for j in range(full * 32, I):
                    exact += np.int32(q[o, j]) * np.int32(xq[j])
                total += np.float32(exact) * (ws[o, full] * xs[full])
            y[o] = total

    def gemv8_token(x, w, y):
        """x [I] float32: quantized here, then the int8 GEMV of w = (q, ws)."""
        q, ws = w
        xq, xs = np.empty(x.shape[0], np.int8), np.empty(ws.shape[1], np.float32)
        quantize_row(x, xq, xs)
        gemv8_rows(q, ws, xq, xs, y)

    float_row_dot = make_float_row_dot()

    def gemvf_rows(q, ws, x, y):
        """q [O, I] int8, ws [O, G] float32, x [I] float32 -> y [O]; the last group may be shorter."""
        O, I = q.shape
        full = I // 32
        for o in prange(O):
            total = float_row_dot(q[o].ctypes.data, ws[o].ctypes.data, x.ctypes.data, full)
            for j in range(full * 32, I):
                total += np.float32(q[o, j]) * x[j] * ws[o, full]
            y[o] = total

    def gemvf_token(x, w, y):
        """gemvf_rows with the decode kernels' arguments: x [I], w = (q, ws), y [O]."""
        gemv_float_rows(w[0], w[1], x, y)

    def _compile(function, name: str, **bound):
        """`function` compiled with the names in `bound` as its globals, under its own name. Plain functions
        with their own globals, not closures: Numba's disk cache does not keep closures (each process
        compiled them again, 2-3 s)."""
        specialized = pytypes.FunctionType(function.__code__, {**function.__globals__, **bound}, function.__name__)
        specialized.__qualname__ = f"{function.__qualname__}_{name}"  # the cache tells functions apart by name
        return njit(parallel="prange" in function.__code__.co_names, fastmath={"reassoc", "contract"},
                    cache=True)(specialized)

    _GEMVS, _TOKEN_GEMVS, _GEMV8S, _TOKEN_GEMV8S = {}, {}, {}, {}
    for _name, _pairs, _signed, _quads in (("avx2", _pairs_avx2, _signed_pairs_avx2, _quads_avx2),
                                           ("generic", _pairs_generic, _signed_pairs_generic, _quads_generic)):
        _GEMVS[_name] = _compile(gemv_rows, _name, row_dot32=make_row_dot(_pairs, _quads, 32),
                                 row_dot128=make_row_dot(_pairs, _quads, 128))
        _TOKEN_GEMVS[_name] = _compile(gemv_token, _name, gemv_rows=_GEMVS[_name])
        _GEMV8S[_name] = _compile(gemv8_rows, _name, int8_row_dot=make_int8_row_dot(_signed, _quads))
        _TOKEN_GEMV8S[_name] = _compile(gemv8_token, _name, gemv8_rows=_GEMV8S[_name])
    gemv_float_rows = _compile(gemvf_rows, "ir")  # generic IR: one version for any CPU
    gemv_float_token = _compile(gemvf_token, "ir", gemv_float_rows=gemv_float_rows)


def _check(name: str, weight, I: int, groups: int):
    """Refuse an unknown or unavailable instruction set, or activations that do not fit the weight."""
    if name not in INSTRUCTIONS:
        raise RefqwenError(f"unknown instruction set {name!r} for the int8-activation GEMV; "
                           f"expected one of {', '.join(INSTRUCTIONS)}")
    if name == "avx2" and not target_has_avx2():
        raise RefqwenError("the AVX2 GEMV needs a CPU with AVX2, not "
                           f"{os.environ.get('NUMBA_CPU_NAME') or llvm_binding.get_host_cpu_name()}")
    if weight.shape[1] != I or groups != -(-I // 32):
        raise RefqwenError(f"int_gemv: a weight of input {weight.shape[1]} and activations ({I},) with {groups} "
                           "scales do not match (groups of 32 along the input)")


def gemv_int4(weight, xq: np.ndarray, xs: np.ndarray, name: str | None = None) -> np.ndarray:
    """One token: an int4 weight (QuantizedInt4Weight) times activations xq [I] int8 with scales xs [I/32]
    -> y [O] float32. `name` forces an instruction set (tests); by default the CPU's."""
    name = name or instruction()
    _check(name, weight, xq.shape[0], xs.shape[0])
    xs = np.ascontiguousarray(xs, np.float32)
    group_sums = xs * xq.reshape(-1, 32).sum(axis=1, dtype=np.int32)  # [I/32]: dequantized activations per group
    x_sums = group_sums.reshape(-1, weight.group // 32).sum(axis=1, dtype=np.float32)  # [G]
    y = np.empty(weight.shape[0], np.float32)
    _GEMVS[name](weight.q_packed, weight.scales, weight.zeros, weight.group, np.ascontiguousarray(xq[0::2]),
                 np.ascontiguousarray(xq[1::2]), xs, x_sums, y)
    return y


def gemv_int8(weight, xq: np.ndarray, xs: np.ndarray, name: str | None = None) -> np.ndarray:
    """One token: an int8-g32 weight (QuantizedWeight) times activations xq [I] int8 (never -128) with scales
    xs [ceil(I/32)] -> y [O] float32."""
    name = name or instruction()
    _check(name, weight, xq.shape[0], xs.shape[0])
    y = np.empty(weight.shape[0], np.float32)
    _GEMV8S[name](weight.q, weight.scales, np.ascontiguousarray(xq), np.ascontiguousarray(xs, np.float32), y)
    return y


def gemv_float(x: np.ndarray, weight) -> np.ndarray:
    """One token: x [I] float32 times an int8-g32 weight (QuantizedWeight) -> y [O] float32 (numba-int8)."""
    if weight.shape[1] != x.shape[0] or weight.scales.shape[1] != -(-x.shape[0] // 32):
        raise RefqwenError(f"int_gemv: a weight of input {weight.shape[1]} and {weight.scales.shape[1]} group "
                           f"scales does not match activations ({x.shape[0]},) in groups of 32")
    y = np.empty(weight.shape[0], np.float32)
    gemv_float_token(np.ascontiguousarray(x, np.float32), (weight.q, weight.scales), y)
    return y


def linear_one_token(x: np.ndarray, weight) -> np.ndarray:
    """x [I] float32, quantized per group of 32 (as quant.quantize_activations, bit for bit), times an int4
    (QuantizedInt4Weight) or int8-g32 weight -> [O]. Quantization and GEMV are one call into Numba: decode
    makes ~100 of these per token, and NumPy's quantization plus the Python between calls cost as much as
    the GEMV of a small matrix."""
    if weight.shape[1] != x.shape[0]:
        _check(instruction(), weight, x.shape[0], -(-x.shape[0] // 32))
    y = np.empty(weight.shape[0], np.float32)
    kernel, arrays = token_kernel(weight)
    kernel(np.ascontiguousarray(x, np.float32), arrays, y)
    return y


def token_kernel(weight):
    """(kernel, arrays) of linear_one_token for an int4 or int8-g32 weight: kernel(x [I] float32, arrays, y [O])
    writes y, unchecked; the calling convention of every decode GEMV (backends/numba_decode.py)."""
    name = instruction()
    if hasattr(weight, "q_packed"):
        return _TOKEN_GEMVS[name], (weight.q_packed, weight.scales, weight.zeros, weight.group)
    return _TOKEN_GEMV8S[name], (weight.q, weight.scales)
