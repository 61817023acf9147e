"""Every available backend end to end on the real demo model, against the float32 reference."""

import textwrap

import pytest

import refqwen
from refqwen import backends
from refqwen.evaluate import agreement

NAMES = [name for name, why in backends.available().items() if why is None and name != "numpy"]

# Bounds that a working int8 backend clears with room to spare (measured on 510 tokens of
# textwrap.py: top-1 agreement 98.4-99.0%, mean KL 0.0002-0.0013 nats, perplexity within
# 0.3%), while a broken kernel (a wrong scale, a dropped group, a shifted row) falls far
# outside them (top-1 agreement near 0, KL above 1 nat).
MIN_TOP1 = 0.95
MAX_MEAN_KL = 0.01
MAX_PPL_REL_DIFF = 0.02


@pytest.mark.parametrize("name", NAMES)
def test_backend_agrees_with_reference_on_real_weights(name, demo):
    model = refqwen.load("demo", backend=name, progress=False)
    ids = demo.tokenizer.encode(open(textwrap.__file__, encoding="utf-8").read())[:256]
    result = agreement(demo, model, ids, window=256, progress=False)
    assert result.top1_agreement >= MIN_TOP1
    assert result.mean_kl <= MAX_MEAN_KL
    assert abs(result.ppl_relative_diff) <= MAX_PPL_REL_DIFF
    # and it generates: a short greedy completion decodes to text
    assert model.generate("def add(a, b):", max_new_tokens=8).strip()
