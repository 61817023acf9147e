"""Perplexity over windows, defined exactly so the figure can be reproduced elsewhere.

For N tokens, window W and stride S (S <= W): window k covers tokens [kS, min(kS + W, N)).
Window k scores the tokens from max(end of window k-1, kS + 1) to its own end: each token is
scored at most once, predicted from the tokens before it inside its window only (a fresh KV
cache per window). A window's first token has no context in it and is not scored there, so
token 0 is never scored, and with S = W neither is the first token of any window.

    mean NLL = mean over scored tokens of -log softmax(logits)[token];  perplexity = exp(mean NLL)

With S = W (the default) the windows are disjoint: the transformers "sliding window"
recipe with stride = max_length.
"""

from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from refqwen.errors import RefqwenError
from refqwen.generate import check_int

CHUNK = 256  # tokens per forward call inside a window, so logits stay [256, V] at most


@dataclass(frozen=True)
class PerplexityResult:
    mean_nll: float
    perplexity: float
    tokens: int  # how many tokens were scored
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


def windows(n_tokens: int, window: int, stride: int):
    """Yield (begin, end, first_scored) for each window; tokens first_scored .. end-1 are scored."""
    scored_until = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(scored_until, begin + 1)  # a window's first token has no context in it
        if end > first:
            yield begin, end, first
        scored_until = end
        if end == n_tokens:
            return


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log p(target) per row, for logits [T, V] and targets [T]."""
    top = logits.max(axis=-1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))  # [T]
    return log_norm - logits[np.arange(len(targets)), targets]


def scored_logits(model, ids: np.ndarray, window: int, stride: int, progress: bool = True, desc="perplexity"):
    """Yield (logits [n, V], targets [n]) for every scored token, window by window, in pieces of
    at most CHUNK rows (so a 1024-token window never holds [1024, V] logits at once)."""
    spans = list(windows(len(ids), window, stride))
    for begin, end, first in tqdm(spans, desc=desc, unit="window", disable=not progress):
        cache = model.new_cache()
        for a in range(begin, end - 1, CHUNK):  # position p predicts token p + 1
            b = min(a + CHUNK, end - 1)
            logits = model.forward(ids[a:b], cache)  # [b - a, V]
            lo = max(a, first - 1)  # rows before first - 1 only give context
            if lo < b:
                yield logits[lo - a:], ids[lo + 1:b + 1]


def perplexity(model, text_or_ids, window: int = 1024, stride: int | None = None,
               progress: bool = True) -> PerplexityResult:
    ids = token_ids(model, text_or_ids, window, stride)
    stride = stride or window
    nll = np.concatenate([token_nll(logits, targets)
                          for logits, targets in scored_logits(model, ids, window, stride, progress)])
    mean = float(nll.mean())
    return PerplexityResult(mean, float(np.exp(mean)), len(nll), window, stride)


def token_ids(model, text_or_ids, window: int, stride: int | None) -> np.ndarray:
    """Checked ids for a perplexity-style evaluation."""
    check_int(window, "window", 1)
    stride = check_int(stride, "stride", 1) if stride is not None else window
    if isinstance(text_or_ids, str):
        if model.tokenizer is None:
            raise RefqwenError(f"{model.source}: no tokenizer; pass token ids instead of text")
        ids = model.tokenizer.encode(text_or_ids)
    else:
        ids = _checked_ids(text_or_ids, model.config.vocab_size)
    if not 0 < stride <= window:
        raise RefqwenError(f"stride must be in 1..window ({window}), got {stride}")
    if window > model.config.max_position_embeddings:
        raise RefqwenError(f"window {window} exceeds the context window of {model.config.max_position_embeddings}")
    if len(ids) < 2:
        raise RefqwenError(f"perplexity needs at least 2 tokens, got {len(ids)}")
    return np.asarray(ids)


def _checked_ids(ids, vocab_size: int) -> list[int]:
    """Every id (the last one too: it is only ever a target, never fed to the model) in the vocabulary."""
    if isinstance(ids, np.ndarray) and not np.issubdtype(ids.dtype, np.integer) and ids.size:
        raise RefqwenError(f"token ids must be integers, got an array of {ids.dtype}")
    ids = list(ids)
    for i, t in enumerate(ids):
        if not isinstance(t, (int, np.integer)) or isinstance(t, (bool, np.bool_)) or not 0 <= t < vocab_size:
            raise RefqwenError(f"token {i}: {t!r} is not a token id in the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]
