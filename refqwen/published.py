"""The released Qwen2 configs (shapes only), for sizing, benchmarks with random weights, and tests.

From the published config.json files (../shared/qwen2-notes.md): all have rope_theta 1e6, SiLU,
q/k/v biases and no sliding window; the 7B/72B Instruct models extend to 128K with YaRN (factor 4).
"""

from refqwen.model.config import Config

_DENSE = dict(architectures=["Qwen2ForCausalLM"], rope_theta=1000000.0, rms_norm_eps=1e-6,
              max_position_embeddings=32768, use_sliding_window=False, eos_token_id=151643)
_YARN = dict(max_position_embeddings=131072,
             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})

PUBLISHED = {
    "0.5b": dict(_DENSE, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(_DENSE, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(_DENSE, **_YARN, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "72b": dict(_DENSE, **_YARN, hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, intermediate_size=29568, vocab_size=152064, tie_word_embeddings=False),
    "57b-a14b": dict(_DENSE, architectures=["Qwen2MoeForCausalLM"], hidden_size=3584, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, vocab_size=151936,
                     tie_word_embeddings=False, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                     shared_expert_intermediate_size=20480, decoder_sparse_step=1, norm_topk_prob=False),
}


def published_config(size: str) -> Config:
    """The Config of a released Qwen2 size: one of PUBLISHED's keys ("0.5b", "7b", "57b-a14b", ...)."""
    from refqwen.errors import RefqwenError

    if size not in PUBLISHED:
        raise RefqwenError(f"unknown Qwen2 size {size!r}; known: {', '.join(PUBLISHED)}")
    return Config.from_hf_dict(PUBLISHED[size], source=f"published Qwen2-{size}")
