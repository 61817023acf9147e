#!/usr/bin/env python3
"""This tree's Numba backend against another version of it, alternated in one process, on the demo model.

    git show main:backends/numba_int8.py > /tmp/numba_int8_base.py
    python tools/compare_decode.py --base-file /tmp/numba_int8_base.py [--backend numba-int8] [--repeats 3]

Each repeat probes the read bandwidth, then for each version prefills the same prompt and decodes,
timing every step: the first steps after a prefill show thread pools that still spin, the median of the
later ones the steady speed. Figures mean something only as ratios within one run (the machine drifts).
"""

import argparse
import time

import numpy as np
from base_module import module_from_file

from refqwen import backends
from refqwen.bench import probe_bandwidth, weight_bytes_per_token
from refqwen.checkpoint.open import open_checkpoint
from refqwen.model.model import Model


def backend_from_file(path: str, name: str):
    module = module_from_file(path, "numba_int8_base")
    cls = next(c for c in vars(module).values() if isinstance(c, type) and getattr(c, "name", None) == name)
    return cls()


def run(model, ids, steps):
    cache = model.new_cache()
    t0 = time.perf_counter()
    logits = model.logits(ids, cache, last_only=True)
    prefill_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = model.ops.decode(model, int(np.argmax(logits[-1])), cache)
        times.append(1e3 * (time.perf_counter() - t0))
    return len(ids) / prefill_s, times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-file", required=True, help="another version of backends/numba_int8.py")
    p.add_argument("--backend", default="numba-int8")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    _, cfg, weights, tokenizer = open_checkpoint("demo", progress=False)
    models = {}
    for label, ops in (("base", backend_from_file(args.base_file, args.backend)), ("this", backends.get(args.backend))):
        ops.warm_up()
        models[label] = Model(cfg, weights, tokenizer=tokenizer, source="demo", backend=ops)
    ids = np.random.default_rng(0).integers(1000, 30000, args.prompt_tokens)
    nbytes = weight_bytes_per_token(models["this"])
    print(f"{args.backend}: {nbytes / 1e6:.0f} MB of weights per decode step; {args.prompt_tokens}-token prefill")
    for repeat in range(args.repeats):
        bandwidth = probe_bandwidth()
        roofline = bandwidth * 1e9 / nbytes
        print(f"repeat {repeat}: read bandwidth {bandwidth:.1f} GB/s -> roofline {roofline:.1f} tok/s")
        for label, model in models.items():
            prefill, times = run(model, ids, args.decode_tokens)
            later = float(np.median(times[4:]))
            share = 1e3 / later / roofline
            print(f"  {label:<5} prefill {prefill:7.1f} tok/s  first steps ms {[round(t, 1) for t in times[:4]]}"
                  f"  later median {later:6.1f} ms = {1e3 / later:5.1f} tok/s ({share:.0%} of roofline)", flush=True)


if __name__ == "__main__":
    main()
