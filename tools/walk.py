"""How far a reader walks to follow one token: the refqwen files one forward pass runs through.

    PYTHONPATH=$PWD python tools/walk.py            # this checkout
    PYTHONPATH=/tmp/before python tools/walk.py     # another checkout (any layout since the trace API)

Builds a tiny dense model (one decoder layer unless --layers) with random weights (no transformers),
runs one forward pass of 3 token ids once to warm up, then again under sys.settrace, and records
which file of the package (refqwen/ or backends/) is executing after every call into and every
return out of a package function: the files a reader opens, and the switches between them,
following the token from Model.forward to the logits. NumPy's own code is not counted. Three views:

  all           every package frame ("step into" in a plain debugger)
  no tracing    without the trace hook modules (refqwen/trace.py, refqwen/model/hooks.py)
  debugger      also without the backend plumbing a debugger recipe can skip (backends/base.py or
                refqwen/model/ops.py), as pdb.Pdb(skip=[...]) in docs/tour.md does
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import refqwen

ROOT = Path(refqwen.__file__).resolve().parent.parent
TRACING = {"refqwen/trace.py", "refqwen/model/hooks.py"}
PLUMBING = {"backends/base.py", "refqwen/model/ops.py"}


def tiny_model(layers: int):
    from refqwen import Config, Model

    try:
        from refqwen.checkpoint.weights import expected_shapes
    except ImportError:  # the layout before refqwen/checkpoint/
        from refqwen.weights import expected_shapes
    cfg = Config.from_hf_dict(dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   architectures=["Qwen2ForCausalLM"]))
    rng = np.random.default_rng(0)
    weights = {n: (0.2 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_shapes(cfg).items()}
    return Model(cfg, weights)


def package_file(filename: str) -> str | None:
    """The file relative to the checkout ('refqwen/model/norm.py'), or None outside the package."""
    path = Path(filename).resolve()
    if not path.is_relative_to(ROOT):
        return None
    rel = path.relative_to(ROOT).as_posix()
    return rel.replace("refqwen/backends/", "backends/") if rel.startswith(("refqwen/", "backends/")) else None


def walk(forward, excluded: set[str]) -> list[str]:
    """The package files in the order a forward pass moves between them (consecutive repeats merged)."""
    files = []

    def visit(name):
        if name and (not files or files[-1] != name):
            files.append(name)

    def on_call(frame, event, arg):
        name = package_file(frame.f_code.co_filename)
        if name is None or name in excluded:
            return None  # NumPy, or a module this view skips: where control is does not change
        visit(name)
        return on_return

    def on_return(frame, event, arg):
        if event == "return":  # back in the nearest counted caller
            caller = frame.f_back
            while caller is not None:
                name = package_file(caller.f_code.co_filename)
                if name is not None and name not in excluded:
                    visit(name)
                    break
                caller = caller.f_back
        return on_return

    sys.settrace(on_call)
    try:
        forward()
    finally:
        sys.settrace(None)
    return files


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1,
                        help="decoder layers (default 1: a reader follows the token through one layer)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", action="store_true", help="also print the walk itself")
    args = parser.parse_args()
    model = tiny_model(args.layers)
    ids = [5, 17, 3]
    model.forward(ids)  # warm up: cached properties, lazy imports
    report = {"checkout": str(ROOT)}
    for view, excluded in (("all", set()), ("no tracing", TRACING), ("debugger", TRACING | PLUMBING)):
        files = walk(lambda: model.forward(ids), excluded)
        report[view] = dict(files=len(set(files)), switches=len(files) - 1, file_list=sorted(set(files)),
                            walk=files if args.show else None)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"checkout: {ROOT}")
    for view in ("all", "no tracing", "debugger"):
        r = report[view]
        print(f"{view:11} {r['files']:3} files, {r['switches']:4} switches   {', '.join(r['file_list'])}")
        if args.show:
            print("   " + " > ".join(r["walk"]))


if __name__ == "__main__":
    main()
