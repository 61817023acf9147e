"""Tiny random Qwen2 models: the whole architecture at toy sizes, built in a blink, no download.

    model = refqwen.tiny_model()                     # 4 layers, hidden size 64, vocabulary 128
    logits = model.forward([1, 2, 3])                # [3, 128]

The tests build their models this way (tests/oracle.py draws the same weights in transformers
to check refqwen against it), and docs/tour.md uses them to show the forward pass. The weights
are random, so the predictions mean nothing; the shapes and the arithmetic are the real thing.
"""

import numpy as np

from refqwen import backends
from refqwen.checkpoint.weights import expected_shapes
from refqwen.errors import RefqwenError
from refqwen.model import Config, Model

# Small enough to run in milliseconds, big enough to exercise grouped-query attention (H=4, KV=2)
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)
# A Qwen2-MoE at toy size: 6 experts, 2 per token, and a shared expert
TINY_MOE = dict(TINY, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=48)


def tiny_config(moe: bool = False, **overrides) -> Config:
    """A Config of TINY (or TINY_MOE with moe=True), with any Hugging Face config.json keys overridden,
    e.g. tiny_config(num_hidden_layers=2, rope_parameters=dict(rope_type="yarn", ...))."""
    raw = dict(TINY_MOE if moe else TINY, **overrides)
    raw.setdefault("architectures", ["Qwen2MoeForCausalLM" if moe else "Qwen2ForCausalLM"])
    return Config.from_hf_dict(raw, source="tiny_config")


def random_weights(cfg: Config, seed: int = 0) -> dict:
    """Every tensor a model of `cfg` needs (Hugging Face names), float32, drawn with std 0.2 around 0
    (norm weights around 1), so that each layer visibly changes the residual stream."""
    rng = np.random.default_rng(seed)
    return {name: ((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * rng.standard_normal(shape)).astype(np.float32)
            for name, shape in expected_shapes(cfg).items()}


def tiny_model(config: Config | None = None, seed: int = 0, backend: str = "numpy", moe: bool = False,
               **overrides) -> Model:
    """A Model with random weights: of `config` if given, else tiny_config(moe, **overrides)."""
    if config is None:
        config = tiny_config(moe, **overrides)
    elif overrides:
        raise RefqwenError(f"tiny_model: give either a config or config keys, not both ({sorted(overrides)})")
    return Model(config, random_weights(config, seed), source=f"tiny random model (seed {seed})",
                 backend=backends.get(backend))
