"""How far a model (another backend, a quantized checkpoint) is from a reference model, on a text:
top-1 next-token agreement, KL divergence of next-token distributions, and both perplexities.

Windows and scored tokens are those of refqwen.perplexity (see its docstring).
"""

import json
import string
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from refqwen.errors import RefqwenError
from refqwen.perplexity import scored_logits, token_ids, token_nll

# The fixed evaluation corpus: sources every CPython 3.11 ships, concatenated in this order
# (tools/ppl_corpus.py writes it to a file).
CORPUS_FILES = [Path(json.__file__).parent / f for f in ("__init__.py", "decoder.py", "encoder.py", "scanner.py",
                                                         "tool.py")]
CORPUS_FILES += [Path(textwrap.__file__), Path(string.__file__)]


def corpus_text() -> str:
    return "".join(f.read_text(encoding="utf-8") for f in CORPUS_FILES)


@dataclass(frozen=True)
class Agreement:
    tokens: int
    top1_agreement: float  # fraction of positions where both pick the same most likely token
    mean_kl: float  # mean over positions of KL(reference || candidate), in nats
    max_kl: float
    ppl_reference: float
    ppl_candidate: float
    ppl_relative_diff: float  # (candidate - reference) / reference

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[T, V] -> [T, V], in float64 so that KL of nearly equal distributions is not rounding noise."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class ScoredReference:
    """A reference model's logits on one text, window by window, computed once to compare several candidates
    with: pass it to `agreement` as the reference. Holds V floats per scored token (151,936 for Qwen2: 155 MB
    for 256 tokens), so it suits short texts; `agreement` with the model itself recomputes them instead."""
    model: object
    ids: np.ndarray
    window: int
    stride: int
    pieces: tuple  # (logits [n, V], targets [n]) per scored piece, as perplexity.scored_logits yields them


def score_reference(model, text_or_ids, window: int = 512, stride: int | None = None,
                    progress: bool = True) -> ScoredReference:
    ids = token_ids(model, text_or_ids, window, stride)
    stride = stride or window
    return ScoredReference(model, ids, window, stride,
                           tuple(scored_logits(model, ids, window, stride, progress, desc="reference")))


def agreement(reference, candidate, text_or_ids, window: int = 512, stride: int | None = None,
              progress: bool = True) -> Agreement:
    """How far candidate is from reference (a model, or a ScoredReference of the same ids, window and stride)."""
    scored = reference if isinstance(reference, ScoredReference) else None
    ids = token_ids(scored.model if scored else reference, text_or_ids, window, stride)
    stride = stride or window
    if scored and ((window, stride) != (scored.window, scored.stride) or not np.array_equal(ids, scored.ids)):
        raise RefqwenError(f"agreement: the reference was scored on {len(scored.ids)} ids with window "
                           f"{scored.window} and stride {scored.stride}, not these {len(ids)} ids with window "
                           f"{window} and stride {stride}")
    reference_pieces = scored.pieces if scored else scored_logits(reference, ids, window, stride, progress,
                                                                  desc="reference")
    same, kl, nll_ref, nll_cand = [], [], [], []
    pieces = zip(reference_pieces, scored_logits(candidate, ids, window, stride, False))
    for (ref_logits, targets), (cand_logits, _) in pieces:
        same.append(ref_logits.argmax(-1) == cand_logits.argmax(-1))
        log_p, log_q = log_softmax(ref_logits), log_softmax(cand_logits)
        kl.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        nll_ref.append(token_nll(ref_logits, targets))
        nll_cand.append(token_nll(cand_logits, targets))
    kl = np.concatenate(kl)
    ppl_ref, ppl_cand = (float(np.exp(np.concatenate(n).mean())) for n in (nll_ref, nll_cand))
    return Agreement(len(kl), float(np.concatenate(same).mean()), float(kl.mean()), float(kl.max()),
                     ppl_ref, ppl_cand, (ppl_cand - ppl_ref) / ppl_ref)
