"""Hostile input (docs/security.md): nothing hangs, nothing exhausts memory, nothing is silently wrong,
every error is one RefqwenError (one line and exit status 2 from the CLI), an interrupted write leaves
nothing behind. One test per class of input; tests/hostile_worker.py generates many of each."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hostile_worker import TINY, tiny_weights
from safetensors.numpy import load_file, save_file

import refqwen
from refqwen import ConfigError, RefqwenError, WeightsError
from refqwen.checkpoint.write_gguf import write_gguf_checkpoint
from refqwen.checkpoint.write_quantized import write_quantized_checkpoint
from refqwen.cli import main

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def time_limit(seconds):
    """Fail instead of hanging (a named pipe that is opened blocks forever)."""
    def hang(signum, frame):
        raise AssertionError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def folder(tmp_path):
    """A tiny dense model folder (config.json + model.safetensors), built without transformers."""
    return _tiny_folder(tmp_path / "model", TINY)


@pytest.fixture
def folder32(tmp_path):
    """The same with hidden size 32, which Q8_0's blocks of 32 tile (for --gguf exports)."""
    return _tiny_folder(tmp_path / "model32", dict(TINY, hidden_size=32, intermediate_size=64))


def _tiny_folder(f, raw):
    f.mkdir()
    (f / "config.json").write_text(json.dumps(raw))
    save_file(tiny_weights(raw), str(f / "model.safetensors"))
    return f


def set_config(folder, **changes):
    (folder / "config.json").write_text(json.dumps({**TINY, **changes}))


def write_header(path, header: dict, data: bytes = b""):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


# ---- generated inputs, under a memory and a time limit ----------------------------------------------

@pytest.mark.parametrize("kind", ["config", "safetensors", "gguf", "template"])
def test_generated_hostile_inputs_load_or_refuse(kind):
    """Hypothesis builds malformed configs / safetensors headers / GGUF headers / templates; each load, in a
    subprocess limited to 3 GiB of address space and 12 s per load, either succeeds or raises RefqwenError."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "hostile_worker.py"), kind, "120"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-3000:] + done.stderr[-3000:]


# ---- 1. hangs and unbounded memory --------------------------------------------------------------------

@pytest.mark.parametrize("victim", ["config.json", "model.safetensors", "tokenizer.json"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_non_regular_files_are_refused_up_front(folder, victim, kind):
    (folder / victim).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(folder / victim)
    elif kind == "dev-zero":
        (folder / victim).symlink_to("/dev/zero")
    else:
        (folder / victim).mkdir()
    with time_limit(20), pytest.raises(RefqwenError, match=rf"{victim}: expected a regular .*found "
                                                           rf"(a named pipe|a device|a folder)"):
        refqwen.load(folder, progress=False)


def test_gguf_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "m.gguf")
    with time_limit(20), pytest.raises(WeightsError, match="m.gguf: expected a regular GGUF file, found a named pipe"):
        refqwen.load(tmp_path / "m.gguf", progress=False)


def test_49_byte_gguf_declaring_a_2_40_element_array(tmp_path):
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", 9, 0, 2 ** 40)
    assert len(data) == 49
    (tmp_path / "m.gguf").write_bytes(data)
    with time_limit(20), pytest.raises(WeightsError, match=r"key a declares an array of 1099511627776 items, "
                                                           r"more than the file holds"):
        refqwen.load(tmp_path / "m.gguf", progress=False)


def tiny_gguf(path, extra: dict | None = None, **config):
    from gguf_writer import write_gguf

    cfg = refqwen.Config.from_hf_dict({**TINY, **config})
    write_gguf(path, cfg, {**tiny_weights({**TINY, **config}), **(extra or {})})
    return path


@pytest.mark.parametrize("name,message", [
    ("blk.999999999.attn_norm.weight", r"tensor blk.999999999.attn_norm.weight: expected blk.N. with a layer index "
                                       r"N below 1024"),
    ("blk.x.attn_norm.weight", r"tensor blk.x.attn_norm.weight: expected blk.N."),
])
def test_gguf_layer_index_checked_before_looping(tmp_path, name, message):
    import gguf_writer

    original = gguf_writer._gguf_tensors
    gguf_writer._gguf_tensors = lambda cfg, w: {**original(cfg, w), name: np.ones(16, np.float32)}
    try:
        tiny_gguf(tmp_path / "m.gguf")
    finally:
        gguf_writer._gguf_tensors = original
    with time_limit(20), pytest.raises(WeightsError, match=message):
        refqwen.load(tmp_path / "m.gguf", progress=False)


@pytest.mark.parametrize("changes,message", [
    (dict(num_hidden_layers=10 ** 9), r"num_hidden_layers = 1000000000 is above refqwen's limit of 1024"),
    (dict(architectures=["Qwen2MoeForCausalLM"], num_experts=10 ** 8, num_experts_per_tok=1,
          moe_intermediate_size=8, shared_expert_intermediate_size=8), r"num_experts = 100000000 is above"),
    (dict(vocab_size=10 ** 12), r"vocab_size = 1000000000000 is above"),
    (dict(hidden_size=2 ** 20, num_attention_heads=2), r"hidden_size = 1048576 is above"),
    (dict(num_hidden_layers=1000), r"the config declares .* weights, which need at least .* bytes, but the weight "
                                   r"files hold"),
])
def test_config_sizes_are_bounded(folder, changes, message):
    set_config(folder, **changes)
    with time_limit(20), pytest.raises(RefqwenError, match=message):
        refqwen.load(folder, progress=False)


def test_chat_template_rendering_is_bounded(monkeypatch):
    from refqwen import chat_template

    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.5)
    user = [{"role": "user", "content": "hi"}]
    start = time.monotonic()
    with pytest.raises(RefqwenError, match="ran for more than 0.5 s"):
        chat_template.render_chat_template("{% for i in range(100000) %}{% for j in range(100000) %}"
                                           "{% endfor %}{% endfor %}", user)
    assert time.monotonic() - start < 5
    with pytest.raises(RefqwenError, match="output passed"):
        chat_template.render_chat_template("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", user)
    for template in ("{{ 'ab' * 100000000 }}", "{{ 7 ** 100000 }}", "{{ 'x'|center(1000000000) }}",
                     # a width or precision written in a format string sizes the output before any cap sees it
                     "{{ '{:>999999999}'.format(1) }}", "{{ '{x:.999999999f}'.format_map({'x': 1.5}) }}",
                     "{{ '%999999999d' % 1 }}", "{{ '%.999999999f'|format(1.5) }}", "{{ '{:{}}'.format(1, 10**9) }}"):
        start = time.monotonic()
        with pytest.raises(RefqwenError, match="above the template limit"):
            chat_template.render_chat_template(template, user)
        assert time.monotonic() - start < 0.5, template  # refused before building anything
    # ordinary formatting still works
    assert chat_template.render_chat_template("{{ '{:>4}|%03d'.format(7) % 5 }}{{ '%s-%s'|format(1, 2) }}",
                                              user) == "   7|0051-2"


# ---- 2. silently wrong results --------------------------------------------------------------------------

@pytest.mark.parametrize("offsets,message", [
    ([-64, 0], r"data_offsets must be \[begin, end\] with 0 <= begin <= end, got \[-64, \d+\]"),
    ("overlap", r"tensors .* and .* overlap in the file"),
])
def test_safetensors_offsets(folder, offsets, message):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    header, start = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [start, start + t.nbytes]}
        start += t.nbytes
    first, second = list(header)[:2]
    size = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    if offsets == "overlap":
        size2 = header[second]["data_offsets"][1] - header[second]["data_offsets"][0]
        header[second]["data_offsets"] = [0, size2]  # the second tensor re-reads the first one's bytes
    else:
        header[first]["data_offsets"] = [offsets[0], offsets[0] + size]
    write_header(path, header, b"".join(t.tobytes() for t in tensors.values()))
    with pytest.raises(WeightsError, match=message):
        refqwen.load(folder, progress=False)


@pytest.mark.parametrize("changes,message", [
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps must be a positive number"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be a positive number"),
    (dict(rope_theta=0), "rope_theta must be a positive number"),
    (dict(rope_theta=-10000.0), "rope_theta must be a positive number"),
])
def test_values_that_give_nan_logits_are_refused(folder, changes, message):
    set_config(folder, **changes)
    with pytest.raises(ConfigError, match=message):
        refqwen.load(folder, progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(folder, tmp_path, bad):
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"tensor model.layers.1.mlp.up_proj.weight holds 1 NaN or infinite "
                                           r"values .* at index \(3, 5\)"):
        refqwen.load(folder, progress=False)
    path = tiny_gguf(tmp_path / "m.gguf")
    model = refqwen.load(path, progress=False)  # a finite GGUF loads
    weights = tiny_weights()
    weights["model.norm.weight"][2] = bad
    from gguf_writer import write_gguf

    write_gguf(path, model.config, weights)
    with pytest.raises(WeightsError, match=r"tensor output_norm.weight holds 1 NaN or infinite"):
        refqwen.load(path, progress=False)


def test_int4_zero_point_above_15_is_refused(wide_source, tmp_path):
    out = write_quantized_checkpoint(wide_source, tmp_path / "q", "int4-g32", progress=False)
    tensors = load_file(out / "model.safetensors")
    tensors["lm_head.weight_zero"][1, 2] = 16
    save_file(tensors, str(out / "model.safetensors"), metadata=json.loads(json.dumps(_metadata(out))))
    with pytest.raises(WeightsError, match=r"lm_head.weight_zero holds zero point 16 at \(1, 2\); int4 zero points "
                                           r"are 0..15"):
        refqwen.load(out, backend="numba-int4", progress=False)


def _metadata(out):
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "np") as f:
        return f.metadata()


def test_perplexity_checks_every_token_id(folder):
    model = refqwen.load(folder, progress=False)
    for ids, bad in (([1, 2, 3, -1], "token 3: -1"), ([1, 64, 2], "token 1: 64"), ([1, 2.5, 3], "token 1: 2.5")):
        with pytest.raises(RefqwenError, match=rf"{bad} is not a token id in the vocabulary \[0, 64\)"):
            refqwen.perplexity(model, ids, window=8, progress=False)


def test_kv_cache_of_another_model_is_refused(folder, tmp_path):
    model = refqwen.load(folder, progress=False)
    other_folder = tmp_path / "other"
    other_folder.mkdir()
    other = dict(TINY, num_hidden_layers=3)
    (other_folder / "config.json").write_text(json.dumps(other))
    save_file(tiny_weights(other), str(other_folder / "model.safetensors"))
    other_model = refqwen.load(other_folder, progress=False)
    for cache in (other_model.new_cache(), refqwen.load(folder, progress=False).new_cache()):
        if cache.config == model.config:
            model.forward([1, 2], cache)  # the same config: fine
            continue
        with pytest.raises(RefqwenError, match="KV cache was made for a model with another config"):
            model.forward([1, 2], cache)


def test_messages_are_checked():
    from refqwen.chat_template import render_chat_template

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    with pytest.raises(RefqwenError, match=r"messages\[1\] must be a dict with a string 'role'"):
        render_chat_template(template, [{"role": "user", "content": "a"}, {"role": None, "content": "b"}])
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    assert render_chat_template(template, [{"role": "user", "content": parts}]) == "<user>Hello, world"
    with pytest.raises(RefqwenError, match=r"messages\[0\]\['content'\]\[0\]: refqwen runs text-only models"):
        render_chat_template(template, [{"role": "user", "content": [{"type": "image", "url": "x"}]}])


# ---- 3. raw Python exceptions -> RefqwenError ----------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "expected a JSON object, found list"),
    (b"3", "expected a JSON object, found int"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b"[" * 100000 + b"]" * 100000, "JSON nested too deeply"),
    (b"{", "not valid JSON"),
])
def test_config_json_not_an_object(folder, content, message):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        refqwen.load(folder, progress=False)


@pytest.mark.parametrize("field,value", [
    ("rms_norm_eps", "1e-6"), ("rms_norm_eps", [1]), ("rope_theta", {"a": 1}), ("rope_theta", "x"),
    ("rope_scaling", "yarn"), ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "beta_fast": [1]}),
    ("rope_scaling", 5), ("sliding_window", "4"), ("use_sliding_window", "yes"),
    ("eos_token_id", "2"), ("eos_token_id", [1, "x"]), ("eos_token_id", {"a": 1}), ("tie_word_embeddings", "false"),
    ("num_hidden_layers", 2.0), ("num_hidden_layers", True), ("vocab_size", None), ("architectures", 7),
    ("layer_types", "full_attention"), ("max_position_embeddings", "64"), ("max_window_layers", -1),
])
def test_wrong_json_types_in_config(folder, field, value):
    set_config(folder, **{"use_sliding_window": field == "sliding_window", field: value})
    if field == "vocab_size":  # null means absent: a required key is missing
        with pytest.raises(ConfigError, match="missing key 'vocab_size'"):
            refqwen.load(folder, progress=False)
        return
    with pytest.raises(ConfigError, match="config.json: "):
        refqwen.load(folder, progress=False)


@pytest.mark.parametrize("value", [3, "1", [0, "1"], [5], [-1]])
def test_mlp_only_layers_checked(value):
    moe = dict(TINY, architectures=["Qwen2MoeForCausalLM"], num_experts=2, num_experts_per_tok=1,
               moe_intermediate_size=8, shared_expert_intermediate_size=8, mlp_only_layers=value)
    with pytest.raises(ConfigError, match="mlp_only_layers must"):
        refqwen.Config.from_hf_dict(moe)


@pytest.mark.parametrize("entry,message", [
    ([1, 2], "expected {dtype, shape, data_offsets}"),
    ({"dtype": 5, "shape": [16], "data_offsets": [0, 64]}, "is 5; refqwen reads"),
    ({"dtype": "F32", "shape": "16", "data_offsets": [0, 64]}, "shape must be a list"),
    ({"dtype": "F32", "shape": [16.0], "data_offsets": [0, 64]}, "shape must be a list"),
    ({"dtype": "F32", "shape": [16], "data_offsets": {"a": 0}}, "data_offsets must be"),
    ({"dtype": "F32", "shape": [16], "data_offsets": [0, "64"]}, "data_offsets must be"),
    ({"dtype": "F32", "shape": [2 ** 62, 2 ** 62], "data_offsets": [0, 64]}, "has 64 bytes of data"),
])
def test_malformed_safetensors_header_entries(folder, entry, message):
    write_header(folder / "model.safetensors", {"model.norm.weight": entry}, bytes(2048))
    with pytest.raises(WeightsError, match=message):
        refqwen.load(folder, progress=False)


def _sharded(folder, weight_map):
    (folder / "model.safetensors").rename(folder / "shard.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("weight_map,message", [
    (["shard.safetensors"], "'weight_map' must map tensor names to file names"),
    ({"a": 3}, "'weight_map' must map tensor names to file names"),
    ({"a": "../model/shard.safetensors"}, r"shard name '../model/shard.safetensors' points outside"),
    ({"a": "/etc/passwd"}, r"shard name '/etc/passwd' points outside"),
])
def test_index_weight_map_checked(folder, weight_map, message):
    _sharded(folder, weight_map)
    with pytest.raises(WeightsError, match=message):
        refqwen.load(folder, progress=False)


def test_index_symlink_out_of_the_folder(folder, tmp_path):
    _sharded(folder, {"a": "link.safetensors"})
    (tmp_path / "elsewhere.safetensors").write_bytes((folder / "shard.safetensors").read_bytes())
    (folder / "link.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(WeightsError, match="resolves to .*elsewhere.safetensors, outside"):
        refqwen.load(folder, progress=False)


def test_non_utf8_gguf_string(tmp_path):
    path = tiny_gguf(tmp_path / "m.gguf")
    data = path.read_bytes()
    at = data.index(b"qwen2", 30)  # the value of general.architecture
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    with pytest.raises(WeightsError, match="is not UTF-8"):
        refqwen.load(path, progress=False)


def test_malformed_tokenizer_json_names_the_file(folder):
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 5}}')
    with pytest.raises(RefqwenError, match=r"tokenizer.json: not a tokenizer the tokenizers library can read"):
        refqwen.load(folder, progress=False)
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer_config.json").write_text('{"chat_template": 5}')
    (folder / "tokenizer.json").write_text(_word_tokenizer().to_str())
    with pytest.raises(RefqwenError, match=r"tokenizer_config.json: chat_template must be a string"):
        refqwen.load(folder, progress=False)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


@pytest.mark.parametrize("options,message", [
    (dict(max_new_tokens="5"), "max_new_tokens must be an integer"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(top_k=1.5), "top_k must be an integer"),
    (dict(seed="x"), "seed must be an integer"), (dict(seed=-3), "seed must be an integer"),
    (dict(stop=[1]), "stop must be a string or a list of non-empty strings"), (dict(stop=[""]), "stop must be"),
    (dict(temperature="hot"), "temperature must be a finite number"), (dict(top_p=float("nan")), "top_p must be"),
])
def test_generation_arguments(folder, options, message):
    (folder / "tokenizer.json").write_text(_word_tokenizer().to_str())
    model = refqwen.load(folder, progress=False)
    options = {"max_new_tokens": 2, **options}
    with pytest.raises(RefqwenError, match=message):
        model.generate("a b", **options)
    with pytest.raises(RefqwenError, match=message):
        list(model.stream("a b", **options))


@pytest.mark.parametrize("template", ["{{ 10 ** 100000 }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
                                      "{{ 1 // 0 }}", "{{ messages[0].content + 1 }}", "{{ messages[9].x.y() }}"])
def test_template_errors_are_refqwen_errors(template):
    from refqwen.chat_template import render_chat_template

    with pytest.raises(RefqwenError, match="chat template"):
        render_chat_template(template, [{"role": "user", "content": None}])


@pytest.mark.parametrize("break_it", ["list-config", "deep-config", "fifo", "overlap", "nan"])
def test_cli_prints_one_line_and_exits_2(folder, capsys, break_it):
    if break_it == "list-config":
        (folder / "config.json").write_text("[]")
    elif break_it == "deep-config":
        (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    elif break_it == "fifo":
        (folder / "config.json").unlink()
        os.mkfifo(folder / "config.json")
    elif break_it == "overlap":
        write_header(folder / "model.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                     bytes(4096))
    else:
        tensors = load_file(folder / "model.safetensors")
        tensors["model.norm.weight"][0] = np.nan
        save_file(tensors, str(folder / "model.safetensors"))
    (folder / "hello.txt").write_text("a b a b a b")
    with time_limit(30):
        assert main(["ppl", str(folder / "hello.txt"), "--model", str(folder), "--window", "4"]) == 2
    err = capsys.readouterr().err  # after the progress bar, if loading got that far
    assert err.endswith("\n") and err.rstrip("\n").split("\n")[-1].startswith("refqwen: error: "), err
    assert err.count("refqwen: error") == 1 and "Traceback" not in err, err


def test_cli_usage_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as done:
        main(["generate", "hi", "--max-new-tokens", "many"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("refqwen generate: error: argument --max-new-tokens"), err


def test_cli_multi_line_error_becomes_one_line(folder, capsys):
    tensors = load_file(folder / "model.safetensors")
    tensors.pop("model.norm.weight")
    tensors["model.extra"] = np.zeros(3, np.float32)
    save_file(tensors, str(folder / "model.safetensors"))
    assert main(["info", "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing tensor model.norm.weight" in err and "unexpected tensor model.extra" in err


# ---- 4. interrupted or failing writes --------------------------------------------------------------------

SLOW_QUANTIZE = """
import sys, time
import refqwen.checkpoint.write_quantized as w
from refqwen.cli import main
original = w.quantize_tensor
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(0.3)
    return original(*args, **kwargs)
w.quantize_tensor = slow
sys.exit(main(["quantize", sys.argv[1], sys.argv[2]]))
"""


def _partials(out: Path):
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_quantize_leaves_nothing(folder, tmp_path, sig):
    out = tmp_path / "q"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_QUANTIZE, str(folder), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert _partials(out), "the partial output should exist while writing"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    if sig == signal.SIGTERM:  # handled like Ctrl-C: the temporary folder is removed at once
        assert proc.returncode == 130 and not _partials(out) and not out.exists()
        return
    assert _partials(out) and not out.exists()  # kill -9 cannot be handled: the next run cleans up
    (tmp_path / ".other.partial-1-abc").mkdir()  # another output's partial is left alone
    assert main(["quantize", str(folder), str(out)]) == 0
    assert not _partials(out) and out.is_dir() and (tmp_path / ".other.partial-1-abc").exists()


def test_partial_of_a_live_process_is_kept(folder, tmp_path):
    out = tmp_path / "q"
    live = tmp_path / f".q.partial-{os.getppid()}-xyz"  # our parent is alive
    live.mkdir()
    assert main(["quantize", str(folder), str(out)]) == 0
    assert live.exists()


def test_source_with_a_subfolder_and_umask(folder32, tmp_path):
    folder = folder32
    (folder / "original").mkdir()
    (folder / "original" / "notes.txt").write_text("x")
    os.mkfifo(folder / "a-pipe")  # skipped by the hash, not opened
    old = os.umask(0o022)
    try:
        with time_limit(60):
            out = write_quantized_checkpoint(folder, tmp_path / "q", progress=False)
            gguf_out = write_gguf_checkpoint(folder, tmp_path / "q.gguf", progress=False)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o755 and ((out / "config.json").stat().st_mode & 0o777) == 0o644
    assert (gguf_out.stat().st_mode & 0o777) == 0o644


def test_read_only_destination(folder32, tmp_path, capsys):
    """/proc is read-only even for root; a folder without write permission is, for anyone else."""
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    parents = [Path("/proc/self")] + ([tmp_path / "ro"] if not os.access(tmp_path / "ro", os.W_OK) else [])
    try:
        for parent in parents:
            for args in (["quantize", str(folder32), str(parent / "q")],
                         ["quantize", str(folder32), str(parent / "q.gguf"), "--gguf"]):
                assert main(args) == 2
                assert "cannot write the output" in capsys.readouterr().err
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_gguf_export_reads_back_or_refuses(folder32, tmp_path, capsys):
    folder = folder32
    (folder / "tokenizer.json").write_text(_word_tokenizer().to_str())
    assert main(["quantize", str(folder), str(tmp_path / "w.gguf"), "--gguf"]) == 2
    assert "not byte-level BPE; a GGUF cannot hold it" in capsys.readouterr().err
    assert not list(tmp_path.glob("*w.gguf*"))
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    bpe = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "c": 2}, merges=[]))  # a BPE vocabulary without merges
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    (folder / "tokenizer.json").write_text(bpe.to_str())
    assert main(["quantize", str(folder), str(tmp_path / "b.gguf"), "--gguf"]) == 0
    assert refqwen.load(tmp_path / "b.gguf", progress=False).tokenizer.encode("ab") == [0, 1]


def test_demo_assembly_cleans_up_and_follows_umask(tmp_path, monkeypatch):
    import hashlib

    from refqwen.checkpoint import demo

    parts = [tmp_path / "p1", tmp_path / "p2"]
    parts[0].write_bytes(b"GGUF")
    parts[1].write_bytes(b"rest")
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f".{demo.FILE_NAME}.partial-999999999-abc"  # left by a killed run (no such process)
    stale.write_bytes(b"half")
    monkeypatch.setenv("REFQWEN_CACHE", str(cache))
    monkeypatch.setattr(demo, "part_files", lambda: parts)
    monkeypatch.setattr(demo, "SIZE", 8)
    monkeypatch.setattr(demo, "SHA256", hashlib.sha256(b"GGUFrest").hexdigest())
    old = os.umask(0o022)
    try:
        path = demo.demo_path(progress=False)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"GGUFrest" and (path.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in cache.iterdir()) == [demo.FILE_NAME]


@pytest.mark.parametrize("key,value", [
    ("general.architecture", ["qwen2"]), ("general.architecture", 7), ("qwen2.block_count", "2"),
    ("qwen2.attention.head_count", [2, 2]), ("qwen2.embedding_length", 16.5), ("qwen2.context_length", -1),
    ("qwen2.attention.layer_norm_rms_epsilon", "tiny"), ("qwen2.rope.freq_base", [1.0]),
    ("tokenizer.ggml.model", 5), ("tokenizer.ggml.tokens", "abc"), ("tokenizer.ggml.merges", [1, 2]),
    ("tokenizer.ggml.eos_token_id", 10 ** 6), ("tokenizer.chat_template", [1]),
    ("tokenizer.ggml.merges", ["a c"]), ("tokenizer.ggml.merges", ["b a"]),  # the tokenizers library panics on these
])
def test_gguf_metadata_of_the_wrong_type(tmp_path, key, value):
    """Every header key refqwen reads, given a value of the wrong type or range: one RefqwenError."""
    import gguf

    path = tiny_gguf(tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
                 "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}, **{key: value})
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "qwen2")
    writer.kv_data[0].clear()  # drop the writer's own general.architecture; meta has it
    for k, v in meta.items():
        kind = (gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.ARRAY if isinstance(v, list)
                else gguf.GGUFValueType.FLOAT32 if isinstance(v, float) else gguf.GGUFValueType.INT64)
        sub = None
        if isinstance(v, list):
            sub = gguf.GGUFValueType.STRING if isinstance(v[0], str) else gguf.GGUFValueType.INT64 \
                if isinstance(v[0], int) else gguf.GGUFValueType.FLOAT32
        writer.add_key_value(k, v, kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_shape=tuple(reversed(t.shape.tolist())))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with time_limit(20), pytest.raises(RefqwenError):
        refqwen.load(tmp_path / "bad.gguf", progress=False)
