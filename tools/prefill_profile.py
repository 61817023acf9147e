"""Where a prefill's (and a decode step's) time goes: each backend operation the model calls, timed around
the call.

    python tools/prefill_profile.py --tokens 4096 --backend numba-int8
    python tools/prefill_profile.py --tokens 512 --decode 64 --backend numba-w4a8

Loads the demo model (or --model), wraps `model.ops.<operation>` with a timer, prefills random ids and
prints the seconds per operation; "other" is the Python around them. With --decode N it then decodes N
greedy tokens and prints the same split per decode step, in milliseconds.
"""

import argparse
import collections
import time

import numpy as np

OPERATIONS = ("embed", "linear", "rms_norm", "apply_rotary", "attention", "dual_chunk_attention", "swiglu",
              "moe_dispatch")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--backend", default="numba-int8")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--decode", type=int, default=0, help="then decode this many tokens, one step at a time")
    args = p.parse_args()

    import refqwen

    model = refqwen.load(args.model, backend=args.backend, progress=False)
    seconds = collections.defaultdict(float)
    for name in OPERATIONS:
        setattr(model.ops, name, timed(getattr(model.ops, name), name, seconds))
    ids = np.random.default_rng(0).integers(1000, 30000, args.tokens)
    cache = model.new_cache()
    began = time.perf_counter()
    logits = model.logits(ids, cache, last_only=True)
    total = time.perf_counter() - began
    print(f"{args.backend}, {args.tokens} tokens: {total:.1f} s ({args.tokens / total:.0f} tok/s)")
    report(seconds, total, 1, "s")
    if args.decode:
        seconds.clear()
        began = time.perf_counter()
        for _ in range(args.decode):
            logits = model.ops.decode(model, int(np.asarray(logits).argmax()), cache)  # as generation does
        total = time.perf_counter() - began
        print(f"then {args.decode} decode steps: {total / args.decode * 1e3:.1f} ms per step "
              f"({args.decode / total:.1f} tok/s)")
        report(seconds, total, args.decode / 1e3, "ms per step")


def report(seconds, total, per, unit):
    for name, s in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"  {name:<22}{s / per:8.2f} {unit}")
    print(f"  {'other':<22}{(total - sum(seconds.values())) / per:8.2f} {unit}")


def timed(operation, name, seconds):
    def run(*args, **kwargs):
        began = time.perf_counter()
        result = operation(*args, **kwargs)
        seconds[name] += time.perf_counter() - began
        return result

    return run


if __name__ == "__main__":
    main()
