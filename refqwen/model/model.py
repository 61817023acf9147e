"""The Qwen2 decoder: token ids -> embeddings -> N pre-norm decoder layers -> norm -> logits.

    h   = x + attention(rms_norm(x))
    out = h + mlp(rms_norm(h))          (mlp is a SparseMoE block on the MoE model's sparse layers)

Shapes: T new tokens, S positions in the cache, C hidden size, H query heads, KV key/value
heads, G = H / KV query heads per key/value head, D head size, I MLP width, V vocabulary.
"""

import numpy as np

from refqwen.errors import RefqwenError
from refqwen.model.attention import Attention
from refqwen.model.cache import KVCache
from refqwen.model.config import Config
from refqwen.model.dca import key_positions
from refqwen.model.hooks import UNTRACED, TracePoints
from refqwen.model.mlp import MLP
from refqwen.model.moe import SparseMoE
from refqwen.model.ops import Backend
from refqwen.model.rope import rotary_cos_sin


class DecoderLayer:
    hook = UNTRACED  # reports resid_pre, attn_norm, ... (refqwen/trace.py); a no-op unless a trace runs

    def __init__(self, w: dict, i: int, cfg: Config, ops):
        prefix = f"model.layers.{i}"
        self.ops = ops
        self.attn_norm = ops.prepare_float(f"{prefix}.input_layernorm.weight",
                                           w[f"{prefix}.input_layernorm.weight"])  # [C]
        self.attn = Attention.from_weights(w, f"{prefix}.self_attn", cfg, ops)
        self.mlp_norm = ops.prepare_float(f"{prefix}.post_attention_layernorm.weight",
                                          w[f"{prefix}.post_attention_layernorm.weight"])  # [C]
        if i in cfg.sparse_layers:
            self.mlp = SparseMoE.from_weights(w, f"{prefix}.mlp", cfg, ops)
        else:
            self.mlp = MLP.from_weights(w, f"{prefix}.mlp", ops)
        self.window = cfg.window(i)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, cos, sin, cache) -> np.ndarray:
        """x [T, C] -> [T, C]"""
        hook = self.hook
        x = hook("resid_pre", x)
        attn_in = hook("attn_norm", self.ops.rms_norm(x, self.attn_norm, self.eps))
        h = hook("resid_mid", x + self.attn(attn_in, cos, sin, cache, self.window))
        mlp_in = hook("mlp_norm", self.ops.rms_norm(h, self.mlp_norm, self.eps))
        return hook("resid_post", h + self.mlp(mlp_in))


class Model:
    """A loaded Qwen2 model. `forward` maps token ids to next-token logits."""

    def __init__(self, config: Config, weights: dict, tokenizer=None, source: str = "", backend=None):
        self.config = config
        self.tokenizer = tokenizer  # refqwen.tokenizer.Tokenizer, or None when the checkpoint has none
        self.source = source  # where the weights came from, for messages and reports
        self.ops = backend or Backend()  # computes every operation; model/ops.py's Backend is the reference
        self.embed_tokens = self.ops.prepare_embedding(weights["model.embed_tokens.weight"])  # [V, C]
        self.layers = [DecoderLayer(weights, i, config, self.ops) for i in range(config.num_hidden_layers)]
        self.norm = self.ops.prepare_float("model.norm.weight", weights["model.norm.weight"])  # [C]
        # a tied model reuses the embedding matrix as its output projection
        self.lm_head = (self.embed_tokens if config.tie_word_embeddings
                        else self.ops.prepare_linear("lm_head.weight", weights["lm_head.weight"]))  # [V, C]
        # named trace points (refqwen/trace.py): idle, and free, unless refqwen.trace runs
        self.trace_points = attach_trace_points(self)

    @property
    def backend(self) -> str:
        return self.ops.name

    def new_cache(self) -> KVCache:
        cfg = self.config
        cache = self.ops.new_cache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
        cache.config = cfg  # logits refuses a cache made for a model with another config
        return cache

    def forward(self, ids, cache: KVCache | None = None, last_only: bool = False) -> np.ndarray:
        """Logits for each of the T new token ids, [T, V] float32 NumPy ([1, V] with last_only).

        With a cache, the ids continue the sequence the cache holds, and the cache is extended.
        """
        return self.ops.to_host(self.logits(ids, cache, last_only))

    def logits(self, ids, cache: KVCache | None = None, last_only: bool = False):
        """forward's logits where the backend keeps them (on the GPU for a GPU backend)."""
        ids, cache = self.check_input(ids, cache)
        start = cache.length  # position of the first new token
        positions = np.arange(start, start + len(ids))  # [T]
        if self.config.dual_chunk_attention:  # keys are rotated by their place in their chunk
            positions = key_positions(positions, self.config.dual_chunk_attention)
        cos, sin = rotary_cos_sin(self.config.rope_inv_freq, positions, self.config.rope_attention_factor)
        x = self.hook("embed", self.ops.embed(ids, self.embed_tokens))  # [T, C]
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer(x, cos, sin, layer_cache)
        if last_only:
            x = x[-1:]
        x = self.hook("final_norm", self.ops.rms_norm(x, self.norm, self.config.rms_norm_eps))
        return self.hook("logits", self.ops.linear(x, self.lm_head))  # [T, V]

    def generate(self, prompt, max_new_tokens: int = 256, **options) -> str:
        """Complete `prompt` (text, chat messages [{"role", "content"}], or token ids).

        Options: temperature (0 = greedy, the default), top_k, top_p, min_p, repetition_penalty,
        seed, stop (strings), ignore_eos. Stops at the model's end tokens unless ignore_eos.
        """
        from refqwen.generate import generate

        return generate(self, prompt, max_new_tokens, **options)

    def stream(self, prompt, max_new_tokens: int = 256, **options):
        """Like generate, but yields the text in pieces as it is produced."""
        from refqwen.generate import stream

        return stream(self, prompt, max_new_tokens, **options)

    def check_input(self, ids, cache: KVCache | None):
        """(ids as a 1-D integer array, the cache or a new one), or a RefqwenError: an id outside the
        vocabulary, a cache made for another model, more tokens than the context window holds."""
        ids = self._check_ids(ids)
        cache = self._check_cache(cache) if cache is not None else self.new_cache()
        if cache.length + len(ids) > self.config.context_window:
            raise RefqwenError(self.config.too_long(cache.length + len(ids),
                                                    f"{cache.length} cached + {len(ids)} new tokens"))
        return ids, cache

    def _check_cache(self, cache):
        if getattr(cache, "config", self.config) != self.config or len(cache.layers) != self.config.num_hidden_layers:
            raise RefqwenError("this KV cache was made for a model with another config; use model.new_cache()")
        return cache

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise RefqwenError(f"ids must be a non-empty 1-D sequence of integer token ids, got shape {ids.shape} "
                               f"of {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise RefqwenError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")
        return ids


def attach_trace_points(model) -> TracePoints:
    """Give the model (model.hook: embed, final_norm, logits) and each of its modules a hook that
    reports under its own prefix, named as in the table in refqwen/trace.py."""
    points = TracePoints()
    model.hook = points.at("")
    for i, layer in enumerate(model.layers):
        layer.hook = points.at(f"layers.{i}.")
        layer.attn.hook = points.at(f"layers.{i}.attn.")
        if isinstance(layer.mlp, SparseMoE):
            layer.mlp.hook = points.at(f"layers.{i}.moe.")
            layer.mlp.shared_expert.hook = points.at(f"layers.{i}.moe.shared_expert.")
        else:
            layer.mlp.hook = points.at(f"layers.{i}.mlp.")
    return points
