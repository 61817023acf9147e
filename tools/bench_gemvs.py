#!/usr/bin/env python3
"""One decode token's GEMVs (all 24 layers of the demo's shapes and its output matrix, random weights, out of
cache) against the read bandwidth probed in the same process; optionally against another version of
backends/int_gemv.py (for --kind float-int8, of backends/numba_int8.py before 2026-12-01, whose gemv_g32 it
was), alternated with this tree's.

    python tools/bench_gemvs.py --kind int8 [--base-file /tmp/int_gemv_base.py] [--repeats 12]

--kind int8: numba-w8a8's int8 x int8 GEMV; int4: numba-w4a8's int4 x int8; float-int8: numba-int8's int8 x
float32 (int_gemv.gemv_float). A token's GEMVs read every weight byte once, so their floor is bytes / bandwidth.
Figures mean something only as ratios within one run (the machine drifts).
"""

import argparse
import time

import numpy as np
from base_module import module_from_file

from refqwen.backends import int_gemv
from refqwen.bench import probe_bandwidth
from refqwen.quant import QuantizedInt4Weight, QuantizedWeight

SHAPES = {"q": (896, 896), "k": (128, 896), "v": (128, 896), "o": (896, 896), "gate": (4864, 896),
          "up": (4864, 896), "down": (896, 4864)}  # (out, in) of one demo layer
LAYERS, VOCAB = 24, 151936


def random_weight(kind, rows, cols, rng):
    scales = rng.random((rows, cols // 32), dtype=np.float32) * 0.01
    if kind == "int4":
        return QuantizedInt4Weight(rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8), scales,
                                   rng.integers(0, 16, (rows, cols // 32), dtype=np.uint8), 32)
    return QuantizedWeight(rng.integers(-127, 128, (rows, cols), dtype=np.int8), scales)


def plain_numba_gemv(gemv_g32):
    def gemv(x, w):
        y = np.empty(w.shape[0], np.float32)
        gemv_g32(w.q, w.scales, x, y)
        return y

    return gemv


def one_token(gemv, weights, xs) -> float:
    began = time.perf_counter()
    for w in weights:
        gemv(xs[w.shape[1]], w)
    return time.perf_counter() - began


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=("int8", "int4", "float-int8"), default="int8")
    p.add_argument("--base-file", help="another version of backends/int_gemv.py to alternate with")
    p.add_argument("--repeats", type=int, default=12)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    weights = [random_weight(args.kind, *SHAPES[k], rng) for _ in range(LAYERS) for k in SHAPES]
    weights.append(random_weight(args.kind, VOCAB, 896, rng))
    nbytes = sum(sum(a.nbytes for a in vars(w).values() if isinstance(a, np.ndarray)) for w in weights)
    xs = {n: rng.standard_normal(n).astype(np.float32) for n in (896, 4864)}
    versions = {"this tree": int_gemv.gemv_float if args.kind == "float-int8" else int_gemv.linear_one_token}
    if args.base_file:
        base = module_from_file(args.base_file, "int_gemv_base")
        versions["base"] = base.linear_one_token if args.kind != "float-int8" else getattr(base, "gemv_float", None) \
            or plain_numba_gemv(base.gemv_g32)  # numba-int8's kernel before it moved here (backends/numba_int8.py)
    for gemv in versions.values():
        one_token(gemv, weights[:8], xs)  # compile or load from the cache
    bandwidth = probe_bandwidth()
    times = {name: [one_token(gemv, weights, xs) for _ in range(1)] for name, gemv in versions.items()}
    for _ in range(args.repeats - 1):
        for name, gemv in versions.items():
            times[name].append(one_token(gemv, weights, xs))
    print(f"{args.kind}: {nbytes / 1e6:.0f} MB a token; read bandwidth {bandwidth:.1f} GB/s before, "
          f"{probe_bandwidth():.1f} after: floor {nbytes / bandwidth / 1e6:.1f} ms")
    for name, t in times.items():
        t = np.array(t) * 1e3
        print(f"{name:>10}: best {t.min():.1f} ms ({nbytes / t.min() / 1e6:.1f} GB/s, "
              f"{nbytes / bandwidth / 1e6 / t.min():.0%} of the floor), median {np.median(t):.1f} ms")


if __name__ == "__main__":
    main()
