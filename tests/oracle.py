"""Tiny random Qwen2 models built in transformers, the oracle every refqwen test compares with.

Weights are drawn with std 0.2 and biases are non-zero, so that a wrong layout, a missing
bias or a mis-scaled rotary shows up as a large error rather than hiding in the noise.
"""

import numpy as np
import torch

from refqwen.tiny import TINY, TINY_MOE  # noqa: F401 (TINY_MOE is imported from here by conftest)

# Oracle tolerance on logits, float32 against float32. Both sides compute the same math
# in float32 but sum in different orders (BLAS blocking, online vs full softmax), which
# leaves differences of a few float32 ulps of the largest intermediate values (~1e-6
# relative); 1e-4 absolute on logits of magnitude ~10 is well above that and far below
# any real mistake (a wrong rotary layout or a dropped bias moves logits by >0.1).
LOGITS_ATOL = 1e-4

CONFIGS = {
    "dense-tied": ("qwen2", dict(TINY, tie_word_embeddings=True)),
    "dense-untied": ("qwen2", dict(TINY, tie_word_embeddings=False)),
    "dense-yarn": ("qwen2", dict(TINY, max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", factor=4.0, rope_theta=10000.0, original_max_position_embeddings=32))),
    # YaRN as the Qwen2 model cards set it, small enough to run 40K tokens in seconds
    "dense-yarn-long": ("qwen2", dict(TINY, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=131072,
                                      rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e6,
                                                           original_max_position_embeddings=32768))),
    "dense-sliding": ("qwen2", dict(TINY, use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "moe-step1": ("qwen2_moe", dict(TINY_MOE, decoder_sparse_step=1, norm_topk_prob=False)),
    "moe-step1-norm": ("qwen2_moe", dict(TINY_MOE, decoder_sparse_step=1, norm_topk_prob=True)),
    "moe-step2-mlp-only": ("qwen2_moe", dict(TINY_MOE, decoder_sparse_step=2, mlp_only_layers=[3])),
}


def build_hf_model(kind: str, seed: int = 0):
    """A seeded random transformers model of the named tiny config, in float32 eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    model_type, kwargs = CONFIGS[kind]
    config_cls, model_cls = ((Qwen2Config, Qwen2ForCausalLM) if model_type == "qwen2"
                             else (Qwen2MoeConfig, Qwen2MoeForCausalLM))
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, ids) -> np.ndarray:
    """transformers' logits for one sequence, [T, V] float32."""
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), use_cache=False)
    return out.logits[0].float().numpy()


def random_weights(cfg, seed: int = 0) -> dict:
    """refqwen weights for `cfg` drawn like build_hf_model's, without transformers (refqwen.tiny)."""
    from refqwen.tiny import random_weights

    return random_weights(cfg, seed)


def tiny_config(kind: str):
    """The refqwen Config of one of the tiny CONFIGS."""
    from refqwen import Config

    model_type, kwargs = CONFIGS[kind]
    arch = "Qwen2ForCausalLM" if model_type == "qwen2" else "Qwen2MoeForCausalLM"
    return Config.from_hf_dict(dict(kwargs, architectures=[arch]))
