"""Peak memory of a loaded model against what it must hold: the interpreter, the weights, the KV cache.

    python tools/load_memory.py --backend numba-int8 [--model demo] [--prompt-tokens 512] [--decode-tokens 64]

Measures the resident set after the backend's kernels are compiled and the loader's libraries imported
(the baseline), loads the model, prefills random ids and decodes, then prints the peak RSS as
baseline + KV cache + (a factor) x the bytes of every array the model holds.
"""

import argparse
import resource

import numpy as np
import psutil


def held_bytes(model) -> int:
    """Bytes of the distinct arrays reachable from the model's layers and weights (views counted once)."""
    from refqwen import quant

    seen, total = set(), 0
    stack = [model]
    while stack:
        obj = stack.pop()
        if isinstance(obj, np.ndarray):
            owner = obj.base if isinstance(obj.base, np.ndarray) else obj
            if id(owner) not in seen:
                seen.add(id(owner))
                total += owner.nbytes
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, (quant.QuantizedWeight, quant.QuantizedInt4Weight)) or (
                hasattr(obj, "__dict__") and type(obj).__module__.startswith("refqwen.model")):
            if id(obj) not in seen:
                seen.add(id(obj))
                stack.extend(vars(obj).values())
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--backend", default="numba-int8")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    args = p.parse_args()

    import gguf  # noqa: F401  (imported by a load anyway: part of the baseline)
    import tokenizers  # noqa: F401

    import refqwen
    from refqwen import backends

    backends.get(args.backend).warm_up()
    baseline = psutil.Process().memory_info().rss
    model = refqwen.load(args.model, backend=args.backend, progress=False)
    cache = model.new_cache()
    logits = model.logits(np.random.default_rng(0).integers(1000, 30000, args.prompt_tokens), cache, last_only=True)
    for _ in range(args.decode_tokens):
        logits = model.ops.decode(model, int(np.asarray(logits).argmax()), cache)
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    weights = held_bytes(model)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    gib = 2 ** 30
    print(f"{args.backend}: peak RSS {peak / gib:.3f} GiB = baseline {baseline / gib:.3f} + KV cache {kv / gib:.3f} "
          f"+ {(peak - baseline - kv) / weights:.2f} x the model's {weights / gib:.3f} GiB of arrays")


if __name__ == "__main__":
    main()
