"""One needle-in-a-haystack cell through refqwen and transformers float32, on the identical prompt.

Each engine runs in its own child process (its peak RSS is its own), one after the other in one
invocation, so the time ratio compares runs made in the same hour:

    python tools/long_cell.py --context 16384 --depth 50 --engines transformers,numba-int8

An engine is "transformers" (the GGUF dequantized to float32, greedy `generate`) or a refqwen backend
name; `--dual-chunk-attention JSON` runs refqwen with Dual Chunk Attention (prompts past the window).
Prints one JSON line per engine: prompt tokens, seconds (prefill and the answer, not the load), found,
peak RSS of the child.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def run_engine(engine: str, context: int, depth: float, dca: str | None) -> dict:
    import refqwen
    from refqwen.checkpoint.open import open_checkpoint
    from refqwen.niah import ANSWER_TOKENS, build_prompt, needle_value

    tokenizer = open_checkpoint("demo", False)[3]  # the weights stay on disk until read
    value = needle_value(0, context, depth)
    ids = build_prompt(tokenizer, context, depth, value)
    if engine == "transformers":
        answer, seconds = _transformers_answer(ids, tokenizer)
    else:
        model = refqwen.load("demo", backend=engine, progress=False,
                             **({"dual_chunk_attention": json.loads(dca)} if dca else {}))
        began = time.perf_counter()
        answer = model.generate(ids, ANSWER_TOKENS, temperature=0)
        seconds = time.perf_counter() - began
    return dict(engine=engine, prompt_tokens=len(ids), needle=value, answer=answer, found=str(value) in answer,
                seconds=round(seconds, 1), dual_chunk_attention=dca,
                peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def _transformers_answer(ids, tokenizer) -> str:
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    from refqwen.checkpoint.demo import demo_path
    from refqwen.niah import ANSWER_TOKENS

    path = demo_path(progress=False)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True)).eval()
    began = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, len(ids):].tolist()), time.perf_counter() - began


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--depth", type=float, default=50, help="needle depth in percent")
    p.add_argument("--engines", default="transformers,numba-int8")
    p.add_argument("--dual-chunk-attention", metavar="JSON", help="for the refqwen engines")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_engine(args.child, args.context, args.depth / 100, args.dual_chunk_attention)))
        return
    for engine in args.engines.split(","):
        cmd = [sys.executable, __file__, "--child", engine, "--context", str(args.context), "--depth",
               str(args.depth)] + (["--dual-chunk-attention", args.dual_chunk_attention]
                                   if args.dual_chunk_attention else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        print(done.stdout.strip().splitlines()[-1] if done.returncode == 0 else
              json.dumps(dict(engine=engine, failed=done.stderr.strip()[-600:])), flush=True)


if __name__ == "__main__":
    main()
