"""GGUF files load onto the same model as the Hugging Face checkpoint they were written from."""

import numpy as np
import pytest
from gguf_writer import write_gguf
from oracle import LOGITS_ATOL, random_weights, tiny_config

import refqwen
from refqwen import Model


@pytest.mark.parametrize("kind", ["dense-untied", "dense-tied", "dense-yarn", "moe-step2-mlp-only"])
def test_gguf_loads_the_same_model(kind, tmp_path, rng):
    cfg = tiny_config(kind)
    weights = random_weights(cfg)
    write_gguf(tmp_path / "tiny.gguf", cfg, weights)
    loaded = refqwen.load(tmp_path / "tiny.gguf", progress=False)
    assert loaded.config.sparse_layers == cfg.sparse_layers
    assert loaded.config.tie_word_embeddings == cfg.tie_word_embeddings
    assert loaded.config.rope_scaling == cfg.rope_scaling
    ids = rng.integers(0, cfg.vocab_size, 50)
    np.testing.assert_allclose(loaded.forward(ids), Model(cfg, weights).forward(ids), rtol=0, atol=LOGITS_ATOL)
