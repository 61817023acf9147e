"""Generation: greedy parity with transformers, sampling rules, seeds, stop strings, streaming."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refqwen import RefqwenError
from refqwen.generate import Sampling, TextStream, next_token, sampling_probs, stream_text

PROMPTS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "用中文解释什么是递归，一句话。"}],
    "# Compute the nth prime number\ndef nth_prime(n):",
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=["chat-en", "chat-zh", "code"])
def test_greedy_generation_matches_transformers(prompt, demo, hf):
    tokenizer, model = hf
    text = demo.generate(prompt, max_new_tokens=24)
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=[151643, 151645])
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text == expected


def test_seeded_sampling_is_reproducible(demo):
    options = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    prompt = "Once upon a time"
    first = demo.generate(prompt, **options)
    assert demo.generate(prompt, **options) == first
    others = {demo.generate(prompt, **dict(options, seed=s)) for s in range(1, 5)}
    assert len(others | {first}) > 1, "different seeds should give different samples"


@pytest.mark.parametrize("options", [
    dict(), dict(temperature=0.9, top_p=0.9, seed=3), dict(stop=["\n"]), dict(stop=["。", "，"]),
    dict(temperature=1.2, min_p=0.05, repetition_penalty=1.2, seed=11),
])
def test_streaming_concatenates_to_generate(demo, options):
    prompt = [{"role": "user", "content": "列出三种水果，并各用一个表情符号🍎表示。"}]
    pieces = list(demo.stream(prompt, max_new_tokens=30, **options))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == demo.generate(prompt, max_new_tokens=30, **options)
    for s in options.get("stop", []):
        assert s not in "".join(pieces)


def test_ignore_eos_runs_to_max_new_tokens(demo):
    prompt = [{"role": "user", "content": "Say OK."}]
    short = demo.generate(prompt, max_new_tokens=40)
    ids = demo.tokenizer.encode(demo.generate(prompt, max_new_tokens=40, ignore_eos=True))
    assert len(demo.tokenizer.encode(short)) < 40 <= len(ids) + 2  # re-encoding may merge a token or two


def test_prompt_longer_than_context(demo):
    with pytest.raises(RefqwenError, match="context window holds 32768"):
        demo.generate(list(range(32768)), max_new_tokens=1)


def test_text_stream_never_splits_characters(demo):
    text = "emoji 👩‍👩‍👧‍👦🇯🇵 and 中文 and ภาษาไทย"
    ids = demo.tokenizer.encode(text)
    decoder = TextStream(demo.tokenizer)
    pieces = [decoder.add(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.text(alphabet="abc。\n", max_size=4), max_size=12),
       stop=st.lists(st.text(alphabet="abc。\n", min_size=1, max_size=3), max_size=2))
def test_stop_strings_cut_exactly(pieces, stop):
    """Generation ends at the first piece after which a stop string appears, cut before it."""
    text = ""
    for piece in pieces:
        text += piece
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            text = text[:min(hits)]
            break
    assert "".join(stream_text(pieces, stop)) == text


# ---- the sampling rules against transformers' logits processors -------------------------

def allowed_by_transformers(logits, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0):
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = torch.tensor(logits)[None]
    for warper in [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) + \
            ([TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else []):
        scores = warper(None, scores)
    return set(np.flatnonzero(np.isfinite(scores[0].numpy())))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), top_k=st.sampled_from([0, 1, 5, 40]), top_p=st.sampled_from([1.0, 0.9, 0.5]),
       min_p=st.sampled_from([0.0, 0.05, 0.3]), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_sampling_keeps_exactly_what_transformers_keeps(seed, top_k, top_p, min_p, temperature):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(200) * 3).astype(np.float32)
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    probs = sampling_probs(logits, s)
    assert set(np.flatnonzero(probs)) == allowed_by_transformers(logits, top_k, top_p, min_p, temperature)
    assert abs(probs.sum() - 1) < 1e-5
    assert {next_token(logits, [], s, rng) for _ in range(50)} <= set(np.flatnonzero(probs))


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0], np.float32)
    history = [0, 1, 1]
    expected = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([history]), torch.tensor(logits)[None])[0]
    penalized_argmax = next_token(logits, history, Sampling(repetition_penalty=1.5), np.random.default_rng())
    assert penalized_argmax == int(expected.argmax()) == 3
    assert next_token(np.array([3.0, 2.9], np.float32), [0], Sampling(repetition_penalty=1.5),
                      np.random.default_rng()) == 1


def test_bad_sampling_options():
    with pytest.raises(RefqwenError, match="top_p must be in"):
        Sampling(top_p=0)
    with pytest.raises(RefqwenError, match="temperature must be >= 0"):
        Sampling(temperature=-1)
