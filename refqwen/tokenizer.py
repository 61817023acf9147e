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
        backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text()) \
            if (folder / "tokenizer_config.json").exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        specials = {k: _token_text(v) for k, v in config.items() if k.endswith("_token") and v is not None}
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
        tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                              byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types) if k == USER_DEFINED])
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        specials = {name: tokens[meta[f"tokenizer.ggml.{key}"]] for name, key in GGUF_SPECIAL_KEYS.items()
                    if f"tokenizer.ggml.{key}" in meta}
        return cls(backend, meta.get("tokenizer.chat_template"), eos, specials)


def _token_text(value) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    return value["content"] if isinstance(value, dict) else value
