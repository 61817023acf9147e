"""Pre-quantized checkpoints (int8 and int4): written once, loaded by every backend, refused when malformed."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refqwen
from refqwen import RefqwenError, WeightsError, quant
from refqwen.backends.numba_int8 import NumbaInt4Backend
from refqwen.checkpoint.open import open_checkpoint
from refqwen.checkpoint.write_quantized import write_quantized_checkpoint
from refqwen.model import Model
from refqwen.model.attention import causal_attention
from refqwen.model.linear import linear
from refqwen.model.mlp import swiglu
from refqwen.model.norm import rms_norm

BACKEND_OF = {"int8-g32": "numba-int8", "int8-channel": "numba-int8-channel", "int4-g32": "numba-int4",
              "int4-g128": "numba-int4"}


@pytest.fixture(scope="module")
def source(wide_source):
    return wide_source


@pytest.fixture(scope="module")
def misaligned(tiny_hf):
    return tiny_hf("moe-step2-mlp-only")[1]  # the shared expert's down_proj has 48 inputs


def on_load_model(source, scheme):
    """The source quantized in memory by the Numba backend at load time."""
    ops = NumbaInt4Backend()
    ops.layout = scheme
    _, cfg, weights, _ = open_checkpoint(source, progress=False)
    return Model(cfg, weights, backend=ops)


@pytest.mark.parametrize("scheme", list(quant.SCHEMES))
def test_round_trip_equals_quantizing_on_load(scheme, source, tmp_path, rng):
    out = write_quantized_checkpoint(source, tmp_path / "q", scheme, progress=False)
    _, _, stored, _ = open_checkpoint(out, progress=False)
    _, _, floats, _ = open_checkpoint(source, progress=False)
    for name in ("model.layers.1.mlp.experts.2.down_proj.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert type(stored[name]) is type(quant.quantize_scheme(floats[name], scheme))
        np.testing.assert_array_equal(stored[name].rows(), quant.quantize_scheme(floats[name], scheme).rows())
    loaded = refqwen.load(out, backend=BACKEND_OF[scheme], progress=False)
    on_load = on_load_model(source, scheme)
    ids = rng.integers(0, 128, 40)
    np.testing.assert_array_equal(loaded.forward(ids), on_load.forward(ids))  # prefill path
    cache_a, cache_b = loaded.new_cache(), on_load.new_cache()
    for t in ids[:5]:  # decode path
        np.testing.assert_array_equal(loaded.forward([t], cache_a), on_load.forward([t], cache_b))
    reference = refqwen.load(out, progress=False)  # the reference dequantizes the same integers
    # bit for bit once both multiply, attend, normalize and gate the same way: the Numba backend's matrix
    # products, attention and RMSNorm sum in other orders and its SwiGLU has its own exp (each is checked
    # against the reference in tests/test_backends.py); here the same integers go through the reference's
    # own arithmetic
    loaded.ops.attention, loaded.ops.swiglu, loaded.ops.rms_norm = causal_attention, swiglu, rms_norm
    loaded.ops.linear = lambda x, weight, bias=None: linear(x, weight.rows(), bias)
    np.testing.assert_array_equal(reference.forward(ids), loaded.forward(ids))


def test_format_on_disk(source, tmp_path):
    out = write_quantized_checkpoint(source, tmp_path / "q", "int4-g32", keep=("embed",), progress=False)
    tensors = load_file(out / "model.safetensors")
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    scales = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    zeros = tensors["model.layers.0.self_attn.q_proj.weight_zero"]
    assert q.dtype == np.uint8 and q.shape == (128, 64)
    assert scales.shape == zeros.shape == (128, 4) and scales.dtype == np.float32 and zeros.dtype == np.uint8
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32  # the router stays float
    assert tensors["model.norm.weight"].dtype == np.float32
    assert tensors["model.embed_tokens.weight"].dtype == np.float32  # kept
    assert tensors["lm_head.weight"].dtype == np.uint8
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "np") as f:
        meta = f.metadata()
    assert meta["refqwen.quantization"] == "int4-g32" and meta["refqwen.group_size"] == "32"
    assert meta["refqwen.keep"] == "embed" and len(meta["refqwen.source_sha256"]) == 64


def test_sharded_output_loads_the_same(source, tmp_path, rng):
    one = write_quantized_checkpoint(source, tmp_path / "one", "int8-g32", progress=False)
    many = write_quantized_checkpoint(source, tmp_path / "many", "int8-g32", progress=False, shard_bytes=50_000)
    index = json.loads((many / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (many / "model.safetensors").exists() and not list(many.glob("*.tmp"))
    ids = rng.integers(0, 128, 20)
    a, b = (refqwen.load(p, backend="numba-int8", progress=False) for p in (one, many))
    np.testing.assert_array_equal(a.forward(ids), b.forward(ids))


def test_refusals_leave_nothing_behind(source, misaligned, tmp_path, monkeypatch):
    (tmp_path / "exists").mkdir()
    with pytest.raises(RefqwenError, match="exists; refusing to overwrite"):
        write_quantized_checkpoint(source, tmp_path / "exists", progress=False)
    with pytest.raises(RefqwenError, match="unknown quantization scheme 'int3'"):
        write_quantized_checkpoint(source, tmp_path / "q", "int3", progress=False)
    with pytest.raises(RefqwenError, match="--keep: unknown norm"):
        write_quantized_checkpoint(source, tmp_path / "q", keep=("norm",), progress=False)
    with pytest.raises(RefqwenError, match=r"int4-g32: model.layers.1.mlp.shared_expert.down_proj.weight: input size "
                                           r"48 is not a multiple of the group size 32; schemes that fit it: "
                                           r"int8-channel, int8-g32; nothing was written"):
        write_quantized_checkpoint(misaligned, tmp_path / "q", "int4-g32", progress=False)
    with pytest.raises(RefqwenError, match="no such file"):
        write_quantized_checkpoint(tmp_path / "missing", tmp_path / "q", progress=False)

    import refqwen.checkpoint.write_quantized as module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", fail)
    with pytest.raises(RefqwenError, match="cannot write the output: disk full; nothing was written"):
        write_quantized_checkpoint(source, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_truncated_source_is_refused(source, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((source / "config.json").read_text())
    data = (source / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated safetensors file"):
        write_quantized_checkpoint(broken, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.parametrize("scheme, backend, runs", [("int4-g128", "numba-w8a8", "int8-g32"),
                                                   ("int8-channel", "numba-w4a8", "int4-g32, int4-g128, int8-g32")])
def test_checkpoint_of_another_scheme_refused(source, tmp_path, scheme, backend, runs):
    out = write_quantized_checkpoint(source, tmp_path / "q", scheme, progress=False)
    with pytest.raises(WeightsError, match=rf"embed_tokens.weight is {scheme}; backend {backend} runs {runs}"):
        refqwen.load(out, backend=backend, progress=False)


@pytest.fixture(params=["int8-g32", "int4-g32"])
def quantized(request, source, tmp_path):
    return write_quantized_checkpoint(source, tmp_path / "q", request.param, progress=False)


def edit(folder, change, metadata=None):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "np") as f:
        metadata = dict(f.metadata(), **(metadata or {}))
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata=metadata)


def test_missing_scales(quantized):
    edit(quantized, lambda t: t.pop("model.layers.0.mlp.up_proj.weight_scale"))
    with pytest.raises(WeightsError, match=r"int[48] tensor model.layers.0.mlp.up_proj.weight has no scales"):
        refqwen.load(quantized, backend="numba-int8", progress=False)


def test_scales_of_the_wrong_shape(quantized):
    edit(quantized, lambda t: t.update({"model.layers.0.mlp.down_proj.weight_scale": np.ones((128, 3), np.float32)}))
    with pytest.raises(WeightsError, match=r"model.layers.0.mlp.down_proj.weight_?s?c?a?l?e? .*shape \(128, 3\); "
                                           r"expected .*\(128, 8\) for groups of 32 over 256"):
        refqwen.load(quantized, progress=False)


def test_missing_zero_points(source, tmp_path):
    out = write_quantized_checkpoint(source, tmp_path / "q", "int4-g128", progress=False)
    edit(out, lambda t: t.pop("lm_head.weight_zero"))
    with pytest.raises(WeightsError, match=r"int4 tensor lm_head.weight has no zero points"):
        refqwen.load(out, progress=False)


def test_group_size_that_does_not_divide(source, tmp_path):
    out = write_quantized_checkpoint(source, tmp_path / "q", "int4-g32", progress=False)
    odd = np.zeros((128, 40), np.uint8)  # 80 inputs instead of 128

    def change(t):
        t["model.layers.0.self_attn.q_proj.weight"] = odd
    edit(out, change)
    with pytest.raises(WeightsError, match=r"q_proj.weight has 80 inputs, which groups of 32 \(int4-g32\) do not"):
        refqwen.load(out, progress=False)


def test_unknown_scheme_in_metadata(quantized):
    edit(quantized, lambda t: None, metadata={"refqwen.quantization": "int3-g7"})
    with pytest.raises(WeightsError, match="quantization scheme 'int3-g7'"):
        refqwen.load(quantized, progress=False)


def test_metadata_that_contradicts_the_tensors(quantized):
    edit(quantized, lambda t: None, metadata={"refqwen.group_size": "64"})
    with pytest.raises(WeightsError, match="refqwen.group_size=64"):
        refqwen.load(quantized, progress=False)


@pytest.fixture
def with_tokenizer(tiny_hf, tmp_path):
    """The dense tiny model with a word-level tokenizer (most corpus words are [UNK]: enough to run a report)."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "src"
    shutil.copytree(tiny_hf("dense-untied")[1], folder)
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["def", "return", "self", "import", "(", ")", ":"])}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def test_cli_quantize_with_report(with_tokenizer, tmp_path, capsys):
    from refqwen.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(with_tokenizer), str(out), "--scheme", "int4-g32", "--keep", "embed",
                 "--report", "--report-tokens", "96", "--window", "32"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "perplexity quantized" in printed and "peak memory" in printed
    report = json.loads((out / "quality_report.json").read_text())
    assert report["scheme"] == "int4-g32" and report["tokens"] == 93  # 3 windows of 32, the first token unscored
    assert 0 <= report["top1_agreement"] <= 1 and 0 <= report["mean_kl"] <= report["max_kl"]
    assert report["ppl_relative_diff"] == pytest.approx(report["ppl_candidate"] / report["ppl_reference"] - 1)
    assert refqwen.load(out, backend="numba-int8", progress=False).config.hidden_size == 64


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int4-g32", "--gguf"], "--gguf writes Q8_0, the GGUF form of int8-g32; got --scheme int4-g32"),
    (["--keep", "embed,norms"], "--keep: unknown norms; expected a comma-separated subset of embed, lm_head"),
    (["--shard-mib", "0"], "--shard-mib: expected a positive size"),
])
def test_cli_quantize_errors(args, message, with_tokenizer, tmp_path, capsys):
    from refqwen.cli import main

    assert main(["quantize", str(with_tokenizer), str(tmp_path / "q"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_cli_refuses_an_existing_output_without_force(with_tokenizer, tmp_path, capsys):
    from refqwen.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(with_tokenizer), str(out)]) == 0
    assert main(["quantize", str(with_tokenizer), str(out), "--scheme", "int4-g32"]) == 2
    assert "exists; refusing to overwrite it" in capsys.readouterr().err
    assert main(["quantize", str(with_tokenizer), str(out), "--scheme", "int4-g32", "--force"]) == 0
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == np.uint8
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
