"""Attention alone, the demo model's shape (14 query heads, 2 key/value heads, head size 64):
refqwen's Numba kernel, the NumPy reference and torch's scaled_dot_product_attention (what
transformers runs), alternated in one process; prints times and ratios to torch.

    python tools/bench_attention.py --prefill 2048,8192 --decode 16384,32768 --repeats 3

--layers 24 gives every engine 24 layers' queries, keys and values and times one call per layer (the
figure printed is per layer): a decode step's caches, out of the CPU caches as they are there.
--base-file another version of backends/numba_attention.py, run beside this tree's as "numba-base".
--heads H,KV,D another model's heads (Qwen2-7B: 28,4,128).
"""

import argparse
import time

import numpy as np
from base_module import module_from_file


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill", default="2048", help="prompt lengths (T = S), comma-separated")
    p.add_argument("--decode", default="16384", help="cache lengths for one new token, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true", help="leave out the (slow) NumPy reference")
    p.add_argument("--layers", type=int, default=1, help="distinct layers' arrays, one call each per run")
    p.add_argument("--base-file", help="another version of backends/numba_attention.py to run beside this one")
    p.add_argument("--heads", default="14,2,64", help="query heads, key/value heads, head size (default: the demo's)")
    args = p.parse_args()
    H, KV, D = (int(n) for n in args.heads.split(","))

    import torch

    from refqwen.backends import numba_attention
    from refqwen.model.attention import causal_attention

    torch.set_num_threads(2)
    numba_attention.warm_up()
    base = module_from_file(args.base_file, "numba_attention_base") if args.base_file else None
    if base is not None:
        base.warm_up()
    prefill = [(int(n), int(n)) for n in args.prefill.split(",") if n]
    decode = [(1, int(n)) for n in args.decode.split(",") if n]
    for T, S in prefill + decode:
        engines = case(T, S, torch, numba_attention, None if args.skip_reference else causal_attention, base,
                       args.layers, H, KV, D)
        times = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, run in engines.items():
                began = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - began) / args.layers)
        best = {name: min(t) for name, t in times.items()}
        line = ", ".join(f"{name} {t * 1e3:.3f} ms ({t / best['torch-sdpa']:.2f}x torch)" for name, t in best.items())
        print(f"T={T} S={S}: {line}", flush=True)


def case(T, S, torch, numba_attention, causal_attention, base=None, layers=1, H=14, KV=2, D=64) -> dict:
    """name -> a function computing attention of T new queries over S keys (the demo model's heads), for
    each of `layers` layers' arrays."""
    rng = np.random.default_rng(0)
    qs = [rng.standard_normal((T, H, D), dtype=np.float32) for _ in range(layers)]
    kvs = [[rng.standard_normal((S, KV, D), dtype=np.float32) for _ in range(2)] for _ in range(layers)]
    tqs = [torch.from_numpy(q).permute(1, 0, 2)[None] for q in qs]  # [1, H, T, D]
    tkvs = [[torch.from_numpy(np.repeat(x, H // KV, axis=1)).permute(1, 0, 2)[None] for x in kv]  # as repeat_kv
            for kv in kvs]

    def each_layer(attention):
        return lambda: [attention(q, k, v, S - T, None) for q, (k, v) in zip(qs, kvs)]

    engines = {"numba": each_layer(numba_attention.attention),
               "torch-sdpa": lambda: [torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=T > 1)
                                      for tq, (tk, tv) in zip(tqs, tkvs)]}
    if base is not None:
        engines["numba-base"] = each_layer(base.attention)
    if causal_attention is not None:
        engines["numpy-reference"] = each_layer(causal_attention)
    return engines


if __name__ == "__main__":
    main()
