"""docs/tour.md runs as written: its Python blocks in order, in one namespace; a `text` block right
after a Python block is that block's exact output; the debugger block is driven by a script of
`s` (step) commands, and the frames it stops in are checked."""

import contextlib
import io
import re
import sys
from pathlib import Path

import pytest

import refqwen

LOAD = refqwen.load

TOUR = Path(__file__).resolve().parent.parent / "docs" / "tour.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.M | re.S)
STOP = re.compile(r"> (\S+)\(\d+\)(\w+)\(\)")  # pdb's "> /path/file.py(12)function()" at each stop


def tour_blocks() -> list[tuple[str, str | None]]:
    """(python source, the text block right after it or None), in the order of the page."""
    text = TOUR.read_text(encoding="utf-8")
    fences = list(FENCE.finditer(text))
    blocks = []
    for n, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        after = fences[n + 1] if n + 1 < len(fences) else None
        adjacent = after is not None and after.group(1) == "text" and not text[m.end():after.start()].strip()
        blocks.append((m.group(2), after.group(2) if adjacent else None))
    return blocks


def run_block(source: str, namespace: dict, stdin: str = "") -> str:
    out = io.StringIO()
    old_stdin, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(source, str(TOUR), "exec"), namespace)
    finally:
        sys.stdin = old_stdin
    return out.getvalue()


def test_the_tour_has_what_it_promises():
    blocks = tour_blocks()
    assert len(blocks) >= 8
    sources = "\n".join(source for source, _ in blocks)
    for call in ("refqwen.tiny_model()", "refqwen.trace(", 'refqwen.load("demo"', "pdb.Pdb(skip=", "yarn",
                 "tiny_model(moe=True)", "logit_lens(", "attention_pattern("):
        assert call in sources


@pytest.fixture(scope="module")
def debugger_output(demo):
    """Run every block of the tour; return what the debugger block printed."""
    namespace, printed = {"__name__": "tour"}, None
    with pytest.MonkeyPatch.context() as patch:
        # the tour's refqwen.load("demo", progress=False) is the session's `demo` fixture: load it once
        patch.setattr(refqwen, "load", lambda path, **kw: demo if (path, kw) == ("demo", {"progress": False})
                      else LOAD(path, **kw))
        printed = run_all_blocks(namespace)
    assert printed is not None
    return printed


def run_all_blocks(namespace):
    printed = None
    for source, expected in tour_blocks():
        if "pdb.Pdb(" in source:
            printed = run_block(source, namespace, stdin="s\n" * 5000 + "c\n")
            continue
        out = run_block(source, namespace)
        if expected is not None:
            assert out.rstrip() == expected.rstrip(), f"the tour's block\n{source}\nprinted\n{out}"
    return printed


def test_every_block_runs_and_prints_what_the_page_shows(debugger_output):
    pass  # the fixture compared every printed output


def test_the_debugger_steps_straight_into_the_math(debugger_output):
    stops = [(Path(path).name if "/refqwen/model/" in path else path, function)
             for path, function in STOP.findall(debugger_output)]
    assert stops[0] == ("model.py", "forward")
    walk = [s for n, s in enumerate(stops) if n == 0 or s != stops[n - 1]]  # each entry into a function once
    math = [s for s in walk if not s[0].endswith("bdb.py")]  # after forward returns, pdb stops in its runner
    assert walk[len(math):] and all(s[0].endswith("bdb.py") for s in walk[len(math):]), "forward did not finish"
    # only the model's own files: no trace hooks, no backend plumbing, no NumPy or functools internals
    files = {f for f, _ in math}
    assert files <= {"model.py", "config.py", "rope.py", "cache.py", "norm.py", "attention.py",
                     "linear.py", "mlp.py"}, files
    # every layer: rms_norm first, then attention with its pieces, rms_norm, the MLP with swiglu
    layer = [("model.py", "__call__"), ("norm.py", "rms_norm"), ("attention.py", "__call__"), ("linear.py", "linear"),
             ("rope.py", "apply_rotary"), ("cache.py", "append"), ("attention.py", "causal_attention"),
             ("norm.py", "rms_norm"), ("mlp.py", "__call__"), ("mlp.py", "swiglu")]
    rest = iter(math)
    for _ in range(4):  # the tiny model's 4 layers
        for step in layer:
            assert any(s == step for s in rest), f"the walk does not reach {step} in order: {walk}"
    # straight into the math: the stop after entering a DecoderLayer is inside rms_norm
    first_layer = walk.index(("model.py", "__call__"))
    assert walk[first_layer + 1] == ("norm.py", "rms_norm")
    assert sum(s == ("norm.py", "rms_norm") for s in walk) == 2 * 4 + 1  # two per layer, and the final norm


def test_the_breakpoint_recipe_stops_in_swiglu():
    import pdb

    command = "import refqwen.model.mlp as mlp;; b mlp.swiglu"
    assert f"(Pdb) {command}\n(Pdb) c\n" in TOUR.read_text(encoding="utf-8")
    model = refqwen.tiny_model()
    out = io.StringIO()
    old_stdin, sys.stdin = sys.stdin, io.StringIO(f"{command}\nc\nc\n")
    try:
        with contextlib.redirect_stdout(out):
            pdb.Pdb(skip=["refqwen.model.hooks", "refqwen.model.ops", "numpy", "numpy.*", "functools"]).runcall(
                model.forward, [5, 17, 3])
    finally:
        sys.stdin = old_stdin
    stops = STOP.findall(out.getvalue())
    assert stops[0][1] == "forward" and stops[1] == (str(Path(refqwen.model.mlp.__file__)), "swiglu"), stops
