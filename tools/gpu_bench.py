"""GPU benchmark of the cupy backends: prefill and decode tokens/s, device memory, and the fraction
of the GPU's memory bandwidth that decode reaches.

    python tools/gpu_bench.py [--models demo-shape,7b] [--backends cupy,cupy-f16] [--json out.json]

Models are released Qwen2 shapes with random weights drawn on the GPU (refqwen/published.py;
"demo-shape" is the embedded demo's shape: 0.5B with an untied output matrix), or "demo" itself
when its GGUF is in the cache. The baseline, measured in the same run, is the GPU's own
device-to-device copy bandwidth: decode reads every weight once per token, so
    decode bandwidth = (bytes of weights read per token) x (tokens/s, the faster of eager and CUDA graph),
and its fraction of the copy bandwidth says how close decoding comes to the memory limit. One
GEMV timed alone (CUDA events) gives the kernel's own rate, apart from launch overheads.
"""

import argparse
import json
import sys
import time

import numpy as np


def copy_bandwidth(cp, nbytes: int = 2 * 2**30, repeats: int = 10) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy of nbytes."""
    a = cp.ones(nbytes, cp.uint8)
    b = cp.empty_like(a)
    b[...] = a  # warm up
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        b[...] = a
    stop.record()
    stop.synchronize()
    seconds = cp.cuda.get_elapsed_time(start, stop) / 1e3
    del a, b
    cp.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes * repeats / seconds


def gemv_bandwidth(cp, backend: str, shape=(18944, 3584), repeats: int = 50) -> float:
    """Bytes per second one decode GEMV kernel streams on its own (Qwen2-7B's MLP up projection),
    timed with CUDA events: the kernel's ceiling, apart from launch and Python overheads."""
    from refqwen import backends

    ops = backends.get(backend)
    weight = ops.prepare_linear("w", cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32) * 0.02)
    x = cp.ones((1, shape[1]), cp.float32)
    ops.linear(x, weight)  # warm up
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        ops.linear(x, weight)
    stop.record()
    stop.synchronize()
    return weight.nbytes * repeats / (cp.cuda.get_elapsed_time(start, stop) / 1e3)


def weight_bytes_per_token(model) -> float:
    """Bytes of projection weights one decode step reads: every dense weight once, the routed
    experts in proportion top_k / num_experts (what a token's routing reads on average)."""
    from refqwen.backends.cupy_gpu import DeviceWeight
    from refqwen.model.moe import SparseMoE

    def nbytes(block, share=1.0):
        return share * sum(w.nbytes for w in vars(block).values() if isinstance(w, DeviceWeight))

    total = model.lm_head.nbytes
    for layer in model.layers:
        total += nbytes(layer.attn)
        if isinstance(layer.mlp, SparseMoE):
            share = layer.mlp.top_k / len(layer.mlp.experts)
            total += sum(nbytes(e, share) for e in layer.mlp.experts) + nbytes(layer.mlp.shared_expert)
        else:
            total += nbytes(layer.mlp)
    return total


def model_config(model_name: str):
    """A released shape by name (refqwen/published.py), or "demo-shape": the demo's (0.5B, untied)."""
    from refqwen import Config
    from refqwen.published import PUBLISHED, published_config

    if model_name == "demo-shape":
        return Config.from_hf_dict(dict(PUBLISHED["0.5b"], tie_word_embeddings=False), source="demo shape")
    return published_config(model_name)


def build(model_name: str, ops):
    """The demo model, or a released shape with random weights drawn where the backend keeps arrays."""
    import refqwen
    from refqwen.bench import RandomWeights
    from refqwen.model import Model

    if model_name == "demo":
        return refqwen.load("demo", backend=ops.name, progress=False)
    config = model_config(model_name) if isinstance(model_name, str) else model_name
    ops.check_fits(config, f"Qwen2 {model_name} (random weights)")
    model = Model(config, RandomWeights(config, ops.xp), backend=ops)
    ops.warm_up()
    return model


def measure(model_name, ops, prompt_tokens: int, decode_tokens: int) -> dict:
    """Load (or build), prefill prompt_tokens random ids, decode greedily; ops is a cupy backend
    (in host mode for the tests). Memory is what CuPy's pool holds (on a GPU)."""
    xp = ops.xp
    pool = xp.get_default_memory_pool() if xp is not np else None
    graphs_setting = ops.graphs
    sync = xp.cuda.Device().synchronize if pool else (lambda: None)
    t0 = time.perf_counter()
    model = build(model_name, ops)
    sync()
    load_s = time.perf_counter() - t0
    weights_gib = pool.used_bytes() / 2**30 if pool else None
    ids = np.random.default_rng(0).integers(0, min(30000, model.config.vocab_size), prompt_tokens)
    model.logits(ids[:16], model.new_cache())  # the first calls compile kernels and plan cuBLAS: not timed
    cache = model.new_cache()
    sync()
    t0 = time.perf_counter()
    token = int(xp.argmax(model.logits(ids, cache, last_only=True)[-1]))  # int() waits for the prefill
    prefill_s = time.perf_counter() - t0
    decode_s = {}
    for graphs in (False, True):  # eager, then the same sequence continued through a CUDA graph
        ops.graphs = graphs
        ops.decode(model, token, cache)  # a graph is captured on its first step: not timed
        sync()
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            token = int(xp.argmax(ops.decode(model, token, cache)[-1]))  # one id comes back per step
        decode_s[graphs] = time.perf_counter() - t0
    graphed = cache.graph is not None  # False for MoE models (routing reads its choices on the host)
    from refqwen.checkpoint.weights import parameter_counts

    ops.graphs = graphs_setting
    return dict(model=model_name if isinstance(model_name, str) else "config", backend=ops.name,
                parameters_b=round(parameter_counts(model.config)["total"] / 1e9, 2),
                load_s=round(load_s, 1), weights_gib=weights_gib and round(weights_gib, 2),
                pool_gib=pool and round(pool.total_bytes() / 2**30, 2),
                prefill_tok_s=round(prompt_tokens / prefill_s, 1),
                decode_tok_s=round(decode_tokens / decode_s[False], 1),
                decode_graph_tok_s=round(decode_tokens / decode_s[True], 1) if graphed else None,
                decode_gb_s=round(weight_bytes_per_token(model) * decode_tokens / min(decode_s.values()) / 1e9, 2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo-shape,7b")
    parser.add_argument("--backends", default="cupy,cupy-f16")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--json", help="write the results here as well")
    args = parser.parse_args(argv)
    import cupy as cp

    bandwidth = copy_bandwidth(cp)
    device = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    print(f"{device}: device-to-device copy {bandwidth / 1e9:.0f} GB/s (the baseline)", flush=True)
    from refqwen import backends

    kernels = {b: gemv_bandwidth(cp, b) for b in args.backends.split(",")}
    for b, rate in kernels.items():
        print(f"{b}: one 18944 x 3584 GEMV alone streams {rate / 1e9:.0f} GB/s ({rate / bandwidth:.0%} of copy)",
              flush=True)
    rows = []
    for model_name in args.models.split(","):
        for backend in args.backends.split(","):
            print(f"measuring {model_name} on {backend} ...", file=sys.stderr, flush=True)
            row = measure(model_name, backends.get(backend), args.prompt_tokens, args.decode_tokens)
            cp.get_default_memory_pool().free_all_blocks()
            row["decode_fraction_of_copy_bandwidth"] = round(row["decode_gb_s"] * 1e9 / bandwidth, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<12}{'backend':<20}{'params B':>9}{'load s':>8}{'weights GiB':>13}{'pool GiB':>10}"
          f"{'prefill tok/s':>15}{'decode tok/s':>14}{'graph tok/s':>13}{'decode GB/s':>13}{'of copy BW':>12}")
    for r in rows:
        print(f"{r['model']:<12}{r['backend']:<20}{r['parameters_b']:>9}{r['load_s']:>8}{r['weights_gib']:>13}"
              f"{r['pool_gib']:>10}"
              f"{r['prefill_tok_s']:>15}{r['decode_tok_s']:>14}{str(r['decode_graph_tok_s']):>13}{r['decode_gb_s']:>13}"
              f"{r['decode_fraction_of_copy_bandwidth']:>12.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=device, copy_bandwidth_gb_s=round(bandwidth / 1e9, 1),
                           gemv_alone_gb_s={b: round(r / 1e9, 1) for b, r in kernels.items()},
                           prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, runs=rows), f, indent=2)


if __name__ == "__main__":
    main()
