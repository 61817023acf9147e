"""`refqwen bench`: prefill and decode speed and peak memory, beside a baseline measured in the same run.

Each engine runs in its own child process, so that its peak RSS is its own and one engine's
thread pool cannot slow the other. Speeds on a shared machine drift over minutes, so only
ratios of runs made one after the other in one invocation mean anything; `--repeats`
interleaves the engines to show the spread.

Each repeat also measures the machine's read bandwidth (`probe_bandwidth`, in its own child) and
states every refqwen decode as a fraction of the roofline that implies: a decode step reads every
projection weight once, so bytes per token / bandwidth is the fastest a step can be. The first decode
steps after the prefill are reported one by one: a thread pool still spinning from the prefill
shows there as slow first steps.
"""

import json
import os
import resource
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Mapping

import numpy as np
from numba import njit, prange

ENGINES = ("refqwen", "transformers", "llama.cpp")
LLAMA_CPP = "llama.cpp:"  # engine names of llama.cpp runs: llama.cpp:<file name without .gguf>
PROBE = "bandwidth"  # the child that measures read bandwidth
PROBE_BYTES = 2**30  # larger than any cache by far
FIRST_STEPS = 4  # decode steps reported one by one


def measure(engine: str, model_path: str, prompt_tokens: int, decode_tokens: int) -> dict:
    """Load, prefill `prompt_tokens` random ids, then decode greedily; in this process.
    `engine` is "transformers" or a refqwen backend name."""
    jit_s = _warm_up(engine)
    t0 = time.perf_counter()
    run = _transformers_runner(model_path) if engine == "transformers" else _refqwen_runner(model_path, engine)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(1000, 30000, prompt_tokens)
    t0 = time.perf_counter()
    step = run(ids, decode_tokens)  # prefill; returns a function that decodes one more token
    prefill_s = time.perf_counter() - t0
    steps_ms = []
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        step()
        steps_ms.append((time.perf_counter() - t0) * 1e3)
    return dict(engine=engine, jit_s=jit_s, load_s=round(load_s, 2),
                prefill_tok_s=round(prompt_tokens / prefill_s, 1), decode_tok_s=round(1e3 * decode_tokens
                                                                                       / sum(steps_ms), 2),
                first_steps_ms=[round(t, 1) for t in steps_ms[:FIRST_STEPS]],
                later_step_ms_median=round(float(np.median(steps_ms[FIRST_STEPS:] or steps_ms)), 1),
                weight_bytes_per_token=getattr(run, "weight_bytes_per_token", None),
                peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))


def probe_bandwidth(nbytes: int = PROBE_BYTES, passes: int = 5) -> float:
    """Read bandwidth in GB/s with all of Numba's threads: the best of `passes` row sums over a float32
    array of `nbytes`. Each row is summed in vector lanes (fastmath lets LLVM vectorize the sum), rows
    are shared among the threads: the loop waits on memory, not on arithmetic, as a decode step does
    (a plain NumPy sum runs on one thread; a 1-D parallel loop that LLVM does not vectorize measures adds)."""
    a = np.ones((nbytes // (4 * 4096), 4096), np.float32)  # [rows, 4096]
    out = np.empty(a.shape[0], np.float32)
    _row_sums(a[:2], out[:2])  # compile
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        _row_sums(a, out)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


@njit(parallel=True, fastmath={"reassoc", "contract"}, cache=True)
def _row_sums(a, out):
    """out[r] = sum of row r of a [R, C]"""
    for r in prange(a.shape[0]):
        acc = np.float32(0)
        for j in range(a.shape[1]):
            acc += a[r, j]
        out[r] = acc


def weight_bytes_per_token(model) -> int:
    """Bytes of projection weights one decode step reads (dense models): every linear weight once, and
    lm_head; the embedding contributes one row."""
    from refqwen.quant import QUANTIZED

    def nbytes(block):
        return sum(w.nbytes for w in vars(block).values() if isinstance(w, (np.ndarray, *QUANTIZED))
                   and getattr(w, "ndim", 2) == 2)

    return int(model.lm_head.nbytes + sum(nbytes(layer.attn) + nbytes(layer.mlp) for layer in model.layers))


def _warm_up(engine: str) -> float | None:
    """Seconds to compile (or load from Numba's cache) a backend's kernels; None if it has none."""
    if engine == "transformers":
        return None
    from refqwen import backends

    ops = backends.get(engine)
    if not hasattr(ops, "warm_up"):
        return None
    t0 = time.perf_counter()
    ops.warm_up()
    return round(time.perf_counter() - t0, 2)


def _refqwen_runner(model_path, backend):
    import refqwen

    model = refqwen.load(model_path, backend=backend, progress=False)

    def run(ids, decode_tokens):
        cache = model.new_cache()
        cache.reserve(len(ids) + decode_tokens)  # as refqwen.generate does
        logits = model.logits(ids, cache, last_only=True)  # where the backend keeps them (a GPU's memory)
        float(logits[-1, 0])  # wait for the result: a GPU backend returns before it is computed

        def step():
            nonlocal logits
            logits = model.ops.decode(model, int(np.argmax(logits[-1])), cache)  # argmax where the logits are

        return step

    run.weight_bytes_per_token = weight_bytes_per_token(model)
    return run


def _transformers_runner(model_path):
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    torch.set_num_threads(os.cpu_count())
    path = Path(model_path)
    if model_path == "demo":
        from refqwen.checkpoint.demo import demo_path

        path = demo_path(progress=False)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     quantization_config=GgufConfig(dequantize=True))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()

    def run(ids, decode_tokens):  # transformers grows its own cache
        with torch.no_grad():
            out = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        state = {"out": out}

        def step():
            with torch.no_grad():
                token = state["out"].logits[:, -1].argmax(-1, keepdim=True)
                state["out"] = model(token, past_key_values=state["out"].past_key_values, use_cache=True)

        return step

    return run


class RandomWeights(Mapping):
    """Weights of every shape a config needs, drawn when read (std 0.02; norm weights 1) by `xp`'s
    generator: with CuPy they are drawn on the GPU, so a 7B-shaped model is built there with no host copy.
    For speed and memory measurements only: the model's outputs mean nothing."""

    def __init__(self, config, xp=np, seed: int = 0):
        from refqwen.checkpoint.weights import expected_shapes

        self.shapes, self.xp = expected_shapes(config), xp
        self.seeds = {name: seed + i for i, name in enumerate(self.shapes)}  # each tensor its own stream

    def __getitem__(self, name):
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return self.xp.ones(shape, np.float32)
        rng = self.xp.random.default_rng(self.seeds[name])
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def attention_peak_mib(lengths=(512, 1024, 2048, 4096), heads=14, kv_heads=2, head_dim=64) -> dict:
    """Peak MiB allocated inside causal_attention (inputs excluded) for growing prompt lengths, beside
    the H x T x T score matrix a textbook implementation would hold. What grows here is only the
    O(T) output and its transposes; the score blocks stay the same size."""
    from refqwen.model.attention import causal_attention

    peaks = {}
    rng = np.random.default_rng(0)
    for T in lengths:
        q = rng.standard_normal((T, heads, head_dim), dtype=np.float32)
        k = rng.standard_normal((T, kv_heads, head_dim), dtype=np.float32)
        tracemalloc.start()
        causal_attention(q, k, k, 0)
        peaks[T] = dict(blocked=round(tracemalloc.get_traced_memory()[1] / 2**20, 1),
                        textbook_scores=round(heads * T * T * 4 / 2**20, 1))
        tracemalloc.stop()
    return peaks


def llama_cpp_engines(files: list[str], python: str | None) -> dict:
    """engine name -> (command prefix, bytes a decode step reads) for each GGUF file ("demo": the embedded
    model) run by llama.cpp through the interpreter `python` (default: this one), checked up front."""
    from pathlib import Path

    from refqwen.checkpoint.demo import demo_path
    from refqwen.errors import RefqwenError

    python = python or sys.executable
    try:
        found = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True).returncode == 0
    except OSError as e:  # not a program
        raise RefqwenError(f"--llama-cpp-python {python}: cannot run it ({e.strerror})") from None
    if not found:
        raise RefqwenError(f"--llama-cpp: {python} cannot import llama_cpp; build llama-cpp-python into a "
                           "benchmark-only environment and pass its interpreter as --llama-cpp-python")
    engines = {}
    for name in files:
        path = demo_path(progress=False) if name == "demo" else Path(name)
        script = str(Path(__file__).with_name("bench_llama_cpp.py"))
        engines[LLAMA_CPP + path.name.removesuffix(".gguf")] = ([python, script, str(path)],
                                                                gguf_bytes_per_token(path))
    return engines


def gguf_bytes_per_token(path) -> int:
    """Bytes of weight matrices a llama.cpp decode step reads: every 2-D tensor once, except the token
    embedding (one row) when the file has its own output matrix."""
    from refqwen.checkpoint.gguf import open_gguf

    tensors = {t.name: t for t in open_gguf(path).tensors}
    return int(sum(t.n_bytes for name, t in tensors.items() if len(t.shape) >= 2
                   and not (name == "token_embd.weight" and "output.weight" in tensors)))


def run_bench(model: str, prompt_tokens: int, decode_tokens: int, baseline: str, backend_names: list[str],
              repeats: int, json_path: str | None, llama_cpp: list[str] = (), llama_cpp_python: str | None = None
              ) -> dict:
    """Measure the baseline ("transformers", a backend name, a llama.cpp engine or "none"), each backend and
    each llama.cpp GGUF file, interleaved."""
    from refqwen import backends
    from refqwen.errors import RefqwenError

    llama = llama_cpp_engines(list(llama_cpp), llama_cpp_python) if llama_cpp else {}
    if baseline.startswith(LLAMA_CPP) and baseline not in llama:
        raise RefqwenError(f"--baseline {baseline}: not one of the --llama-cpp engines ({', '.join(llama) or 'none'})")
    for name in backend_names + ([baseline] if baseline not in ("transformers", "none", *llama) else []):
        backends.get(name)  # an unknown or unavailable backend fails here, with the list of available ones
    engines = ([baseline] if baseline != "none" else []) + [b for b in backend_names + list(llama) if b != baseline]
    rows, bandwidth = [], {}
    for repeat in range(repeats):
        for engine in [PROBE] + engines:  # interleaved, so drift hits all alike
            print(f"measuring {engine} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "refqwen.bench", engine, model, str(prompt_tokens), str(decode_tokens)]
            if engine in llama:
                cmd = llama[engine][0] + [str(prompt_tokens), str(decode_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"benchmark of {engine} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if engine == PROBE:
                bandwidth[repeat] = result["read_gb_s"]
                continue
            if engine in llama:
                result["weight_bytes_per_token"] = llama[engine][1]
            if result.get("weight_bytes_per_token"):  # tokens/s the bandwidth allows, and the share reached
                roofline = bandwidth[repeat] * 1e9 / result["weight_bytes_per_token"]
                result["decode_of_roofline"] = round(result["decode_tok_s"] / roofline, 3)
            rows.append(dict(result, repeat=repeat, read_gb_s=bandwidth[repeat]))
    report = dict(model=model, llama_cpp={name: cmd[2] for name, (cmd, _) in llama.items()},
                  prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, cpus=os.cpu_count(),
                  read_gb_s_by_repeat=bandwidth, runs=rows, attention_peak_mib_by_T=attention_peak_mib())
    print_report(report, baseline)
    if json_path:
        from pathlib import Path

        from refqwen.files import atomic_output_file

        with atomic_output_file(Path(json_path)) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=2))
    return report


def print_report(report: dict, baseline: str) -> None:
    """One row per run; ratios are against the baseline run of the same repeat."""
    base = {r["repeat"]: r for r in report["runs"] if r["engine"] == baseline}
    print(f"model {report['model']}, prefill {report['prompt_tokens']} tokens, decode {report['decode_tokens']} "
          f"tokens, {report['cpus']} CPUs")
    print(f"{'engine':<22}{'jit s':>7}{'load s':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'peak RSS GiB':>14}"
          f"{'prefill x':>11}{'decode x':>10}{'roofline':>10}  first decode steps ms (then median)")
    for r in report["runs"]:
        b = base.get(r["repeat"])
        ratios = [f"{r[k] / b[k]:.2f}" if b else "-" for k in ("prefill_tok_s", "decode_tok_s")]
        jit = "-" if r["jit_s"] is None else r["jit_s"]
        roofline = f"{r['decode_of_roofline']:.0%}" if r.get("decode_of_roofline") is not None else "-"
        steps = " ".join(f"{t:g}" for t in r.get("first_steps_ms", []))
        print(f"{r['engine']:<22}{jit:>7}{r['load_s']:>8}{r['prefill_tok_s']:>15}{r['decode_tok_s']:>14}"
              f"{r['peak_rss_gib']:>14}{ratios[0]:>11}{ratios[1]:>10}{roofline:>10}  {steps} "
              f"({r.get('later_step_ms_median', '-')})")
    print(f"ratios (x) are against {baseline} in the same repeat; roofline: decode as a share of the tokens/s "
          "that the read bandwidth measured in the same repeat allows (weight bytes per token / bandwidth)")
    print("read bandwidth GB/s by repeat:", report["read_gb_s_by_repeat"])
    print("attention peak MiB by prompt length:", report["attention_peak_mib_by_T"])


if __name__ == "__main__":  # the child process of run_bench
    engine, model, prompt_tokens, decode_tokens = sys.argv[1:5]
    if engine == PROBE:
        print(json.dumps(dict(read_gb_s=round(probe_bandwidth(), 1))))
    else:
        print(json.dumps(measure(engine, model, int(prompt_tokens), int(decode_tokens))))
