"""Rotary tables against transformers' `Qwen2RotaryEmbedding`: the inverse frequencies bit for bit,
cos and sin at positions up to 131,071, for default and YaRN rotary.

transformers computes `theta ** (arange(0, D, 2) / D)` with torch's float32 pow. torch's scalar code
rounds it correctly; its SIMD code (SLEEF, within 1 ulp) does not always, so transformers' own table
can move by 1 ulp in a channel with the CPU it runs on (on this project's AVX2 machines: channel 37 of
D=128, theta=1e6). refqwen computes the correctly rounded table, so the exact comparison runs
transformers with torch's scalar code (ATEN_CPU_CAPABILITY=default) in a subprocess, and the
in-process comparison (SIMD torch) allows what that 1 ulp can become and nothing more.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refqwen.errors import ConfigError
from refqwen.model import rope
from refqwen.model.config import Config

HEAD_DIMS = (64, 128)
THETAS = (1e4, 1e6)
FACTORS = (None, 2.0, 4.0, 8.0)  # None: default rotary
POSITIONS = np.array([0, 1, 17, 4095, 32767, 40000, 65535, 131071])
# cos and sin of the same float32 angle from two libms differ by at most ~1 ulp of 1 (6e-8) after the
# attention factor (<= 1.21) multiplies them; 2e-7 leaves room for that, while 1 ulp of inv_freq in a
# fast channel moves the angle at position 131,071 by up to 1.6e-2.
COS_SIN_ATOL = 2e-7
CASES = [(d, t, f) for d in HEAD_DIMS for t in THETAS for f in FACTORS]

_TRANSFORMERS_SCRIPT = r"""
import json, sys
import torch
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
cases, positions = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = []
for head_dim, theta, factor in cases:
    rope = {"rope_type": "default", "rope_theta": theta}
    if factor:
        rope = {"rope_type": "yarn", "rope_theta": theta, "factor": factor,
                "original_max_position_embeddings": 32768}
    config = Qwen2Config(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=int(32768 * (factor or 1)), rope_parameters=rope)
    emb = Qwen2RotaryEmbedding(config)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = emb(x, torch.tensor([positions]))
    out.append({"inv_freq": emb.inv_freq.numpy().view("uint32").tolist(), "scale": emb.attention_scaling,
                "cos": cos[0].numpy().tolist(), "sin": sin[0].numpy().tolist()})
print(json.dumps(out))
"""


def our_config(head_dim, theta, factor):
    scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": 32768} if factor else None
    return Config.from_hf_dict(dict(architectures=["Qwen2ForCausalLM"], vocab_size=8, hidden_size=2 * head_dim,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    intermediate_size=8, rope_theta=theta, rope_scaling=scaling,
                                    max_position_embeddings=int(32768 * (factor or 1))))


@pytest.fixture(scope="module")
def transformers_scalar_tables():
    """transformers' tables computed with torch's scalar (correctly rounded) code."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    done = subprocess.run([sys.executable, "-c", _TRANSFORMERS_SCRIPT, json.dumps(CASES),
                           json.dumps(POSITIONS.tolist())], env=env, capture_output=True, text=True, check=True)
    return dict(zip(CASES, json.loads(done.stdout.splitlines()[-1])))


@pytest.mark.parametrize("case", CASES, ids=[f"D{d}-theta{t:g}-yarn{f}" for d, t, f in CASES])
def test_inv_freq_and_cos_sin_equal_transformers(case, transformers_scalar_tables):
    hf = transformers_scalar_tables[case]
    cfg = our_config(*case)
    assert cfg.rope_inv_freq.view(np.uint32).tolist() == hf["inv_freq"]  # bit for bit
    assert cfg.rope_attention_factor == pytest.approx(hf["scale"], rel=1e-15)
    cos, sin = rope.rotary_cos_sin(cfg.rope_inv_freq, POSITIONS, cfg.rope_attention_factor)
    np.testing.assert_allclose(cos, np.array(hf["cos"]), rtol=0, atol=COS_SIN_ATOL)
    np.testing.assert_allclose(sin, np.array(hf["sin"]), rtol=0, atol=COS_SIN_ATOL)


def test_inv_freq_within_two_ulp_of_simd_torch():
    """In-process transformers (torch's SIMD pow) differs from the correctly rounded table by at most 2 ulp.

    SLEEF's pow is within 1 ulp; that 1 ulp of a period becomes up to 1 ulp in each of 1/p and 1/(factor p),
    and YaRN's blend of the two on a ramp channel can add them (2 ulp seen at D=128, theta=1e6, channel 37).
    """
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    for head_dim, theta, factor in CASES:
        rope_params = {"rope_type": "default", "rope_theta": theta}
        if factor:
            rope_params = dict(rope_type="yarn", rope_theta=theta, factor=factor,
                               original_max_position_embeddings=32768)
        hf = Qwen2RotaryEmbedding(Qwen2Config(hidden_size=2 * head_dim, num_attention_heads=2,
                                              num_key_value_heads=1, max_position_embeddings=int(32768 * (factor or 1)),
                                              rope_parameters=rope_params)).inv_freq.numpy()
        ours = our_config(head_dim, theta, factor).rope_inv_freq
        ulps = np.abs(ours.view(np.int32).astype(np.int64) - hf.view(np.int32).astype(np.int64))
        assert ulps.max() <= 2, (head_dim, theta, factor)


def test_interpolated_frequency_is_one_over_factor_times_period():
    """transformers divides 1 by (factor * p), which rounds differently from (1/p)/factor for factor 3."""
    periods = rope.rotation_periods(1e6, 128)
    ours = rope.yarn_inv_freq(1e6, 128, 3.0, 32768)
    expected_slow = np.float32(1) / (np.float32(3.0) * periods)
    assert np.array_equal(ours[41:], expected_slow[41:])


@pytest.mark.parametrize("field,value", [("factor", 0), ("factor", -4.0), ("factor", float("nan")),
                                         ("original_max_position_embeddings", 0),
                                         ("original_max_position_embeddings", -32768)])
def test_bad_yarn_block_is_refused_naming_the_field(field, value):
    block = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, field: value}
    raw = dict(architectures=["Qwen2ForCausalLM"], vocab_size=8, hidden_size=128, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, intermediate_size=8, rope_scaling=block)
    with pytest.raises(ConfigError, match=f"config.json: invalid YaRN rope_scaling: {field} must be a positive"):
        Config.from_hf_dict(raw)
