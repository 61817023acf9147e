"""Text generation: choosing the next token (greedy or sampled), stopping, and streaming text.

The next-token rule applies, in transformers' order: repetition penalty, then temperature,
top-k, top-p and min-p; temperature 0 means greedy (argmax after the penalty).
"""

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from refqwen.arrays import array_module
from refqwen.errors import RefqwenError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not np.isfinite(value):
                raise RefqwenError(f"{name} must be a finite number, got {value!r}")
        check_int(self.top_k, "top_k")
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise RefqwenError(message)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_int(value, name: str, minimum: int = 0) -> int:
    """`value` if it is an integer >= minimum (not a bool, not a float); else a RefqwenError naming it."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or value < minimum:
        raise RefqwenError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_stop(stop) -> list[str]:
    """Stop strings: one string or a list of non-empty strings."""
    stop = [stop] if isinstance(stop, str) else stop
    if stop is None:
        return []
    if not isinstance(stop, (list, tuple, set, frozenset)) or not all(isinstance(s, str) and s for s in stop):
        raise RefqwenError(f"stop must be a string or a list of non-empty strings, got {stop!r:.100}")
    return list(stop)


def check_generation_args(max_new_tokens, seed, stop) -> list[str]:
    check_int(max_new_tokens, "max_new_tokens")
    if seed is not None:
        check_int(seed, "seed")
    return check_stop(stop)


def next_token(logits: np.ndarray, history: list[int], s: Sampling, rng: np.random.Generator) -> int:
    """Choose the next token from logits [V], given every token so far (for the repetition penalty).

    logits may be a CuPy array: the NumPy calls below then run on the GPU (refqwen/arrays.py), and
    only the chosen id comes back to the host."""
    logits = penalize_repetition(logits, history, s.repetition_penalty)
    if s.temperature == 0:
        return int(np.argmax(logits))
    probs = sampling_probs(logits, s)
    xp = array_module(probs)
    chosen = xp.searchsorted(np.cumsum(probs), xp.asarray([rng.random()]), side="right")  # [1]
    return min(int(chosen[0]), len(probs) - 1)


def penalize_repetition(logits: np.ndarray, history: list[int], penalty: float) -> np.ndarray:
    """transformers' rule: seen tokens move away from being chosen, whatever their sign.  -> a copy"""
    logits = logits.astype(np.float32)
    if penalty != 1.0 and history:
        seen = array_module(logits).asarray(np.unique(history))
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
    return logits


def sampling_probs(logits: np.ndarray, s: Sampling) -> np.ndarray:
    """The distribution to sample from: temperature, then top-k, top-p and min-p filtering.  -> [V]"""
    logits = logits / np.float32(s.temperature)
    if 0 < s.top_k < len(logits):
        kth = len(logits) - s.top_k  # as an index from the front: CuPy's partition takes no negative kth
        kth_largest = np.partition(logits, kth)[kth]
        logits[logits < kth_largest] = -np.inf
    probs = _softmax(logits)
    if s.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")  # most likely first
        before = np.cumsum(probs[order]) - probs[order]  # probability mass ranked above each token
        probs[order[before >= s.top_p]] = 0  # keep the smallest prefix whose mass reaches top_p
    if s.min_p > 0:
        probs[probs < s.min_p * probs.max()] = 0
    return probs / probs.sum()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


PREFILL_CHUNK = 2048  # prompt tokens per forward pass: activations stay bounded (T x MLP width floats)


def prefill(model, prompt_ids, cache, chunk: int = PREFILL_CHUNK, progress: bool | None = None):
    """Run the prompt through the model in chunks of `chunk` tokens, filling the cache; the logits
    after its last token ([V], where the backend keeps them). A progress bar shows for prompts longer
    than one chunk (progress None: only on a terminal)."""
    spans = range(0, len(prompt_ids), chunk)
    quiet = True if len(spans) < 2 else None if progress is None else not progress  # tqdm: None = not a tty
    logits = None
    for begin in tqdm(spans, desc=f"prefill {len(prompt_ids)} tokens", unit="chunk", leave=False, disable=quiet):
        logits = model.logits(prompt_ids[begin:begin + chunk], cache, last_only=True)[-1]
    return logits


def generate_ids(model, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int | None,
                 stop_ids=frozenset()):
    """Yield new token ids until a stop id (not yielded), max_new_tokens, or a full context window."""
    limit = model.config.context_window
    if len(prompt_ids) >= limit:
        raise RefqwenError(model.config.too_long(len(prompt_ids) + 1, f"a prompt of {len(prompt_ids)} tokens "
                                                 "and one generated token"))
    rng = np.random.default_rng(seed)
    cache = model.new_cache()
    cache.reserve(min(limit, len(prompt_ids) + max_new_tokens))  # the steps after the prompt then copy nothing
    logits = prefill(model, prompt_ids, cache)  # [V], where the backend keeps it
    history = list(prompt_ids)
    for i in range(max_new_tokens):
        token = next_token(logits, history, sampling, rng)
        if token in stop_ids:
            return
        yield token
        history.append(token)
        if i + 1 == max_new_tokens or cache.length == limit:
            return
        logits = model.ops.decode(model, token, cache)[-1]


class TextStream:
    """Turns token ids into text pieces that never end inside a multi-byte UTF-8 character.

    Decoding a token alone can give half a character; we decode a short window of recent
    tokens and emit only what has become complete (the incremental decoding of TGI/vLLM).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = 0  # window start: context so the next piece decodes correctly
        self.done = 0  # tokens whose text has been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        emitted = self.tokenizer.decode(self.ids[self.start:self.done])
        text = self.tokenizer.decode(self.ids[self.start:])
        if len(text) <= len(emitted) or text.endswith("\ufffd"):  # incomplete character: wait
            return ""
        self.start, self.done = self.done, len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is left (an incomplete character if generation stopped inside one)."""
        emitted = self.tokenizer.decode(self.ids[self.start:self.done])
        rest = self.tokenizer.decode(self.ids[self.start:])[len(emitted):]
        self.start = self.done = len(self.ids)
        return rest


def stream_text(pieces, stop: list[str]):
    """Pass text pieces through, ending before the first stop string; text that might begin a
    stop string is held back until it is clear that it does not."""
    held = ""
    for piece in pieces:
        held += piece
        hits = [i for i in (held.find(s) for s in stop) if i >= 0]
        if hits:
            if min(hits):
                yield held[:min(hits)]
            return
        keep = max((n for s in stop for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held


def prompt_ids(model, prompt) -> list[int]:
    """A str is encoded as is; a list of messages goes through the chat template; ids pass through."""
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in prompt):
        return [int(t) for t in prompt]
    tokenizer = _need_tokenizer(model)
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if not isinstance(prompt, (list, tuple)):
        raise RefqwenError(f"prompt must be text, a list of chat messages or a list of token ids, "
                           f"got {type(prompt).__name__}")
    return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)


def stream(model, prompt, max_new_tokens: int = 256, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
           repetition_penalty=1.0, seed=None, stop=(), ignore_eos=False):
    """Yield the completion as text pieces (see Model.stream)."""
    tokenizer = _need_tokenizer(model)
    stop = check_generation_args(max_new_tokens, seed, stop)
    sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    stop_ids = frozenset() if ignore_eos else tokenizer.end_token_ids
    tokens = generate_ids(model, prompt_ids(model, prompt), max_new_tokens, sampling, seed, stop_ids)
    text = TextStream(tokenizer)

    def pieces():
        for token in tokens:
            yield text.add(token)
        yield text.flush()

    yield from (p for p in stream_text(pieces(), list(stop)) if p)


def generate(model, prompt, max_new_tokens: int = 256, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
             repetition_penalty=1.0, seed=None, stop=(), ignore_eos=False) -> str:
    """The completion as one string, decoded from all its tokens at once (see Model.generate)."""
    tokenizer = _need_tokenizer(model)
    stop = check_generation_args(max_new_tokens, seed, stop)
    sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty)
    stop_ids = frozenset() if ignore_eos else tokenizer.end_token_ids
    ids = []
    for token in generate_ids(model, prompt_ids(model, prompt), max_new_tokens, sampling, seed, stop_ids):
        ids.append(token)
        if stop and any(s in tokenizer.decode(ids) for s in stop):
            break
    text = tokenizer.decode(ids)
    cut = min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))
    return text[:cut]


def _need_tokenizer(model):
    if model.tokenizer is None:
        raise RefqwenError(f"{model.source}: no tokenizer (a Hugging Face folder needs tokenizer.json); "
                           f"pass token ids instead of text")
    return model.tokenizer
