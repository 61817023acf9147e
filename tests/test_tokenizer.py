"""Tokenizer and chat-template parity with transformers, and the round-trip property."""

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refqwen.tokenizer import Tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:14 pm, isn't it? I'd say we'll see.",
    "chinese": "长城是中国古代的军事防御工程，全长两万多公里。",
    "arabic": "اللغة العربية هي إحدى أكثر اللغات انتشاراً في العالم.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "thai": "ภาษาไทยเป็นภาษาที่มีวรรณยุกต์ และไม่มีการเว้นวรรคระหว่างคำ",
    "hindi": "हिन्दी भारत की सबसे अधिक बोली जाने वाली भाषा है।",
    "japanese": "日本語の文章には、ひらがな・カタカナ・漢字が混在します。",
    "korean": "한국어는 한글로 표기하며, 띄어쓰기를 합니다.",
    "emoji": "Launch 🚀🔥 then 👩‍👩‍👧‍👦 and flags 🇯🇵🇫🇷, skin tones 👍🏽 done ✅",
    "code": "def f(x):\n\tif x >= 10:\n\t\treturn {'a': [1, 2, 3]}  # comment\n    return x**2 // 3\n",
    "whitespace": "a  b   c    d\n\n\n  e \t\t f\r\n\r\n   \n",
    "special": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><tool_call>x</tool_call>",
    "numbers": "1234567890 3.14159 1e-10 0x1F 1,000,000",
}
CHATS = {
    "single": [{"role": "user", "content": "Write a haiku about rain."}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    "multi-turn": [{"role": "system", "content": "你是一个乐于助人的助手。"},
                   {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！有什么可以帮你？"},
                   {"role": "user", "content": "Explain recursion 🙂"}],
}


@pytest.fixture(scope="module")
def hf_tokenizer(hf):
    return hf[0]


@pytest.fixture(scope="module")
def folder_tokenizers(hf_tokenizer, tmp_path_factory):
    """(refqwen, transformers) tokenizers loaded from a tokenizer.json folder written by transformers."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    hf_tokenizer.save_pretrained(folder)
    assert (folder / "tokenizer.json").exists()
    return Tokenizer.from_hf_folder(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_gguf_tokenizer_matches_transformers(name, demo, hf_tokenizer):
    text = TEXTS[name]
    ids = demo.tokenizer.encode(text)
    assert ids == hf_tokenizer(text)["input_ids"]
    assert demo.tokenizer.decode(ids) == hf_tokenizer.decode(ids) == text


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_tokenizer_json_matches_transformers(name, folder_tokenizers):
    ours, theirs = folder_tokenizers
    ids = ours.encode(TEXTS[name])
    assert ids == theirs(TEXTS[name])["input_ids"]
    assert ours.decode(ids) == theirs.decode(ids)


def test_special_tokens_stay_whole(demo):
    ids = demo.tokenizer.encode("<|im_start|>assistant<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645
    assert demo.tokenizer.end_token_ids >= {151643, 151645}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_decode_inverts_encode(demo, s):
    assert demo.tokenizer.decode(demo.tokenizer.encode(s)) == s


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=100))
def test_decode_inverts_encode_from_tokenizer_json(folder_tokenizers, s):
    ours, _ = folder_tokenizers
    normalizer = ours.backend.normalizer
    expected = unicodedata.normalize("NFC", s) if normalizer and "NFC" in repr(normalizer) else s
    assert ours.decode(ours.encode(s)) == expected


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("chat", sorted(CHATS))
def test_chat_template_matches_transformers(chat, generation_prompt, demo, hf_tokenizer):
    messages = CHATS[chat]
    text = demo.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert text == expected
    ids = demo.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
    expected_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                    tokenize=True, return_dict=False)
    assert ids == list(expected_ids)


def test_chat_template_from_tokenizer_folder(folder_tokenizers):
    ours, theirs = folder_tokenizers
    messages = CHATS["system"]
    assert ours.chat_template
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, add_generation_prompt=True,
                                                                             tokenize=False)


def test_template_errors_are_clear(demo):
    from refqwen import RefqwenError

    with pytest.raises(RefqwenError, match=r"messages\[0\] must be a dict"):
        demo.tokenizer.apply_chat_template(["hello"])
