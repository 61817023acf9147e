"""The `refqwen` command."""

import argparse
import sys

from refqwen.errors import RefqwenError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="refqwen", description="Read, run and check Qwen2 models.")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="prefill/decode speed and peak memory beside a baseline")
    bench.add_argument("--model", default="demo", help="HF folder, .gguf file or 'demo' (default)")
    bench.add_argument("--backend", default="numpy")
    bench.add_argument("--prompt-tokens", type=int, default=512)
    bench.add_argument("--decode-tokens", type=int, default=32)
    bench.add_argument("--baseline", choices=["transformers", "none"], default="transformers")
    bench.add_argument("--repeats", type=int, default=1, help="interleaved repetitions of every engine")
    bench.add_argument("--json", help="also write the report to this JSON file")

    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            from refqwen.bench import run_bench

            run_bench(args.model, args.prompt_tokens, args.decode_tokens, args.baseline, args.backend, args.repeats,
                      args.json)
    except RefqwenError as e:
        print(f"refqwen: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
