"""`refqwen bench --llama-cpp FILE.gguf`'s child: llama.cpp (through llama-cpp-python) measured as refqwen is.

Run by `refqwen.bench.run_bench` with the interpreter of an environment that has llama-cpp-python
(`--llama-cpp-python`), which need not have refqwen: this file imports only the standard library,
NumPy and llama_cpp. The same prompt as refqwen's runs (random ids 1000..29999 from seed 0), prefilled
by one `eval` of the whole prompt, then greedy decode, one `eval` per token (about 5 % below
llama-bench's decode: the Python call per token). Prints one JSON line with the keys `measure` reports.

    python refqwen/bench_llama_cpp.py MODEL.gguf PROMPT_TOKENS DECODE_TOKENS
"""

import json
import os
import resource
import sys
import time

import numpy as np

FIRST_STEPS = 4  # as refqwen.bench


def measure(path: str, prompt_tokens: int, decode_tokens: int) -> dict:
    from llama_cpp import Llama

    t0 = time.perf_counter()
    n_ctx = prompt_tokens + decode_tokens + 16
    llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count(),
                n_threads_batch=os.cpu_count(), verbose=False)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(1000, 30000, prompt_tokens).tolist()
    t0 = time.perf_counter()
    llm.eval(ids)
    prefill_s = time.perf_counter() - t0
    steps_ms = []
    for _ in range(decode_tokens):
        t0 = time.perf_counter()
        token = int(np.argmax(last_logits(llm)))
        llm.eval([token])
        steps_ms.append((time.perf_counter() - t0) * 1e3)
    name = os.path.basename(path).removesuffix(".gguf")
    return dict(engine=f"llama.cpp:{name}", jit_s=None, load_s=round(load_s, 2),
                prefill_tok_s=round(prompt_tokens / prefill_s, 1),
                decode_tok_s=round(1e3 * decode_tokens / sum(steps_ms), 2),
                first_steps_ms=[round(t, 1) for t in steps_ms[:FIRST_STEPS]],
                later_step_ms_median=round(float(np.median(steps_ms[FIRST_STEPS:] or steps_ms)), 1),
                weight_bytes_per_token=None,  # the parent reads it from the file's tensor table
                peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token (llama-cpp-python keeps no copy without logits_all)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
