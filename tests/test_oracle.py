"""refqwen's float32 logits equal transformers' on tiny random models of every Qwen2 variant."""

import numpy as np
import pytest
from oracle import CONFIGS, LOGITS_ATOL, hf_logits

import refqwen


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_logits_match_transformers(kind, tiny_hf, rng):
    hf, folder = tiny_hf(kind)
    model = refqwen.load(folder, progress=False)
    # 100 tokens run well past YaRN's original context (32) and the sliding window (8)
    ids = rng.integers(0, model.config.vocab_size, 100)
    np.testing.assert_allclose(model.forward(ids), hf_logits(hf, ids), rtol=0, atol=LOGITS_ATOL)


def test_the_configs_exercise_what_they_claim(tiny_hf):
    cfg = {kind: refqwen.load(tiny_hf(kind)[1], progress=False).config for kind in CONFIGS}
    assert cfg["dense-tied"].tie_word_embeddings and not cfg["dense-untied"].tie_word_embeddings
    assert cfg["dense-yarn"].rope_scaling.factor == 4.0
    assert cfg["dense-sliding"].sliding_layers == {2, 3}
    assert cfg["moe-step1"].sparse_layers == {0, 1, 2, 3}
    assert cfg["moe-step1-norm"].norm_topk_prob
    assert cfg["moe-step2-mlp-only"].sparse_layers == {1}


def test_a_planted_bug_is_caught(tiny_hf, rng, monkeypatch):
    """The oracle test can fail: interleaved rotary pairs (llama2.c style) instead of half-split."""
    from refqwen.model.ops import Backend

    def interleaved(x, cos, sin):
        pairs = x.reshape(*x.shape[:-1], -1, 2)  # [T, H, D/2, 2]
        rotated = np.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
        return x * cos[:, None, :] + rotated * sin[:, None, :]

    monkeypatch.setattr(Backend, "apply_rotary", staticmethod(interleaved))
    hf, folder = tiny_hf("dense-untied")
    ids = rng.integers(0, 128, 20)
    error = np.abs(refqwen.load(folder, progress=False).forward(ids) - hf_logits(hf, ids)).max()
    assert error > 100 * LOGITS_ATOL


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(dtype, tiny_hf, tmp_path, rng):
    """Checkpoints stored in 16 bits are widened exactly to float32."""
    import torch

    hf, _ = tiny_hf("dense-untied")
    half = type(hf)(hf.config).to(getattr(torch, dtype))
    half.load_state_dict(hf.state_dict())
    half.save_pretrained(tmp_path)
    # the same rounded weights, computed in float32 (reloaded: .float() would keep a rounded rotary table)
    reference = type(hf).from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = rng.integers(0, 128, 30)
    logits = refqwen.load(tmp_path, progress=False).forward(ids)
    np.testing.assert_allclose(logits, hf_logits(reference, ids), rtol=0, atol=LOGITS_ATOL)


def test_sharded_checkpoint(tiny_hf, tmp_path, rng):
    hf, _ = tiny_hf("moe-step1")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = rng.integers(0, 128, 30)
    logits = refqwen.load(tmp_path, progress=False).forward(ids)
    np.testing.assert_allclose(logits, hf_logits(hf, ids), rtol=0, atol=LOGITS_ATOL)


def test_float32_weights_are_memory_mapped(tiny_hf):
    model = refqwen.load(tiny_hf("dense-untied")[1], progress=False)
    assert isinstance(model.lm_head.base, np.memmap) or isinstance(model.lm_head, np.memmap)
