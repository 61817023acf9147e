"""Two views interpretability users expect (TransformerLens names them the same way):

- the **logit lens**: what the model would predict if it stopped after layer i — the residual
  stream after that layer put through the final norm and lm_head, exactly as `Model.logits`
  treats the last one (nostalgebraist, 2020);
- the **attention pattern** of one layer and head over a prompt: row t holds the weights
  query t gives to each key, the `layers.{i}.attn.pattern` trace point.

Both run one traced forward pass (refqwen/trace.py) on any backend; the pictures need the
optional extra `plot` (matplotlib): `pip install "refqwen[plot]"`.
"""

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from refqwen.errors import RefqwenError
from refqwen.trace import trace


@dataclass
class LogitLens:
    """The top-k next tokens each stage of the residual stream predicts, at every position.

    stages: "embed", then "layers.0" .. "layers.{N-1}" (the residual stream after each layer).
    top_ids, top_probs [stages, T, k]: the k most probable tokens, most probable first, and their
    softmax probabilities. The last stage's prediction is the model's own.
    """

    ids: list[int]
    stages: list[str]
    top_ids: np.ndarray
    top_probs: np.ndarray

    def table(self, token_text=str, position: int = -1) -> str:
        """One line per stage: its top-k tokens (with probabilities) at `position`."""
        if not -len(self.ids) <= position < len(self.ids):
            raise RefqwenError(f"position: expected -{len(self.ids)} .. {len(self.ids) - 1} "
                               f"(the prompt has {len(self.ids)} tokens), got {position}")
        t = range(len(self.ids))[position]
        lines = [f"logit lens at position {t} (after token {token_text(self.ids[t])!r}):"]
        width = max(len(s) for s in self.stages)
        for s, stage in enumerate(self.stages):
            tops = "  ".join(f"{token_text(i)!r} {p:.2f}" for i, p in zip(self.top_ids[s, t], self.top_probs[s, t]))
            lines.append(f"  {stage:<{width}}  {tops}")
        return "\n".join(lines)


def lens_logits(model, resid):
    """The logits a residual stream resid [T, C] would give if the model stopped there: the final
    rms_norm, then lm_head, as Model.logits computes them.  -> [T, V], where the backend keeps arrays"""
    ops = model.ops
    return ops.linear(ops.rms_norm(resid, model.norm, model.config.rms_norm_eps), model.lm_head)


def logit_lens(model, ids, k: int = 5) -> LogitLens:
    """Run `ids` through the model once and read every layer's residual stream through the lm_head."""
    if not isinstance(k, int) or not 1 <= k <= model.config.vocab_size:
        raise RefqwenError(f"k: expected a number of tokens from 1 to {model.config.vocab_size}, got {k!r}")
    stages, top_ids, top_probs = [], [], []

    def read(name, resid):  # a trace hook: sees each residual stream where the backend keeps it
        logits = np.asarray(model.ops.to_host(lens_logits(model, resid)), np.float32)  # [T, V]
        probs = _softmax(logits)
        best = _top_k(logits, k)  # [T, k]
        stages.append(name.removesuffix(".resid_post"))
        top_ids.append(best)
        top_probs.append(np.take_along_axis(probs, best, axis=-1))

    trace(model, ids, names=[], hooks={"embed": read, "layers.*.resid_post": read})
    return LogitLens([int(i) for i in np.asarray(ids)], stages, np.stack(top_ids), np.stack(top_probs))


def attention_pattern(model, ids, layer: int, head: int) -> np.ndarray:
    """The attention weights of one query head over the prompt: [T, T], row t (query t) sums to 1,
    zero above the diagonal (a token sees only itself and earlier ones) and outside a sliding window."""
    cfg = model.config
    if not isinstance(layer, int) or not 0 <= layer < cfg.num_hidden_layers:
        raise RefqwenError(f"layer: expected 0 .. {cfg.num_hidden_layers - 1}, got {layer!r}")
    if not isinstance(head, int) or not 0 <= head < cfg.num_attention_heads:
        raise RefqwenError(f"head: expected a query head 0 .. {cfg.num_attention_heads - 1}, got {head!r}")
    name = f"layers.{layer}.attn.pattern"
    return trace(model, ids, names=[name])[name][head]  # [H, T, S] -> [T, S], S = T without a cache


def _top_k(logits, k):
    """Ids of the k largest logits of each row [T, V], largest first; on a tie the lower id first, as a
    stable sort of the whole row gives (which would cost O(V log V) per row and stage).  -> [T, k]"""
    rows = []
    for row in logits:
        kth = np.partition(row, row.size - k)[row.size - k]  # the k-th largest value
        candidates = np.flatnonzero(row >= kth)  # ascending ids; more than k only on ties
        rows.append(candidates[np.argsort(-row[candidates], kind="stable")][:k])
    return np.stack(rows)


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ---- pictures -----------------------------------------------------------------------------

def plot_logit_lens(lens: LogitLens, path, token_text=str) -> Path:
    """A PNG: stages down, positions across, each cell the top-1 token, coloured by its probability."""
    plt = _pyplot()
    T, S = len(lens.ids), len(lens.stages)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * T, 1.0 + 0.35 * S))
    image = ax.imshow(lens.top_probs[:, :, 0], cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for s in range(S):
        for t in range(T):
            ax.text(t, s, token_text(int(lens.top_ids[s, t, 0]))[:8], ha="center", va="center", fontsize=7)
    ax.set_xticks(range(T), [token_text(i)[:8] for i in lens.ids], rotation=90, fontsize=7)
    ax.set_yticks(range(S), lens.stages, fontsize=7)
    ax.set_xlabel("input token (the prediction is for the next one)")
    fig.colorbar(image, ax=ax, label="probability of the top token")
    ax.set_title("logit lens: top next token after each layer")
    return _save(fig, path)


def plot_attention_pattern(pattern: np.ndarray, tokens: list[str], path, title: str = "") -> Path:
    """A PNG heatmap of a [T, T] pattern: queries down, keys across, labelled with the tokens."""
    plt = _pyplot()
    T = len(tokens)
    fig, ax = plt.subplots(figsize=(2.0 + 0.3 * T, 1.5 + 0.3 * T))
    image = ax.imshow(pattern, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(T), [t[:10] for t in tokens], rotation=90, fontsize=7)
    ax.set_yticks(range(T), [t[:10] for t in tokens], fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    fig.colorbar(image, ax=ax, label="attention weight")
    ax.set_title(title)
    return _save(fig, path)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise RefqwenError('pictures need matplotlib: pip install "refqwen[plot]"') from None
    return plt


def _save(fig, path) -> Path:
    """Write the figure as a PNG under a temporary name, then rename: never a half-written file."""
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() != ".png":
        plt.close(fig)
        raise RefqwenError(f"{path}: pictures are written as .png")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box, not an error
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            fig.tight_layout()
            fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    except OSError as e:
        raise RefqwenError(f"{path}: cannot write the picture: {e.strerror}") from None
    finally:
        plt.close(fig)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path
