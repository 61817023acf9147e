"""Text <-> token ids, with the `tokenizers` library, from a tokenizer.json or a GGUF header.

A GGUF carries the byte-level BPE vocabulary, merges and token types but no tokenizer.json;
we rebuild the equivalent: Qwen2's pre-tokenizer split pattern, byte-level mapping, and
control/user-defined tokens as added tokens so they are matched whole. GGUF records no
normalizer and llama.cpp applies none, so none is applied (Qwen2's own tokenizer.json
applies NFC, which a tokenizer.json folder keeps).
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from refqwen.chat_template import render_chat_template
from refqwen.errors import RefqwenError
from refqwen.files import check_regular_file, read_json, read_text

MAX_TOKENIZER_BYTES = 256 * 1024 ** 2  # Qwen2's tokenizer.json is 7 MB

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")  # GGUF tokenizer.ggml.pre values that use QWEN2_SPLIT
END_OF_TURN = ("<|im_end|>", "<|endoftext|>")  # Qwen2 ends chat turns with the first, documents with the second
CONTROL, USER_DEFINED = 3, 4  # GGUF token types
GGUF_SPECIAL_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
                     "unk_token": "unknown_token_id"}


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, chat_template: str | None = None, eos_token_ids=(),
                 special_tokens: dict | None = None):
        self.backend = backend
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}  # bos_token, eos_token, ... as the template sees them
        named = [backend.token_to_id(t) for t in END_OF_TURN]
        self.end_token_ids = frozenset(int(i) for i in [*eos_token_ids, *named] if i is not None)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False):
        if not self.chat_template:
            raise RefqwenError("this model has no chat template (tokenizer_config.json, chat_template.jinja or "
                               "GGUF tokenizer.chat_template)")
        text = render_chat_template(self.chat_template, messages, add_generation_prompt, **self.special_tokens)
        return self.backend.encode(text, add_special_tokens=False).ids if tokenize else text

    def save(self, folder) -> None:
        """tokenizer.json, tokenizer_config.json (chat template, special tokens) and the end tokens
        in generation_config.json, as from_hf_folder reads them back."""
        folder = Path(folder)
        self.backend.save(str(folder / "tokenizer.json"))
        config = dict(self.special_tokens, chat_template=self.chat_template)
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(self.end_token_ids)}))

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, folder, eos_token_ids=()) -> "Tokenizer | None":
        """tokenizer.json (+ tokenizer_config.json, chat_template.jinja); None if the folder has none."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists():
            return None
        backend = _read_tokenizer_json(folder / "tokenizer.json")
        config = read_json(folder / "tokenizer_config.json", "tokenizer_config.json") \
            if (folder / "tokenizer_config.json").exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
        if (folder / "chat_template.jinja").exists():
            template = read_text(folder / "chat_template.jinja", "chat template")
        if template is not None and not isinstance(template, str):
            raise RefqwenError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string, "
                               f"got {type(template).__name__}")
        specials = {k: _token_text(v, k, folder) for k, v in config.items() if k.endswith("_token") and v is not None}
        return cls(backend, template, eos_token_ids, specials)

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str) -> "Tokenizer | None":
        """From GGUF tokenizer.* keys (`meta`: key -> Python value); None if the file has no vocabulary."""
        kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
        if kind is None and "tokenizer.ggml.tokens" not in meta:
            return None
        if kind != "gpt2" or pre not in QWEN2_PRE_TOKENIZERS:
            raise RefqwenError(f"{source}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not Qwen2's "
                               f"(expected 'gpt2' with one of {QWEN2_PRE_TOKENIZERS})")
        tokens, types, merges = _gguf_vocabulary(meta, source)
        try:
            backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                                  byte_fallback=False))
        except BaseException as e:  # the tokenizers library panics (a BaseException) on some inconsistencies
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            raise RefqwenError(f"{source}: the GGUF vocabulary and merges do not form a BPE tokenizer ({e})") from None
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types) if k == USER_DEFINED])
        ids = {key: _gguf_token_id(meta, f"tokenizer.ggml.{key}", len(tokens), source)
               for key in ("eos_token_id", "eot_token_id", *GGUF_SPECIAL_KEYS.values())}
        eos = [ids[k] for k in ("eos_token_id", "eot_token_id") if ids[k] is not None]
        specials = {name: tokens[ids[key]] for name, key in GGUF_SPECIAL_KEYS.items() if ids[key] is not None}
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise RefqwenError(f"{source}: tokenizer.chat_template must be a string")
        return cls(backend, template, eos, specials)


def _read_tokenizer_json(path: Path) -> BackendTokenizer:
    check_regular_file(path, "tokenizer.json")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise RefqwenError(f"{path}: larger than {MAX_TOKENIZER_BYTES // 1024 ** 2} MiB; refusing to read it")
    text = read_text(path, "tokenizer.json", MAX_TOKENIZER_BYTES)
    try:
        return BackendTokenizer.from_str(text)
    except BaseException as e:  # its own Exception with no file name, or a PanicException (a BaseException)
        if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
            raise
        raise RefqwenError(f"{path}: not a tokenizer the tokenizers library can read ({e})") from None


def _gguf_vocabulary(meta: dict, source: str) -> tuple[list[str], list[int], list[tuple[str, str]]]:
    """tokens, token types and merges from a GGUF header, checked for type (merges may be absent: a BPE
    vocabulary without merges encodes every character on its own)."""
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type") or []
    merges = meta.get("tokenizer.ggml.merges") or []
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise RefqwenError(f"{source}: tokenizer.ggml.tokens must be a non-empty list of strings")
    if not isinstance(types, list) or not all(isinstance(k, int) for k in types):
        raise RefqwenError(f"{source}: tokenizer.ggml.token_type must be a list of integers")
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise RefqwenError(f"{source}: tokenizer.ggml.merges must be a list of 'left right' strings")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    vocab = set(tokens)
    for i, (left, right) in enumerate(pairs):  # the tokenizers library panics on these instead of raising
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise RefqwenError(f"{source}: tokenizer.ggml.merges[{i}] {left + ' ' + right!r} merges tokens "
                               f"that are not all in the vocabulary")
    return tokens, types, pairs


def _gguf_token_id(meta: dict, key: str, vocab_size: int, source: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise RefqwenError(f"{source}: {key} = {value!r} is not a token id in 0..{vocab_size - 1}")
    return value


def _token_text(value, key: str, folder: Path) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    text = value.get("content") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise RefqwenError(f"{folder / 'tokenizer_config.json'}: {key} must be a string or {{'content': ...}}, "
                           f"got {value!r:.100}")
    return text
