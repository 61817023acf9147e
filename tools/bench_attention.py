"""Attention alone, the demo model's shape (14 query heads, 2 key/value heads, head size 64):
refqwen's Numba kernel, the NumPy reference and torch's scaled_dot_product_attention (what
transformers runs), alternated in one process; prints times and ratios to torch.

    python tools/bench_attention.py --prefill 2048,8192 --decode 16384,32768 --repeats 3
"""

import argparse
import time

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prefill", default="2048", help="prompt lengths (T = S), comma-separated")
    p.add_argument("--decode", default="16384", help="cache lengths for one new token, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true", help="leave out the (slow) NumPy reference")
    args = p.parse_args()

    import torch

    from refqwen.backends import numba_attention
    from refqwen.model.attention import causal_attention

    torch.set_num_threads(2)
    numba_attention.warm_up()
    prefill = [(int(n), int(n)) for n in args.prefill.split(",") if n]
    decode = [(1, int(n)) for n in args.decode.split(",") if n]
    for T, S in prefill + decode:
        engines = case(T, S, torch, numba_attention, None if args.skip_reference else causal_attention)
        times = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, run in engines.items():
                began = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - began)
        best = {name: min(t) for name, t in times.items()}
        line = ", ".join(f"{name} {t * 1e3:.1f} ms ({t / best['torch-sdpa']:.2f}x torch)" for name, t in best.items())
        print(f"T={T} S={S}: {line}", flush=True)


def case(T, S, torch, numba_attention, causal_attention, H=14, KV=2, D=64) -> dict:
    """name -> a function computing attention of T new queries over S keys (the demo model's heads)."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((T, H, D), dtype=np.float32)
    k, v = (rng.standard_normal((S, KV, D), dtype=np.float32) for _ in range(2))
    tq = torch.from_numpy(q).permute(1, 0, 2)[None]  # [1, H, T, D]
    tk, tv = (torch.from_numpy(np.repeat(x, H // KV, axis=1)).permute(1, 0, 2)[None] for x in (k, v))  # as repeat_kv
    engines = {"numba": lambda: numba_attention.attention(q, k, v, S - T, None),
               "torch-sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=T > 1)}
    if causal_attention is not None:
        engines["numpy-reference"] = lambda: causal_attention(q, k, v, S - T, None)
    return engines


if __name__ == "__main__":
    main()
