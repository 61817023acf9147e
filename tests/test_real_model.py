"""The demo model (Qwen2.5-Coder-0.5B-Instruct GGUF) computes what transformers computes from the same file."""

import numpy as np
import pytest
import torch

# Real-model tolerance on logits, float32 against float32 from the same dequantized weights.
# Over 24 layers, with residual activations reaching ~800 at position 0, float32 sums taken in
# different orders differ by up to ~1e-4 (measured: 7e-5). 1e-3 leaves room for other BLAS
# builds; real mistakes are far larger (tying lm_head to the embedding moves logits by ~0.7).
REAL_LOGITS_ATOL = 1e-3

PROMPTS = {
    "english": "The three primary colors are",
    "chinese": "请用一句话介绍长城：",
    "python": "def quicksort(items):\n    \"\"\"Sort a list.\"\"\"\n",
}


def greedy(model, ids, n):
    cache = model.new_cache()
    logits = model.forward(ids, cache, last_only=True)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = model.forward([out[-1]], cache, last_only=True)
    return out


def test_demo_config(demo):
    cfg = demo.config
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (896, 24)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (14, 2)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (4864, 151936, 1e6)
    assert not cfg.tie_word_embeddings  # this GGUF has its own output.weight
    assert 151645 in cfg.eos_token_ids


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_logits_match_transformers(prompt, demo, hf):
    tokenizer, model = hf
    ids = tokenizer(PROMPTS[prompt])["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(demo.forward(ids), expected, rtol=0, atol=REAL_LOGITS_ATOL)


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
def test_greedy_continuation_matches_transformers(prompt, demo, hf):
    tokenizer, model = hf
    ids = tokenizer(PROMPTS[prompt])["input_ids"]
    from transformers import GenerationConfig

    plain_greedy = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():  # no end token: both sides produce exactly 32 argmax tokens
        expected = model.generate(torch.tensor([ids]), generation_config=plain_greedy)
    assert greedy(demo, ids, 32) == expected[0, len(ids):].tolist()
