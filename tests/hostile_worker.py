"""Malformed configs, safetensors headers, GGUF headers and chat templates, built by hypothesis, loaded
under a memory limit (RLIMIT_AS) with a time limit per load: each must load a valid model or raise
RefqwenError. Run in a subprocess by tests/test_hostile_input.py, since a hang or a runaway allocation
is exactly the failure looked for:

    python tests/hostile_worker.py {config,safetensors,gguf,template} EXAMPLES
"""

import json
import resource
import shutil
import signal
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

MEMORY_LIMIT = 3 * 1024 ** 3  # address space of the whole worker: a declared 2^40-element array cannot fit
SECONDS_PER_LOAD = 12  # a tiny file loads in milliseconds; above the chat template's own 5 s limit

TINY = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True}


class LoadTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise LoadTimeout(f"a load ran longer than {SECONDS_PER_LOAD} s")


def must_load_or_refuse(load):
    """Run `load()`: success or RefqwenError pass; a hang, MemoryError or any other exception fails."""
    from refqwen.errors import RefqwenError

    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_LOAD)
    try:
        load()
    except RefqwenError:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def tiny_weights(raw=TINY) -> dict:
    from refqwen import Config
    from refqwen.checkpoint.weights import expected_shapes

    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(Config.from_hf_dict(raw)).items()}


# ---- strategies ---------------------------------------------------------------------------------

ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                     max_size=4), max_leaves=12)
FIELD_VALUES = (st.integers(-3, 3) | st.sampled_from([0, 1, 2 ** 31, 10 ** 9, 2 ** 63, 10 ** 30]) | st.floats()
                | st.booleans() | st.none() | st.text(max_size=4) | st.lists(st.integers(-2, 4), max_size=3)
                | st.dictionaries(st.sampled_from(["type", "rope_type", "factor", "beta_fast",
                                                   "original_max_position_embeddings"]),
                                  st.sampled_from(["yarn", "default", 0, -1, 2.0, None, "x"]), max_size=4))
FIELDS = [*TINY, "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "rope_scaling",
          "rope_parameters", "eos_token_id", "mlp_only_layers", "num_experts", "num_experts_per_tok",
          "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step", "model_type",
          "qkv_bias", "norm_topk_prob"]
CONFIGS = (st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, max_size=4).map(lambda d: {**TINY, **d})
           | st.dictionaries(st.sampled_from(FIELDS), FIELD_VALUES, max_size=4).map(
               lambda d: {**TINY, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 2,
                          "num_experts_per_tok": 1, "moe_intermediate_size": 8,
                          "shared_expert_intermediate_size": 8, **d})
           | ANY_JSON)

COUNTS = st.integers(0, 8) | st.sampled_from([-1, 2 ** 31, 2 ** 40, 2 ** 63 - 1])
ENTRIES = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F64", "x"]) | st.integers() | st.none(),
    "shape": st.lists(COUNTS, max_size=3) | ANY_JSON,
    "data_offsets": st.lists(COUNTS, min_size=2, max_size=2) | ANY_JSON,
})
SAFETENSORS_HEADERS = st.dictionaries(st.sampled_from(["model.norm.weight", "model.embed_tokens.weight", "x",
                                                       "__metadata__"]),
                                      ENTRIES | ANY_JSON, max_size=4)


def gguf_string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


GGUF_STRINGS = st.sampled_from([b"general.architecture", b"qwen2.block_count", b"tokenizer.ggml.tokens",
                                b"\xff\xfe", b"blk.0.attn_norm.weight", b"blk.999999999.attn_norm.weight",
                                b"blk.x.ffn_up.weight", b"token_embd.weight"]) | st.binary(max_size=6)


@st.composite
def gguf_values(draw):
    kind = draw(st.integers(0, 13))
    if kind == 8:
        return struct.pack("<I", 8) + gguf_string(draw(GGUF_STRINGS))
    if kind == 9:
        item, count = draw(st.integers(0, 13)), draw(COUNTS.filter(lambda c: c >= 0))
        body = draw(st.binary(max_size=32))
        return struct.pack("<IIQ", 9, item, count) + body
    return struct.pack("<I", kind) + draw(st.binary(min_size=0, max_size=8))


@st.composite
def gguf_files(draw):
    """A header whose every count and length is drawn, small or absurd, with a little data after it."""
    n_tensors = draw(st.integers(0, 3) | st.sampled_from([2 ** 40, 2 ** 64 - 1]))
    kvs = draw(st.lists(st.tuples(GGUF_STRINGS, gguf_values()), max_size=4))
    n_keys = draw(st.just(len(kvs)) | st.sampled_from([2 ** 40, 2 ** 64 - 1]))
    head = b"GGUF" + struct.pack("<IQQ", draw(st.sampled_from([3, 3, 3, 2, 1, 3 << 24])), n_tensors, n_keys)
    body = b"".join(gguf_string(k) + v for k, v in kvs)
    for _ in range(min(n_tensors, 3)):
        dims = draw(st.lists(COUNTS.filter(lambda c: c >= 0), max_size=5))
        body += gguf_string(draw(GGUF_STRINGS)) + struct.pack("<I", draw(st.integers(0, 6)) if dims else 0)
        body += b"".join(struct.pack("<Q", d) for d in dims)
        body += struct.pack("<IQ", draw(st.integers(0, 40)), draw(COUNTS.filter(lambda c: c >= 0)))
    return head + body + draw(st.binary(max_size=64))


@st.composite
def mutated_gguf(draw, valid: bytes):
    """A valid tiny GGUF with a u64/u32 somewhere in its header overwritten by an absurd value."""
    data = bytearray(valid)
    header_end = min(len(data), 4096)  # the key/values and the tensor table
    pos = draw(st.integers(4, header_end - 8))
    data[pos:pos + 8] = struct.pack("<Q", draw(st.sampled_from([0, 2 ** 32 - 1, 2 ** 40, 2 ** 63, 2 ** 64 - 1])))
    return bytes(data)


TEMPLATE_PIECES = st.sampled_from([
    "{% for i in range(100000) %}", "{% endfor %}", "{{ 9**99999 }}", "{{ 'ab' * 100000000 }}", "{{ 1/0 }}",
    "{{ messages[0]['content'] + 1 }}", "{{ messages[5] }}", "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
    "{{ raise_exception('no') }}", "{{ 'x'|center(999999999) }}", "{% if %}", "{{ messages|tojson }}",
    "{% for m in messages %}{{ m.role }}{{ m.content }}{% endfor %}", "{{ ''.__class__ }}", "{{ x.y.z }}",
    "{{ (messages|length) // 0 }}", "{% set ns = namespace(a=1) %}{% set ns.a = ns.a * 10 %}{{ ns.a }}",
])
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "user", None]),
                                           "content": st.text(max_size=8) | st.none() | st.integers()
                                           | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                             "text": st.text(max_size=4)}),
                                                      max_size=2)}),
                    max_size=3)


# ---- the checks -------------------------------------------------------------------------------

def run(kind: str, examples: int) -> None:
    import refqwen
    from refqwen.chat_template import render_chat_template

    work = Path(tempfile.mkdtemp(prefix="refqwen-hostile-"))
    folder = work / "model"
    folder.mkdir()
    save_file(tiny_weights(), str(folder / "model.safetensors"))
    options = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                       suppress_health_check=list(HealthCheck))

    def load(path):
        return lambda: refqwen.load(path, progress=False)

    @options
    @given(CONFIGS)
    def configs(raw):
        (folder / "config.json").write_text(json.dumps(raw))
        must_load_or_refuse(load(folder))

    @options
    @given(SAFETENSORS_HEADERS, st.binary(max_size=64), st.booleans())
    def safetensors_headers(header, data, lie_about_length):
        (folder / "config.json").write_text(json.dumps(TINY))
        text = json.dumps(header).encode()
        n = 2 ** 62 if lie_about_length else len(text)
        padding = bytes(1024)  # so the file is big enough for the config, and the header itself is checked
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", n) + text + data + padding)
        must_load_or_refuse(load(folder))

    valid_gguf = _valid_gguf(work)

    with_tokenizer = (Path(__file__).parent / "fuzz" / "corpus" / "gguf" / "tiny-with-tokenizer.gguf").read_bytes()

    def load_and_tokenize(path):
        model = refqwen.load(path, progress=False)
        if model.tokenizer is not None:
            model.tokenizer.encode("abc a")
            if model.tokenizer.chat_template:
                model.tokenizer.apply_chat_template([{"role": "user", "content": "a"}])

    @options
    @given(gguf_files() | mutated_gguf(valid_gguf) | mutated_gguf(with_tokenizer))
    def gguf_headers(data):
        (work / "m.gguf").write_bytes(data)
        must_load_or_refuse(lambda: load_and_tokenize(work / "m.gguf"))

    @options
    @given(st.lists(TEMPLATE_PIECES | st.text(max_size=6), max_size=4).map("".join), MESSAGES)
    def templates(template, messages):
        must_load_or_refuse(lambda: render_chat_template(template, messages))

    checks = {"config": configs, "safetensors": safetensors_headers, "gguf": gguf_headers, "template": templates}
    try:
        checks[kind]()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _valid_gguf(work: Path) -> bytes:
    sys.path.insert(0, str(Path(__file__).parent))
    from gguf_writer import write_gguf

    from refqwen import Config

    cfg = Config.from_hf_dict(TINY)
    write_gguf(work / "valid.gguf", cfg, tiny_weights())
    return (work / "valid.gguf").read_bytes()


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _alarm)
    run(sys.argv[1], int(sys.argv[2]))
    print("ok")
