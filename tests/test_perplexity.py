"""Perplexity equals the figure computed from transformers' logits over the same windows."""

import math

import numpy as np
import pytest
import torch

import refqwen
from refqwen.perplexity import windows

# Mean NLL tolerance: per-token log-probabilities inherit the real-model logit tolerance
# (REAL_LOGITS_ATOL = 1e-3 in test_real_model.py, observed ~1e-4); the mean is within that too.
NLL_ATOL = 1e-3

TEXT = ("The standard library's json module encodes and decodes JSON. "
        "import json\nprint(json.dumps({'a': [1, 2, 3]}, indent=2))\n"
        "Perplexity measures how well a language model predicts a sample of text; "
        "lower values mean the model finds the text less surprising. ") * 3


def transformers_nll(model, ids, window, stride):
    """The transformers recipe: labels -100 on tokens already scored, loss over the rest."""
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :max(prev_end - begin, 0)] = -100  # already scored in an earlier window
        with torch.no_grad():
            logits = model(x).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1)
        targets = labels[0, 1:]
        keep = targets != -100
        total += -logp[keep.nonzero()[:, 0], targets[keep]].sum().item()
        count += int(keep.sum())
        prev_end = end
        if end == len(ids):
            break
    return total / count, count


@pytest.mark.parametrize("window,stride", [(64, 64), (64, 24), (1024, None)])
def test_perplexity_matches_transformers(window, stride, demo, hf):
    tokenizer, model = hf
    ids = tokenizer(TEXT)["input_ids"]
    result = refqwen.perplexity(demo, TEXT, window=window, stride=stride, progress=False)
    expected, count = transformers_nll(model, ids, window, stride or window)
    assert result.tokens == count
    assert abs(result.mean_nll - expected) < NLL_ATOL
    assert result.perplexity == pytest.approx(math.exp(result.mean_nll))


def test_windows_score_every_token_once():
    for n, w, s in [(10, 4, 4), (10, 4, 2), (3, 8, 8), (100, 16, 5), (17, 17, 1)]:
        scored = [t for _, end, first in windows(n, w, s) for t in range(first, end)]
        assert len(scored) == len(set(scored))
        assert set(scored) == set(range(1, n)) - set(range(w if s == w else n, n, w))
    assert list(windows(10, 4, 4)) == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]


def test_perplexity_errors(demo):
    with pytest.raises(refqwen.RefqwenError, match="stride must be in"):
        refqwen.perplexity(demo, [1, 2, 3], window=4, stride=5)
    with pytest.raises(refqwen.RefqwenError, match="at least 2 tokens"):
        refqwen.perplexity(demo, [1])
    assert np.isfinite(refqwen.perplexity(demo, [1, 2], progress=False).mean_nll)
