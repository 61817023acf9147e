"""Long context: YaRN end to end past the original window, the rope_scaling override, the
context-window error, and chunked prefill."""

import json
import re
import shutil

import numpy as np
import pytest
from oracle import LOGITS_ATOL, hf_logits

import refqwen
from refqwen.errors import ConfigError, RefqwenError
from refqwen.generate import prefill

LONG = 34_000  # tokens: past YaRN's original window of 32,768 positions (cost grows as LONG squared)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """The reference's attention makes ~25,000 small matrix products (256 x 16 x 256) for 40K tokens;
    two OpenBLAS threads spinning on each, on a busy 2-core machine, made them ~100x slower."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def long_ids():
    return np.random.default_rng(7).integers(0, 128, LONG)


@pytest.fixture(scope="module")
def yarn_long(tiny_hf, long_ids):
    """(model folder, transformers' logits on the 40K-token prompt)."""
    hf, folder = tiny_hf("dense-yarn-long")
    return folder, hf_logits(hf, long_ids)


def test_yarn_logits_match_transformers_past_the_original_window(yarn_long, long_ids):
    folder, expected = yarn_long
    model = refqwen.load(folder, progress=False)
    assert model.config.context_window == 131072
    np.testing.assert_allclose(model.forward(long_ids), expected, rtol=0, atol=LOGITS_ATOL)


def test_yarn_switched_on_by_override_for_a_checkpoint_without_it(yarn_long, long_ids, tmp_path):
    """As the model cards instruct: a checkpoint that ships plain rotary, YaRN added at load time."""
    folder, expected = yarn_long
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    raw = json.loads((plain / "config.json").read_text())
    raw.pop("rope_scaling", None)
    raw.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, max_position_embeddings=32768)
    (plain / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RefqwenError, match=r"need 34000 positions; the context window holds 32768: turn on YaRN"):
        refqwen.load(plain, progress=False).forward(long_ids)
    model = refqwen.load(plain, progress=False, rope_scaling={"type": "yarn", "factor": 4.0})
    assert model.config.rope_scaling.original_max_position_embeddings == 32768
    tail = slice(LONG - 64, LONG)  # the positions past the original window, where YaRN matters most
    np.testing.assert_allclose(model.forward(long_ids)[tail], expected[tail], rtol=0, atol=LOGITS_ATOL)


def test_without_yarn_the_logits_differ(yarn_long, long_ids):
    """The comparison above can fail: plain rotary on the same weights is far off (YaRN changes the slow
    channels' frequencies and scales cos and sin, so the first 2,048 positions already show it)."""
    folder, expected = yarn_long
    model = refqwen.load(folder, progress=False, rope_scaling=None)
    error = np.abs(model.forward(long_ids[:2048]) - expected[:2048]).max()
    assert error > 100 * LOGITS_ATOL


@pytest.mark.parametrize("block,field", [({"type": "yarn", "factor": 0}, "factor"),
                                         ({"type": "yarn", "factor": -2.0}, "factor"),
                                         ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
                                          "original_max_position_embeddings")])
def test_bad_override_is_refused_naming_the_field(tiny_hf, block, field):
    with pytest.raises(ConfigError, match=f"rope_scaling override: invalid YaRN rope_scaling: {field} must be"):
        refqwen.load(tiny_hf("dense-untied")[1], progress=False, rope_scaling=block)


def test_chunked_prefill_equals_one_pass(tiny_hf, rng):
    model = refqwen.load(tiny_hf("dense-untied")[1], progress=False)
    ids = rng.integers(0, 128, 70)
    one_cache, chunk_cache = model.new_cache(), model.new_cache()
    whole = model.forward(ids, one_cache)[-1]
    chunked = prefill(model, ids, chunk_cache, chunk=16, progress=False)
    # the same per-token arithmetic, but each chunk's attention sums its keys in other blocks
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=LOGITS_ATOL)
    assert chunk_cache.length == one_cache.length == 70


@pytest.mark.parametrize("flags,message", [
    (["--rope-scaling", "{yarn"], "refqwen: error: --rope-scaling: not JSON"),
    (["--yarn", "0"], "invalid YaRN rope_scaling: factor must be a positive number, got 0.0"),
    (["--dual-chunk-attention", '{"chunk_size": 8, "local_size": 8}'],
     r"dual_chunk_attention override: invalid dual_chunk_attention_config: local_size \(8\) must be smaller"),
])
def test_cli_overrides_refuse_bad_values_in_one_line(tiny_hf, flags, message):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "refqwen.cli", "generate", "x", "--model",
                           str(tiny_hf("dense-untied")[1]), *flags], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and re.search(message, done.stderr), done.stderr
