"""Config parsing: both rope key styles, the derived values, and clear errors."""

import numpy as np
import pytest

from refqwen import Config, ConfigError
from refqwen.model.rope import yarn_attention_factor, yarn_correction_range

QWEN2_7B = dict(architectures=["Qwen2ForCausalLM"], hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6,
                max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=False,
                use_sliding_window=False, sliding_window=131072, max_window_layers=28, eos_token_id=151643,
                rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
QWEN2_57B = dict(architectures=["Qwen2MoeForCausalLM"], hidden_size=3584, intermediate_size=18944,
                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=151936,
                 rope_theta=1000000.0, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                 shared_expert_intermediate_size=20480, decoder_sparse_step=1, norm_topk_prob=False)


def test_old_and_new_rope_keys_agree():
    new = dict(QWEN2_7B, rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                              original_max_position_embeddings=32768))
    del new["rope_theta"], new["rope_scaling"]
    a, b = Config.from_hf_dict(QWEN2_7B), Config.from_hf_dict(new)
    assert a == b
    np.testing.assert_array_equal(a.rope_inv_freq, b.rope_inv_freq)


def test_derived_values_of_qwen2_7b():
    cfg = Config.from_hf_dict(QWEN2_7B)
    assert (cfg.head_dim, cfg.kv_group_size) == (128, 7)
    assert cfg.sliding_layers == frozenset() and cfg.window(5) is None
    assert cfg.rope_attention_factor == pytest.approx(0.1 * np.log(4) + 1)
    assert cfg.rope_inv_freq.shape == (64,) and cfg.rope_inv_freq.dtype == np.float32


def test_yarn_correction_range_matches_the_published_numbers():
    assert yarn_correction_range(1e6, 128, 32768, 32, 1) == (23, 40)
    assert yarn_correction_range(1e6, 64, 32768, 32, 1) == (11, 20)
    assert yarn_attention_factor(1.0) == 1.0


def test_yarn_frequencies_blend_from_extrapolated_to_interpolated():
    cfg = Config.from_hf_dict(QWEN2_7B)
    plain = Config.from_hf_dict(dict(QWEN2_7B, rope_scaling=None)).rope_inv_freq
    assert np.array_equal(cfg.rope_inv_freq[:23], plain[:23])  # fast channels keep their frequency
    np.testing.assert_allclose(cfg.rope_inv_freq[40:], plain[40:] / 4, rtol=1e-6)  # slow ones are divided


def test_moe_sparse_layers():
    assert Config.from_hf_dict(QWEN2_57B).sparse_layers == frozenset(range(28))
    step2 = Config.from_hf_dict(dict(QWEN2_57B, decoder_sparse_step=2, mlp_only_layers=[3, 5]))
    assert step2.sparse_layers == frozenset(range(1, 28, 2)) - {3, 5}


def test_sliding_window_rules():
    dense = Config.from_hf_dict(dict(QWEN2_7B, use_sliding_window=True, sliding_window=4096, max_window_layers=20))
    assert dense.sliding_layers == frozenset(range(20, 28)) and dense.window(20) == 4096
    moe = Config.from_hf_dict(dict(QWEN2_57B, use_sliding_window=True, sliding_window=64, max_window_layers=6))
    assert moe.sliding_layers == {0, 2, 4}
    explicit = Config.from_hf_dict(dict(QWEN2_7B, use_sliding_window=True, sliding_window=64,
                                        layer_types=["sliding_attention"] + ["full_attention"] * 27))
    assert explicit.sliding_layers == {0}


@pytest.mark.parametrize("change,message", [
    (dict(architectures=["LlamaForCausalLM"]), "LlamaForCausalLM"),
    (dict(num_attention_heads=5), "multiple of num_attention_heads"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope type 'linear'"),
    (dict(hidden_size=None), "missing key 'hidden_size'"),
])
def test_bad_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_hf_dict(dict(QWEN2_7B, **change))


def test_missing_moe_key():
    raw = dict(QWEN2_57B)
    del raw["num_experts"]
    with pytest.raises(ConfigError, match="missing key 'num_experts'"):
        Config.from_hf_dict(raw)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Config.from_hf_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_hf_file(tmp_path / "config.json")
