"""Incremental decoding with a KV cache gives the logits of one full forward pass."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import LOGITS_ATOL, random_weights, tiny_config

from refqwen import Model

MODELS = {kind: Model(tiny_config(kind), random_weights(tiny_config(kind)))
          for kind in ("dense-untied", "dense-sliding", "moe-step2-mlp-only")}


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(sorted(MODELS)), length=st.integers(2, 300), data=st.data())
def test_incremental_equals_full(kind, length, data):
    model = MODELS[kind]
    ids = np.random.default_rng(length).integers(0, model.config.vocab_size, length)
    # split the sequence into 1 to 4 pieces at arbitrary points
    cuts = sorted(data.draw(st.sets(st.integers(1, length - 1), max_size=3), label="cuts"))
    cache = model.new_cache()
    pieces = [model.forward(ids[a:b], cache) for a, b in zip([0, *cuts], [*cuts, length])]
    assert cache.length == length
    np.testing.assert_allclose(np.concatenate(pieces), model.forward(ids), rtol=0, atol=LOGITS_ATOL)


def test_token_by_token_decode_equals_full():
    model = MODELS["dense-sliding"]  # window 8: decode must drop keys that fall out of the window
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, 40)
    cache = model.new_cache()
    steps = [model.forward(ids[t:t + 1], cache, last_only=True)[0] for t in range(len(ids))]
    np.testing.assert_allclose(np.stack(steps), model.forward(ids), rtol=0, atol=LOGITS_ATOL)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(sorted(MODELS)), length=st.integers(2, 60), reserve=st.integers(0, 80), data=st.data())
def test_reserved_cache_gives_the_same_logits_without_copies(kind, length, reserve, data):
    """cache.reserve(n) (what generate does for a prompt and its new tokens): the same logits, and appends up to
    n positions keep every layer's buffers (no copy of the cache)."""
    model = MODELS[kind]
    ids = np.random.default_rng(length).integers(0, model.config.vocab_size, length)
    cut = data.draw(st.integers(1, length - 1), label="cut")
    cache = model.new_cache()
    cache.reserve(reserve)
    pieces = [model.forward(ids[:cut], cache)]
    cache.reserve(cut + reserve)  # once more, with positions already in it: they are kept
    if length <= cut + reserve:
        buffers = [layer.keys for layer in cache.layers]
    pieces.append(model.forward(ids[cut:], cache))
    if length <= cut + reserve:
        assert all(layer.keys is b for layer, b in zip(cache.layers, buffers))
    assert all(layer.keys.shape[0] >= max(length, cut + reserve) for layer in cache.layers)
    np.testing.assert_allclose(np.concatenate(pieces), model.forward(ids), rtol=0, atol=LOGITS_ATOL)
