"""Needle in a haystack: can the model find one sentence hidden in a long context?

The protocol (gkamradt's test, as the Qwen2 release reports it; docs/long-context.md):
- the haystack is Python's own reference documentation as shipped with Python, the stdlib module
  `pydoc_data.topics` (offline, public, the same text for everyone on one Python version);
- for each context length L (tokens) and depth d (0 % = the start, 100 % = the end), the haystack
  is cut to fit L tokens with the question (or a few less where no cut fits exactly), and the needle
  "The secret number is N." is inserted at the sentence or paragraph end nearest d % of the text;
  N is a random 7-digit number drawn per cell;
- the haystack and a question go through the model's chat template; the answer is greedy;
- a cell scores 1 if N's digits occur in the answer.
Results are written after every cell (atomically), so an interrupted grid loses no finished cell
and `resume` continues it.
"""

import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from refqwen.errors import RefqwenError

HAYSTACK_SOURCE = (f"Python {sys.version_info.major}.{sys.version_info.minor}'s reference documentation "
                   "(stdlib module pydoc_data.topics)")
NEEDLE = "The secret number is {value}."
QUESTION = "What is the secret number mentioned in the text above? Answer with the number only."
ANSWER_TOKENS = 16  # a 7-digit number and a few words fit


def haystack_text() -> str:
    """Every topic of Python's reference documentation, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def needle_value(seed: int, context: int, depth: float) -> int:
    """The cell's random 7-digit number (a different one per cell, the same on every run)."""
    rng = np.random.default_rng([seed, context, int(round(depth * 1000))])
    return int(rng.integers(1_000_000, 10_000_000))


def insert_at_sentence(text: str, sentence: str, depth: float) -> str:
    """Insert `sentence` at the sentence (or paragraph) end nearest `depth` (0..1) of the text."""
    ends = [0] + [m.end() for m in re.finditer(r"[.!?](?=\s)|\n\n", text)] + [len(text)]
    at = min(ends, key=lambda i: abs(i - depth * len(text)))
    return f"{text[:at]} {sentence} {text[at:]}".strip()


def build_prompt(tokenizer, context: int, depth: float, value: int, haystack_ids=None) -> list[int]:
    """Token ids of the chat prompt of one cell, about `context` tokens long."""
    haystack_ids = haystack_ids if haystack_ids is not None else tokenizer.encode(haystack_text())

    def prompt(n):  # the prompt with the first n haystack tokens
        text = insert_at_sentence(tokenizer.decode(haystack_ids[:n]), NEEDLE.format(value=value), depth)
        messages = [{"role": "user", "content": f"{text}\n\n{QUESTION}"}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    overhead = len(prompt(0))  # template, needle and question
    if context <= overhead or context - overhead > len(haystack_ids):
        raise RefqwenError(f"context {context}: must be between {overhead + 1} and "
                           f"{overhead + len(haystack_ids)} tokens for this haystack and tokenizer")
    n = context - overhead
    for _ in range(8):  # retokenizing at the cut and around the needle can move the count a little
        ids = prompt(n)
        if len(ids) == context:
            return ids
        n += context - len(ids)
    while len(ids) > context:  # no cut gives exactly `context` tokens: the longest shorter prompt
        n -= 1
        ids = prompt(n)
    return ids


def run_cell(model, context: int, depth: float, seed: int, haystack_ids=None) -> dict:
    """One cell: build the prompt, answer greedily, score, time and measure it."""
    value = needle_value(seed, context, depth)
    ids = build_prompt(model.tokenizer, context, depth, value, haystack_ids)
    began = time.perf_counter()
    answer = model.generate(ids, ANSWER_TOKENS, temperature=0)
    return {"context": context, "depth": depth, "needle": value, "prompt_tokens": len(ids),
            "answer": answer, "found": str(value) in answer, "seconds": round(time.perf_counter() - began, 2),
            "peak_rss_gib": round(_peak_rss_gib(), 3)}


def run_grid(model, contexts, depths, out, seed: int = 0, resume: bool = False, progress: bool = True) -> dict:
    """Run every (context, depth) cell not yet in `out` (a JSON file), writing it after each cell."""
    from tqdm import tqdm

    out = Path(out)
    settings = {"model": model.source, "backend": model.backend, "seed": seed, "haystack": HAYSTACK_SOURCE,
                "needle": NEEDLE, "question": QUESTION, "answer_tokens": ANSWER_TOKENS}
    results = {"settings": settings, "cells": []}
    if out.exists():
        if not resume:
            raise RefqwenError(f"{out} exists; pass resume to continue it, or choose another file")
        results = _read_results(out, settings)
    done = {(c["context"], c["depth"]) for c in results["cells"]}
    todo = [(c, d) for c in contexts for d in depths if (c, d) not in done]
    haystack_ids = model.tokenizer.encode(haystack_text())
    bar = tqdm(todo, desc="needle in a haystack", unit="cell", disable=not progress)
    for context, depth in bar:
        bar.set_postfix_str(f"{context} tokens, depth {depth:.0%}")
        cell = run_cell(model, context, depth, seed, haystack_ids)
        results["cells"].append(cell)
        write_json_atomically(out, results)
        bar.write(f"{context:>6} tokens, depth {depth:>4.0%}: {'found' if cell['found'] else 'MISSED'} "
                  f"({cell['seconds']} s) {cell['answer'].strip()[:40]!r}")
    return results


def score(results: dict) -> tuple[int, int]:
    """(cells found, cells run)"""
    return sum(c["found"] for c in results["cells"]), len(results["cells"])


def plot_heatmap(results: dict, png) -> None:
    """Context length on x, depth on y, red (missed) -> yellow -> green (found), as in the Qwen2 post."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        raise RefqwenError("the heatmap needs matplotlib: pip install 'refqwen[plot]'") from None
    contexts = sorted({c["context"] for c in results["cells"]})
    depths = sorted({c["depth"] for c in results["cells"]})
    grid = np.full((len(depths), len(contexts)), np.nan)  # [depth, context]; NaN: not run
    for c in results["cells"]:
        grid[depths.index(c["depth"]), contexts.index(c["context"])] = float(c["found"])
    fig, ax = plt.subplots(figsize=(1.2 * len(contexts) + 2.5, 0.5 * len(depths) + 2))
    cmap = LinearSegmentedColormap.from_list("niah", ["#d7191c", "#ffffbf", "#1a9641"])
    image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(contexts)), [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    found, run = score(results)
    s = results["settings"]
    ax.set_title(f"needle in a haystack: {found}/{run} found\n{Path(s['model']).name} ({s['backend']})", fontsize=9)
    fig.colorbar(image, ax=ax, ticks=[0, 1], label="found")
    fig.tight_layout()
    png = Path(png)
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, png)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def write_json_atomically(path: Path, data) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_results(path: Path, settings: dict) -> dict:
    try:
        results = json.loads(path.read_text())
        cells = results["cells"]
    except (ValueError, KeyError, TypeError) as e:
        raise RefqwenError(f"{path}: not a needle-in-a-haystack results file ({e})") from None
    differs = {k: (results["settings"].get(k), v) for k, v in settings.items() if results["settings"].get(k) != v}
    if differs:
        raise RefqwenError(f"{path}: was run with other settings, cannot resume it: "
                           + ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in differs.items()))
    return {"settings": results["settings"], "cells": cells}


def _peak_rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20
