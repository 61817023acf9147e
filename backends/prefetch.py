"""Software prefetch: ask for memory before a loop reads it.

The decode GEMVs stream every weight once, row after row, so they wait on memory. The CPU's stream
prefetcher follows such a stream only within a 4 KiB page: at each page boundary it starts again from a
miss, and with two threads streaming two regions the bandwidth left unused shows. One `prefetcht0` per
32 weight bytes, AHEAD bytes ahead of the load (past the row's end is fine: a prefetch never faults),
keeps the next page's lines on their way. Measured on demo-shaped random weights, one token's GEMVs
alternated in one process (2 threads, read bandwidth 13-17 GB/s, tools/bench_gemvs.py): int8 x int8
54 -> 46 ms, int4 x int8 34 -> 28 ms; 512, 1024 and 2048 bytes ahead did the same within the noise.
Decode attention (backends/numba_attention.py) prefetches the keys a few positions ahead of its tiles.

`prefetch(address)` is a Numba intrinsic for plain Numba loops; `emit_prefetch` emits the same call
inside another intrinsic's LLVM IR (backends/int_gemv.py). Both take the address to prefetch.
"""

try:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # the backends that use this module report numba as unavailable
    intrinsic = None

AHEAD = 1024  # bytes ahead of a GEMV's loads

if intrinsic is not None:
    I32, I64 = ir.IntType(32), ir.IntType(64)

    def emit_prefetch(builder, address):
        """Prefetch, for reading into every cache level, the line holding `address` (an int64)."""
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), I32, I32, I32]),
            "llvm.prefetch.p0")
        pointer = builder.inttoptr(address, ir.IntType(8).as_pointer())
        # (address, 0 = read, 3 = keep in all levels, 1 = data cache)
        builder.call(fn, [pointer, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])

    @intrinsic
    def prefetch(typingctx, address):
        """prefetch(address): the line holding the int64 `address` is on its way."""

        def codegen(context, builder, signature, args):
            emit_prefetch(builder, args[0])
            return context.get_dummy_value()

        return types.void(types.int64), codegen
