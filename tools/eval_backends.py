#!/usr/bin/env python3
"""Quality of each backend against the float32 reference on the demo model (or --model).

    python tools/eval_backends.py [--tokens 4096] [--window 512] [--json out.json]

Text: the perplexity corpus of refqwen/evaluate.py (Python standard-library sources; tools/ppl_corpus.py
writes it), its first --tokens tokens, in disjoint windows. Reports top-1 agreement, mean and max KL and
perplexities; see refqwen/evaluate.py.
"""

import argparse
import json
from pathlib import Path

import refqwen
from refqwen import backends
from refqwen.evaluate import agreement, corpus_text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backends", nargs="*", default=[n for n, why in backends.available().items()
                                                          if why is None and n != "numpy"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args()
    reference = refqwen.load(args.model)
    ids = reference.tokenizer.encode(corpus_text())[: args.tokens]
    rows = {}
    for name in args.backends:
        candidate = refqwen.load(args.model, backend=name)
        rows[name] = agreement(reference, candidate, ids, window=args.window).to_dict()
        del candidate
    print(f"{'backend':<22}{'tokens':>8}{'top-1 agree':>13}{'mean KL':>10}{'max KL':>9}{'ppl ref':>9}"
          f"{'ppl':>9}{'ppl diff':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r['tokens']:>8}{r['top1_agreement']:>13.4f}{r['mean_kl']:>10.5f}{r['max_kl']:>9.4f}"
              f"{r['ppl_reference']:>9.4f}{r['ppl_candidate']:>9.4f}{r['ppl_relative_diff']:>+10.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
