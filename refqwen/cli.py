"""The `refqwen` command: generate, chat, info, ppl, bench, compare, quantize, niah, lens and pattern."""

import argparse
import json
import sys

from refqwen.errors import RefqwenError


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except RefqwenError as e:  # every user error: one line on stderr, exit status 2
        lines = (line.strip() for line in str(e).splitlines())
        print(f"refqwen: error: {'; '.join(line for line in lines if line)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class OneLineErrors(argparse.ArgumentParser):
    """argparse, with a usage error on one line like every other error (subcommands inherit it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _load(args):
    import refqwen

    return refqwen.load(args.model, backend=args.backend, progress=True, **_rope_override(args))


def _rope_override(args) -> dict:
    """load()'s overrides: rope_scaling from --rope-scaling JSON or --yarn FACTOR, dual_chunk_attention
    from --dual-chunk-attention JSON (none given: as the checkpoint says)."""
    override = {}
    if getattr(args, "rope_scaling", None) is not None:
        example = '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
        override["rope_scaling"] = _json_option("--rope-scaling", args.rope_scaling, example)
    if getattr(args, "yarn", None) is not None:
        override["rope_scaling"] = {"type": "yarn", "factor": args.yarn}
    if getattr(args, "dual_chunk_attention", None) is not None:
        override["dual_chunk_attention"] = _json_option("--dual-chunk-attention", args.dual_chunk_attention,
                                                        '{"chunk_size": 32768, "local_size": 4096}')
    return override


def _json_option(flag: str, text: str, example: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RefqwenError(f"{flag}: not JSON ({e}); e.g. '{example}'") from None


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop or ())


def cmd_generate(args):
    model = _load(args)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    for piece in model.stream(prompt, args.max_new_tokens, ignore_eos=args.ignore_eos, **_sampling(args)):
        print(piece, end="", flush=True)
    print()


def cmd_chat(args):
    model = _load(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model. /reset forgets the conversation, /exit (or Ctrl-D) quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(system)
            print("(conversation reset)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = []
        for piece in model.stream(history, args.max_new_tokens, **_sampling(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args):
    from refqwen import backends
    from refqwen.info import describe
    from refqwen.loading import open_model

    backends.get(args.backend)  # an unknown backend is an error here too
    # the config and the checkpoint's tensor names and shapes only: no weight is read (a 72B model's
    # report must not need its 290 GB of float32)
    path, cfg, _, _ = open_model(args.model, progress=True, **_rope_override(args))
    report = describe(cfg, str(path), args.backend, args.context)
    print(json.dumps(report, indent=2) if args.json else _format_info(report))


def _format_info(report: dict) -> str:
    lines = [f"source:  {report['source']}", f"backend: {report['backend']}  (weights in {report['dtype']})", "",
             "config:"]
    lines += [f"  {k} = {v}" for k, v in report["config"].items()]
    lines += ["", "parameters:"]
    lines += [f"  {k:<16}{v:>14,}" for k, v in report["parameters"].items()]
    m = report["memory"]
    lines += ["", f"memory for a {m['context_tokens']}-token context: weights {m['weights_gib']:.2f} GiB + "
                  f"KV cache {m['kv_cache_gib']:.3f} GiB = {m['total_gib']:.2f} GiB"]
    lines += ["on a GPU (with 2 GiB of workspace): " + ", ".join(f"{name} {gib:.1f} GiB"
                                                                  for name, gib in m["gpu_gib"].items())]
    return "\n".join(lines)


def cmd_ppl(args):
    from pathlib import Path

    from refqwen.files import read_text
    from refqwen.perplexity import perplexity

    path = Path(args.file)
    text = read_text(path, "file", limit=1 << 30)  # a regular UTF-8 file: a pipe or binary file is refused
    model = _load(args)
    result = perplexity(model, text, window=args.window, stride=args.stride)
    print(json.dumps(dict(file=str(path), model=model.source, **result.to_dict()), indent=2))


def cmd_bench(args):
    from refqwen.bench import run_bench

    run_bench(args.model, args.prompt_tokens, args.decode_tokens, args.baseline, args.backend.split(","),
              args.repeats, args.json, [f for f in (args.llama_cpp or "").split(",") if f], args.llama_cpp_python)


def cmd_compare(args):
    """Trace the model on --backend and on --against, print where they differ; exit 1 past tolerance."""
    from pathlib import Path

    from refqwen import backends
    from refqwen.compare import compare
    from refqwen.trace import trace

    if args.against != "transformers":
        backends.get(args.against)  # an unknown or unavailable backend fails now, not after a long load
    model = _load(args)
    ids = _compare_ids(args, model)
    names = args.names or ["*"]
    ours = trace(model, ids, names)  # checks the globs before the (slow) reference is loaded
    if args.against == "transformers":
        from refqwen.hf_trace import load_transformers, trace_transformers

        theirs = trace_transformers(load_transformers(model.source), ids, names)
    else:
        import refqwen

        theirs = trace(refqwen.load(args.model, backend=args.against, progress=False, **_rope_override(args)),
                       ids, names)
    report = compare(ours, theirs, atol=args.atol, rtol=args.rtol)
    print(report)
    if args.json:
        try:
            Path(args.json).write_text(report.to_json() + "\n", encoding="utf-8")
        except OSError as e:
            raise RefqwenError(f"--json: cannot write {args.json}: {e.strerror}") from None
    return 0 if report.ok else 1


def cmd_quantize(args):
    """Write SOURCE quantized to OUT (a folder, or with --gguf a Q8_0 .gguf); --report measures the cost."""
    import resource

    from refqwen.quality import format_report, quality_report, size_on_disk, write_report

    keep = tuple(k.strip() for k in args.keep.split(",") if k.strip()) if args.keep else ()
    if args.gguf:
        from refqwen.checkpoint.write_gguf import write_gguf_checkpoint

        if args.scheme != "int8-g32":
            raise RefqwenError(f"--gguf writes Q8_0, the GGUF form of int8-g32; got --scheme {args.scheme}")
        out = write_gguf_checkpoint(args.source, args.out, keep, args.force)
    else:
        from refqwen.checkpoint.write_quantized import write_quantized_checkpoint

        if args.shard_mib <= 0:
            raise RefqwenError(f"--shard-mib: expected a positive size in MiB, got {args.shard_mib}")
        out = write_quantized_checkpoint(args.source, args.out, args.scheme, keep, args.force,
                                         shard_bytes=args.shard_mib * 1024 ** 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"wrote {out}: {size_on_disk(out) / 1024 ** 2:.1f} MiB, {args.scheme}; peak memory {peak:.0f} MiB")
    if args.report:
        # a GGUF is read back dequantized: run it on the reference backend, not quantized a second time
        backend = "numpy" if args.gguf else "numba-int8"
        report = quality_report(args.source, out, "Q8_0" if args.gguf else args.scheme, backend=backend,
                                tokens=args.report_tokens, window=args.window)
        print(format_report(report))
        print(f"wrote {write_report(report, out)}")


def cmd_lens(args):
    """The logit lens: each layer's top next tokens at one position; --png draws every position."""
    from refqwen.lens import logit_lens, plot_logit_lens

    model = _load(args)
    lens = logit_lens(model, _compare_ids(args, model), args.k)
    print(lens.table(_token_text(model), args.position))
    if args.png:
        print(f"wrote {plot_logit_lens(lens, args.png, _token_text(model))}")


def cmd_pattern(args):
    """One layer's and head's attention weights over the prompt, as numbers or (--png) a picture."""
    from refqwen.lens import attention_pattern, plot_attention_pattern

    model = _load(args)
    ids = _compare_ids(args, model)
    pattern = attention_pattern(model, ids, args.layer, args.head)  # [T, T]
    tokens = [_token_text(model)(i) for i in ids]
    print(f"attention pattern of layer {args.layer}, head {args.head} (rows: queries, columns: keys)")
    for token, row in zip(tokens, pattern):
        print(f"{token[:12]!r:>14} " + " ".join(f"{w:4.2f}" for w in row))
    if args.png:
        title = f"layer {args.layer}, head {args.head}"
        print(f"wrote {plot_attention_pattern(pattern, tokens, args.png, title)}")


def _token_text(model):
    """id -> its text (the id itself when the model has no tokenizer)."""
    return (lambda i: model.tokenizer.decode([i])) if model.tokenizer is not None else str


def cmd_niah(args):
    """Needle in a haystack over a grid of context lengths x depths; JSON after every cell, a heatmap."""
    from pathlib import Path

    from refqwen import niah

    try:
        contexts = [int(c) for c in args.contexts.split(",")]
        depths = [float(d) / 100 for d in args.depths.split(",")]
    except ValueError:
        raise RefqwenError(f"--contexts/--depths: expected comma-separated numbers like 1024,2048 and "
                           f"0,25,50,75,100, got {args.contexts!r} and {args.depths!r}") from None
    if not all(c > 0 for c in contexts) or not all(0 <= d <= 1 for d in depths):
        raise RefqwenError("--contexts must be positive token counts and --depths percentages in 0..100")
    out = Path(args.out)
    model = _load(args)
    print(f"haystack: {niah.HAYSTACK_SOURCE}; results: {out}", file=sys.stderr)
    results = niah.run_grid(model, contexts, depths, out, seed=args.seed, resume=args.resume)
    found, run = niah.score(results)
    print(f"found {found}/{run} needles; results in {out}")
    if args.png:
        niah.plot_heatmap(results, args.png)
        print(f"heatmap: {args.png}")


def _compare_ids(args, model) -> list[int]:
    if (args.prompt is None) == (args.ids is None):
        raise RefqwenError(f"{args.command}: give exactly one of --prompt TEXT or --ids 1,2,3")
    if args.ids is not None:
        try:
            return [int(i) for i in args.ids.split(",")]
        except ValueError:
            raise RefqwenError(f"--ids: expected comma-separated token ids like 1,2,3, got {args.ids!r}") from None
    if model.tokenizer is None:
        raise RefqwenError(f"--prompt: {model.source} has no tokenizer; give token ids with --ids 1,2,3")
    return model.tokenizer.encode(args.prompt)


def _parser() -> argparse.ArgumentParser:
    from refqwen import backends
    from refqwen.compare import ATOL, RTOL

    parser = OneLineErrors(prog="refqwen", description="Read, run and check Qwen2 models.")
    sub = parser.add_subparsers(dest="command", required=True)
    model_args = argparse.ArgumentParser(add_help=False)
    model_args.add_argument("--model", default="demo",
                            help="Hugging Face folder, .gguf file, or 'demo' (the embedded model, default)")
    model_args.add_argument("--backend", default="numpy", help=f"one of: {', '.join(backends.available())}")
    rope = model_args.add_mutually_exclusive_group()
    rope.add_argument("--yarn", type=float, metavar="FACTOR",
                      help="turn on YaRN with this factor over the checkpoint's window (4: 32K -> 128K)")
    model_args.add_argument("--dual-chunk-attention", metavar="JSON",
                            help="turn on Dual Chunk Attention, e.g. '{\"chunk_size\": 32768, \"local_size\": 4096}'")
    rope.add_argument("--rope-scaling", metavar="JSON", help="replace the checkpoint's rope_scaling, e.g. "
                      "'{\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}'")
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--max-new-tokens", type=int, default=256)
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    sampling.add_argument("--top-k", type=int, default=0)
    sampling.add_argument("--top-p", type=float, default=1.0)
    sampling.add_argument("--min-p", type=float, default=0.0)
    sampling.add_argument("--repetition-penalty", type=float, default=1.0)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", help="stop before this text (repeatable)")

    p = sub.add_parser("generate", parents=[model_args, sampling], help="stream a completion of a prompt")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end tokens (for benchmarks)")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", parents=[model_args, sampling], help="multi-turn conversation (stdin may be a pipe)")
    p.add_argument("--system", help="system prompt")
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("info", parents=[model_args], help="config, parameter counts and memory estimate")
    p.add_argument("--context", type=int, default=None, help="context length for the memory estimate "
                                                              "(default: the model's maximum)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("ppl", parents=[model_args], help="perplexity of a UTF-8 text file")
    p.add_argument("file")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--stride", type=int, default=None, help="default: the window (disjoint windows)")
    p.set_defaults(run=cmd_ppl)

    p = sub.add_parser("bench", parents=[model_args], help="prefill/decode speed and peak memory beside a baseline; "
                                                          "--backend takes a comma-separated list")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--baseline", default="transformers",
                   help="'transformers' (float32, default), a backend name, a llama.cpp engine "
                        "(llama.cpp:<file name without .gguf>), or 'none'")
    p.add_argument("--llama-cpp", metavar="GGUF[,GGUF]",
                   help="also run llama.cpp on these GGUF files ('demo': the embedded Q4_K_M model; "
                        "`refqwen quantize demo --gguf FILE` writes a Q8_0 one) in the same session")
    p.add_argument("--llama-cpp-python", metavar="PYTHON",
                   help="interpreter of an environment with llama-cpp-python (default: this one)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every engine")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("compare", parents=[model_args],
                       help="trace points of --backend against a reference; exit 1 if a tolerance is exceeded")
    p.add_argument("--against", default="numpy",
                   help=f"the reference: 'transformers' or a backend ({', '.join(backends.available())})")
    p.add_argument("--prompt", help="text to run, tokenized by the model's tokenizer")
    p.add_argument("--ids", help="token ids to run instead of a prompt, comma-separated")
    p.add_argument("--names", action="append",
                   help="trace points to compare, a glob (repeatable; default '*'; docs/numerics.md lists them)")
    p.add_argument("--atol", type=float, default=ATOL, help=f"absolute tolerance (default {ATOL:g})")
    p.add_argument("--rtol", type=float, default=RTOL, help=f"relative tolerance (default {RTOL:g})")
    p.add_argument("--json", help="also write the report to this JSON file")
    p.set_defaults(run=cmd_compare)

    from refqwen.quant import SCHEMES

    p = sub.add_parser("niah", parents=[model_args],
                       help="needle in a haystack: a grid of context lengths x needle depths, and its heatmap")
    p.add_argument("--contexts", default="1024,2048,4096,8192", help="context lengths in tokens, comma-separated")
    p.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent, comma-separated")
    p.add_argument("--out", default="niah.json", help="results JSON, rewritten after every cell")
    p.add_argument("--resume", action="store_true", help="continue the grid in --out, skipping finished cells")
    p.add_argument("--png", help="also draw the heatmap to this PNG (needs matplotlib: refqwen[plot])")
    p.add_argument("--seed", type=int, default=0, help="draws each cell's needle number")
    p.set_defaults(run=cmd_niah)

    p = sub.add_parser("quantize", help="write a quantized checkpoint (int8/int4 folder, or a Q8_0 GGUF); "
                                        "--report measures what it cost")
    p.add_argument("source", help="Hugging Face folder, .gguf file, or 'demo'")
    p.add_argument("out", help="output folder (or .gguf file with --gguf); written under a temporary name, "
                               "then renamed")
    p.add_argument("--scheme", default="int8-g32", choices=list(SCHEMES), help="see docs/quantization.md")
    p.add_argument("--keep", help="keep these matrices float32: a comma-separated subset of embed,lm_head")
    p.add_argument("--report", action="store_true", help="compare with the float32 source on the fixed corpus; "
                                                         "prints a table and writes quality_report.json")
    p.add_argument("--report-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512, help="window of the --report evaluation")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--gguf", action="store_true", help="write a llama.cpp GGUF with Q8_0 tensors (int8-g32 only)")
    p.add_argument("--shard-mib", type=int, default=2048, help="size limit of one safetensors file (MiB)")
    p.set_defaults(run=cmd_quantize)

    prompt = argparse.ArgumentParser(add_help=False)
    prompt.add_argument("--prompt", help="text to run, tokenized by the model's tokenizer")
    prompt.add_argument("--ids", help="token ids to run instead of a prompt, comma-separated")
    prompt.add_argument("--png", help="also draw the picture into this .png (needs the plot extra: matplotlib)")
    p = sub.add_parser("lens", parents=[model_args, prompt],
                       help="logit lens: the next tokens each layer's residual stream predicts")
    p.add_argument("--k", type=int, default=5, help="tokens per layer (default 5)")
    p.add_argument("--position", type=int, default=-1, help="which position to print (default: the last)")
    p.set_defaults(run=cmd_lens)
    p = sub.add_parser("pattern", parents=[model_args, prompt],
                       help="attention weights of one layer and head over the prompt")
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, required=True, help="query head")
    p.set_defaults(run=cmd_pattern)
    return parser


if __name__ == "__main__":
    sys.exit(main())
