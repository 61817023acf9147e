"""Every available backend end to end on the real demo model, against the float32 reference."""

import textwrap

import pytest

import refqwen
from refqwen import backends
from refqwen.backends import cupy_gpu
from refqwen.checkpoint.open import open_checkpoint
from refqwen.evaluate import agreement, score_reference

HOST_MODE = " (host mode)"  # the cupy backends' array logic and kernel twins on NumPy: tests/test_backends.py
NAMES = ([name for name, why in backends.available().items() if why is None and name != "numpy"]
         + [name + HOST_MODE for name in ("cupy", "cupy-f16")])

# Bounds that a working int8 backend clears with room to spare (measured on 510 tokens of
# textwrap.py: top-1 agreement 98.4-99.0%, mean KL 0.0002-0.0013 nats, perplexity within
# 0.3%), while a broken kernel (a wrong scale, a dropped group, a shifted row) falls far
# outside them (top-1 agreement near 0, KL above 1 nat).
MIN_TOP1 = 0.95
MAX_MEAN_KL = 0.01
MAX_PPL_REL_DIFF = 0.02
# int4 (groups of 32, round to nearest) costs more (measured on 2044 tokens of the report corpus:
# top-1 agreement 90.0%, mean KL 0.061 nats, perplexity +8.3%); its bounds are looser, and a broken
# kernel still falls far outside them.
INT4_BOUNDS = dict(min_top1=0.80, max_mean_kl=0.15, max_ppl_rel_diff=0.20)
INT8_BOUNDS = dict(min_top1=MIN_TOP1, max_mean_kl=MAX_MEAN_KL, max_ppl_rel_diff=MAX_PPL_REL_DIFF)


@pytest.fixture(scope="module")
def demo_weights():
    """The demo checkpoint's tensors, read and dequantized once for every backend here (as refqwen.load
    reads them; test_cli and test_niah load through refqwen.load itself)."""
    weights = open_checkpoint("demo", progress=False)[2]
    return {name: weights[name] for name in weights}


@pytest.fixture(scope="module")
def text_ids(demo):
    return demo.tokenizer.encode(open(textwrap.__file__, encoding="utf-8").read())[:256]


@pytest.fixture(scope="module")
def reference(demo, text_ids):
    """The float32 reference's logits on the text, computed once for every backend here."""
    return score_reference(demo, text_ids, window=256, progress=False)


@pytest.mark.parametrize("name", NAMES)
def test_backend_agrees_with_reference_on_real_weights(name, demo, demo_weights, reference, text_ids):
    if name.endswith(HOST_MODE):
        ops = cupy_gpu.VARIANTS[name.removesuffix(HOST_MODE)](host=True)
    else:
        ops = backends.get(name)
    model = refqwen.Model(demo.config, demo_weights, demo.tokenizer, "demo", ops)
    ops.warm_up()
    result = agreement(reference, model, text_ids, window=256, progress=False)
    bounds = INT4_BOUNDS if getattr(model.ops, "layout", "").startswith("int4") else INT8_BOUNDS
    assert result.top1_agreement >= bounds["min_top1"]
    assert result.mean_kl <= bounds["max_mean_kl"]
    assert abs(result.ppl_relative_diff) <= bounds["max_ppl_rel_diff"]
    # and it generates: a short greedy completion decodes to text
    assert model.generate("def add(a, b):", max_new_tokens=8).strip()
