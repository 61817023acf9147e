"""Weight quantization on load: the reference (refqwen/quant.py, NumPy) against backends/numba_quant.py
(the same arithmetic as parallel Numba loops), alternated in one process, in ns per weight.

    python tools/bench_quantize.py --rows 20000 --cols 4864
"""

import argparse
import time

import numpy as np

from refqwen import quant
from refqwen.backends import numba_quant


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--cols", type=int, default=4864)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32) * 0.02
    for scheme in quant.SCHEMES:
        numba_quant.quantize_scheme(w[:2], scheme)  # compile (or load from Numba's cache)
    print(f"{w.size / 1e6:.0f} M weights")
    for scheme in quant.SCHEMES:
        best = {}
        for _ in range(args.repeats):
            for name, quantize in (("numpy", quant.quantize_scheme), ("numba", numba_quant.quantize_scheme)):
                began = time.perf_counter()
                quantize(w, scheme)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - began)
        print(f"{scheme:<13} numpy {best['numpy'] / w.size * 1e9:6.2f} ns/weight   numba "
              f"{best['numba'] / w.size * 1e9:5.2f} ns/weight   {best['numpy'] / best['numba']:5.1f}x")


if __name__ == "__main__":
    main()
