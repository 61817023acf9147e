"""float32 matrix products and row maxima as register tiles, written in LLVM vector IR through Numba intrinsics.

LLVM vectorizes a plain Numba loop one way: along its innermost loop. A matrix product then either sums
dot products lane-wise and adds the lanes at the end (one load per multiply-add, plus the horizontal sums),
or keeps its output rows in memory (a load and a store per multiply-add); both reach about a third of the
CPU's multiply-add rate. A register tile does what BLAS does instead: MT rows x NV vectors of 8 columns of
the output stay in registers for the whole sum; each step loads NV vectors of one row of B, broadcasts one
value of each of the MT rows of A, and issues MT x NV fused multiply-adds. With MT = 6 and NV = 2 (BLIS's
AVX2 shape) that is 12 accumulators, 2 loads and 6 broadcasts per 12 multiply-adds: 15 of the 16 vector
registers, and AVX2's two FMA units kept busy. Measured on one core here (tools/bench_attention.py's
shapes, 112 x 64 x 256 and 112 x 256 x 64): 68-80 GFLOP/s, against 33-47 for a 4 x 16 tile that
recomputed its addresses each step and 13-29 for the dot-product loops it replaced.

Numba compiles for the host CPU, so an 8-lane vector is one AVX2 register where the CPU has AVX2 and two
SSE registers where it has only SSE: the IR is generic, correct on any CPU.

A tile is called with addresses and strides in bytes (int64); callers pad their arrays so that every tile
is whole (rows to a multiple of MT, columns to a multiple of COLS).
"""

try:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # the backends that use this module report numba as unavailable
    intrinsic = None

LANES = 8  # float32 lanes per vector
MT = 6  # rows of a tile
NV = 2  # vectors of LANES columns per tile row
COLS = NV * LANES  # columns of a tile

if intrinsic is not None:
    F32, I64 = ir.FloatType(), ir.IntType(64)
    F32xL = ir.VectorType(F32, LANES)

    def _pointer(builder, address, offset, vtype):
        return builder.inttoptr(builder.add(address, offset), vtype.as_pointer())

    def _splat(builder, value):
        """A vector with `value` in every lane."""
        v = builder.insert_element(ir.Constant(F32xL, None), value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))

    def _fma(builder, a, b, c):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32xL, [F32xL] * 3), "llvm.fmuladd.v8f32")
        return builder.call(fn, [a, b, c])

    def make_tile(mt: int, nv: int, accumulate: bool):
        """The intrinsic c[mt, nv * LANES] (+)= a[mt, :k] @ b[:k, nv * LANES]."""

        @intrinsic
        def tile(typingctx, a, a_stride, b, b_stride, c, c_stride, k):
            """Rows of a, b and c are `*_stride` bytes apart."""
            sig = types.void(*([types.int64] * 7))

            def codegen(context, builder, signature, args):
                a, a_stride, b, b_stride, c, c_stride, k = args
                accs = [[cgutils.alloca_once_value(builder, ir.Constant(F32xL, None)) for _ in range(nv)]
                        for _ in range(mt)]
                a_rows = [builder.add(a, builder.mul(ir.Constant(I64, t), a_stride)) for t in range(mt)]
                b_at = cgutils.alloca_once_value(builder, b)  # address of the current row of b
                with cgutils.for_range(builder, k) as loop:
                    b_row = builder.load(b_at)
                    b_vecs = [builder.load(_pointer(builder, b_row, ir.Constant(I64, 4 * LANES * v), F32xL), align=4)
                              for v in range(nv)]
                    a_col = builder.mul(loop.index, ir.Constant(I64, 4))
                    for t in range(mt):
                        a_t = _splat(builder, builder.load(_pointer(builder, a_rows[t], a_col, F32), align=4))
                        for v in range(nv):
                            builder.store(_fma(builder, a_t, b_vecs[v], builder.load(accs[t][v])), accs[t][v])
                    builder.store(builder.add(b_row, b_stride), b_at)
                for t in range(mt):
                    for v in range(nv):
                        offset = builder.add(builder.mul(ir.Constant(I64, t), c_stride),
                                             ir.Constant(I64, 4 * LANES * v))
                        target = _pointer(builder, c, offset, F32xL)
                        total = builder.load(accs[t][v])
                        if accumulate:
                            total = builder.fadd(total, builder.load(target, align=4))
                        builder.store(total, target, align=4)
                return context.get_dummy_value()

            return sig, codegen

        return tile

    tile_store = make_tile(MT, NV, accumulate=False)
    tile_add = make_tile(MT, NV, accumulate=True)
    row_store = make_tile(1, NV, accumulate=False)  # the rows left over after whole tiles

    @intrinsic
    def vector_max(typingctx, address, n_vectors, initial):
        """max(initial, the n_vectors x LANES float32 values from `address`) (float32); no NaN expected."""
        sig = types.float32(types.int64, types.int64, types.float32)

        def codegen(context, builder, signature, args):
            address, n_vectors, initial = args
            vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32xL, [F32xL] * 2),
                                                  "llvm.maxnum.v8f32")
            best = cgutils.alloca_once_value(builder, _splat(builder, initial))
            with cgutils.for_range(builder, n_vectors) as loop:
                offset = builder.mul(loop.index, ir.Constant(I64, 4 * LANES))
                x = builder.load(_pointer(builder, address, offset, F32xL), align=4)
                builder.store(builder.call(vmax, [builder.load(best), x]), best)
            v, n = builder.load(best), LANES
            while n > 2:  # halve: lane-wise max of the low and high halves
                n //= 2
                vtype = ir.VectorType(F32, n)
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vtype, [vtype] * 2),
                                                    f"llvm.maxnum.v{n}f32")
                halves = [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                                   list(range(k * n, (k + 1) * n)))) for k in (0, 1)]
                v = builder.call(fn, halves)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(F32, [F32] * 2), "llvm.maxnum.f32")
            return builder.call(fn, [builder.extract_element(v, ir.Constant(ir.IntType(32), k)) for k in (0, 1)])

        return sig, codegen

    @intrinsic
    def float_from_bits(typingctx, bits):
        """The float32 whose bit pattern is the int32 `bits` (a vectorizable bitcast)."""
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], F32)

        return sig, codegen
