"""Needle in a haystack: the prompt protocol, one real cell on the demo model, and a grid that is
interrupted and resumed without losing or repeating a finished cell."""

import json
import re

import numpy as np
import pytest

from refqwen import niah
from refqwen.errors import RefqwenError


def test_one_cell_on_the_demo_model(demo):
    cell = niah.run_cell(demo, 512, 0.5, seed=0)
    assert cell["prompt_tokens"] == 512
    assert cell["found"], cell["answer"]


def test_prompt_has_the_length_asked_and_one_needle_at_the_depth(demo):
    haystack_ids = demo.tokenizer.encode(niah.haystack_text())
    for context, depth in [(300, 0.0), (700, 0.5), (700, 1.0), (2048, 0.25)]:
        ids = niah.build_prompt(demo.tokenizer, context, depth, 1234567, haystack_ids)
        assert context - 3 <= len(ids) <= context  # exact, or a few tokens short where no cut fits
        prompt = demo.tokenizer.decode(ids)
        assert prompt.count("1234567") == 1 and niah.QUESTION in prompt
        user = prompt.index("<|im_start|>user\n") + len("<|im_start|>user\n")
        haystack = prompt[user:prompt.index(niah.QUESTION)]
        where = haystack.index(niah.NEEDLE.format(value=1234567)) / len(haystack)
        assert abs(where - depth) < 0.1, (context, depth, where)
    with pytest.raises(RefqwenError, match="context 10: must be between"):
        niah.build_prompt(demo.tokenizer, 10, 0.5, 1, haystack_ids)


def test_needle_goes_at_the_nearest_sentence_end():
    text = "One two. Three four five. Six."
    assert niah.insert_at_sentence(text, "X.", 0.0) == "X. One two. Three four five. Six."
    assert niah.insert_at_sentence(text, "X.", 0.3) == "One two. X.  Three four five. Six."
    assert niah.insert_at_sentence("Code\n\nmore code", "X.", 0.5) == "Code\n\n X. more code"
    assert niah.insert_at_sentence(text, "X.", 1.0) == "One two. Three four five. Six. X."


def test_each_cell_has_its_own_needle():
    values = {niah.needle_value(0, c, d) for c in (1024, 2048, 4096) for d in (0, 0.25, 0.5, 0.75, 1)}
    assert len(values) == 15 and all(1_000_000 <= v < 10_000_000 for v in values)
    assert niah.needle_value(0, 1024, 0.5) == niah.needle_value(0, 1024, 0.5)


class ScriptedModel:
    """Stands in for a model in the grid bookkeeping tests: answers with the number in the prompt,
    and can be told to be interrupted (Ctrl-C) at its n-th answer."""

    def __init__(self, tokenizer, interrupt_at=None):
        self.tokenizer, self.interrupt_at, self.calls = tokenizer, interrupt_at, []
        self.source, self.backend = "scripted", "none"

    def generate(self, ids, max_new_tokens, temperature):
        self.calls.append(len(ids))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        return re.search(r"The secret number is (\d+)\.", self.tokenizer.decode(ids)).group(1)


def test_interrupted_grid_loses_no_cell_and_resume_finishes_it(demo, tmp_path):
    out = tmp_path / "niah.json"
    grid = dict(contexts=[200, 300], depths=[0.0, 0.5, 1.0])
    with pytest.raises(KeyboardInterrupt):
        niah.run_grid(ScriptedModel(demo.tokenizer, interrupt_at=4), out=out, progress=False, **grid)
    saved = json.loads(out.read_text())
    assert [(c["context"], c["depth"]) for c in saved["cells"]] == [(200, 0.0), (200, 0.5), (200, 1.0)]
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind
    with pytest.raises(RefqwenError, match="exists; pass resume"):
        niah.run_grid(ScriptedModel(demo.tokenizer), out=out, progress=False, **grid)
    model = ScriptedModel(demo.tokenizer)
    results = niah.run_grid(model, out=out, resume=True, progress=False, **grid)
    assert len(model.calls) == 3  # only the unfinished cells ran
    assert [(c["context"], c["depth"]) for c in results["cells"]] == [(c, d) for c in (200, 300)
                                                                      for d in (0.0, 0.5, 1.0)]
    assert json.loads(out.read_text()) == results
    with pytest.raises(RefqwenError, match="other settings, cannot resume it: seed 0 \\(now 1\\)"):
        niah.run_grid(ScriptedModel(demo.tokenizer), out=out, seed=1, resume=True, progress=False, **grid)


def test_heatmap_png(tmp_path):
    pytest.importorskip("matplotlib")  # in the test extra
    cells = [{"context": c, "depth": d, "found": (c + int(d * 4)) % 3 != 0} for c in (1024, 2048) for d in (0, .5, 1)]
    results = {"settings": {"model": "m", "backend": "numpy"}, "cells": cells}
    niah.plot_heatmap(results, tmp_path / "h.png")
    from matplotlib.image import imread

    image = imread(tmp_path / "h.png")
    assert image.ndim == 3 and image.shape[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]
    reds = np.sum((image[..., 0] > 0.8) & (image[..., 1] < 0.2))
    greens = np.sum((image[..., 1] > 0.5) & (image[..., 0] < 0.2))
    assert reds > 100 and greens > 100  # both outcomes drawn in their colours
