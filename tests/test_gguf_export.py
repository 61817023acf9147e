"""GGUF export: Q8_0 tensors that the gguf package reads back exactly, and a header refqwen loads as the same model."""

import dataclasses

import gguf
import numpy as np
import pytest

import refqwen
from refqwen import RefqwenError
from refqwen.checkpoint.open import open_checkpoint
from refqwen.checkpoint.write_gguf import Q8_0, write_gguf_checkpoint


@pytest.fixture(scope="module", params=["dense-untied", "wide-moe"])
def source(request, tiny_hf, wide_source):
    return wide_source if request.param == "wide-moe" else tiny_hf(request.param)[1]


def expected_gguf_values(weights, name, shape):
    """What the writer stored for one HF tensor: Q8_0 of a projection/embedding, else the float32 values."""
    w = np.asarray(weights[name], np.float32)
    if len(shape) == 2 and not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
        return gguf.quants.dequantize(gguf.quants.quantize(w, Q8_0), Q8_0), Q8_0
    return w, gguf.GGMLQuantizationType.F32


def test_export_reads_back_with_the_same_values(source, tmp_path):
    out = write_gguf_checkpoint(source, tmp_path / "model.gguf", progress=False)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() in ("qwen2", "qwen2moe")
    stored = {t.name: t for t in reader.tensors}
    _, _, weights, _ = open_checkpoint(source, progress=False)
    _, _, exported, _ = open_checkpoint(out, progress=False)  # dequantized and renamed by refqwen's GGUF reader
    assert sorted(exported.shapes) == sorted(weights.shapes)
    for name, shape in weights.shapes.items():
        want, qtype = expected_gguf_values(weights, name, shape)
        np.testing.assert_array_equal(exported[name], want.reshape(shape), err_msg=name)
        if not (".experts." in name or name.endswith("shared_expert_gate.weight")):  # one GGUF tensor each
            w = np.asarray(weights[name])
            step = np.abs(w).max(axis=-1, keepdims=True) / 127
            # Q8_0 rounds to half a step, then stores the step as float16: |q| <= 127 times its rounding (2^-11)
            assert np.all(np.abs(want - w) <= (0.5 + 127 * 2.0 ** -11) * step * 1.001 + 1e-30), name
    assert {t.tensor_type for t in stored.values()} == {Q8_0, gguf.GGMLQuantizationType.F32}
    token_embd = stored["token_embd.weight"]
    np.testing.assert_array_equal(gguf.quants.dequantize(token_embd.data, token_embd.tensor_type),
                                  expected_gguf_values(weights, "model.embed_tokens.weight", (0, 0))[0])


def test_export_loads_as_the_same_qwen2_config(source, tmp_path, rng):
    out = write_gguf_checkpoint(source, tmp_path / "model.gguf", progress=False)
    loaded, original = refqwen.load(out, progress=False), refqwen.load(source, progress=False)
    # GGUF stores eps as float32, has no layer_types (all layers are full attention here), and names the
    # dense layers of an MoE model instead of decoder_sparse_step: the same layers, said another way
    assert loaded.config.sparse_layers == original.config.sparse_layers
    expected = dataclasses.replace(original.config, rms_norm_eps=float(np.float32(original.config.rms_norm_eps)),
                                   layer_types=None, decoder_sparse_step=loaded.config.decoder_sparse_step,
                                   mlp_only_layers=loaded.config.mlp_only_layers)
    assert dataclasses.replace(loaded.config, layer_types=None) == expected
    ids = rng.integers(0, 128, 24)
    a, b = loaded.forward(ids), original.forward(ids)
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.9  # Q8_0 moves logits a little, rarely the top token


def test_export_keeps_float_matrices_on_request(tiny_hf, tmp_path):
    out = write_gguf_checkpoint(tiny_hf("dense-untied")[1], tmp_path / "m.gguf", keep=("embed", "lm_head"),
                                progress=False)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == Q8_0


def test_export_refusals_leave_nothing_behind(tiny_hf, tmp_path):
    (tmp_path / "exists.gguf").write_text("keep me")
    with pytest.raises(RefqwenError, match="exists; refusing to overwrite"):
        write_gguf_checkpoint(tiny_hf("dense-untied")[1], tmp_path / "exists.gguf", progress=False)
    with pytest.raises(RefqwenError, match="must end in .gguf"):
        write_gguf_checkpoint(tiny_hf("dense-untied")[1], tmp_path / "model.bin", progress=False)
    with pytest.raises(RefqwenError, match=r"model.layers.1.mlp.shared_expert.down_proj.weight has 48 inputs, not a "
                                           r"multiple of Q8_0's block of 32"):
        write_gguf_checkpoint(tiny_hf("moe-step2-mlp-only")[1], tmp_path / "moe.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]
    assert (tmp_path / "exists.gguf").read_text() == "keep me"


def test_export_of_a_gguf_source_copies_its_tokenizer(tiny_hf, tmp_path):
    """A GGUF source (any type the gguf package dequantizes) round-trips, tokenizer keys included."""
    src = write_gguf_checkpoint(tiny_hf("dense-untied")[1], tmp_path / "a.gguf", progress=False)
    writer = gguf.GGUFWriter(str(tmp_path / "with-tokens.gguf"), "qwen2")
    reader = gguf.GGUFReader(src)
    for key, field in reader.fields.items():
        if not key.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(key, field.contents(), field.types[0],
                                 sub_type=field.types[1] if len(field.types) > 1 else None)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(["a", "b", "ab"] + [f"t{i}" for i in range(3, 128)])
    writer.add_token_types([1] * 128)
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(5)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = write_gguf_checkpoint(tmp_path / "with-tokens.gguf", tmp_path / "b.gguf", progress=False)
    fields = gguf.GGUFReader(out).fields
    assert fields["tokenizer.ggml.tokens"].contents()[:3] == ["a", "b", "ab"]
    assert refqwen.load(out, progress=False).tokenizer.encode("ab") == [2]
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 5


def test_a_quantized_gguf_is_a_source_too(tiny_hf, tmp_path):
    """GGUF input of a quantized type (Q8_0 here; the demo is Q4_K/Q5_0/Q6_K) quantizes like any other source."""
    import hashlib

    from safetensors import safe_open

    from refqwen.checkpoint.write_quantized import write_quantized_checkpoint

    src = write_gguf_checkpoint(tiny_hf("dense-untied")[1], tmp_path / "a.gguf", progress=False)
    out = write_quantized_checkpoint(src, tmp_path / "q", "int4-g32", progress=False)
    with safe_open(out / "model.safetensors", "np") as f:
        meta = f.metadata()
    assert meta["refqwen.source"] == str(src)
    assert meta["refqwen.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    from refqwen import quant

    _, _, stored, _ = open_checkpoint(out, progress=False)
    _, _, source, _ = open_checkpoint(src, progress=False)  # Q8_0, dequantized by the gguf package
    for name in ("model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        np.testing.assert_array_equal(stored[name].rows(), quant.quantize_scheme(source[name], "int4-g32").rows())


def test_truncated_gguf_source_is_refused(tiny_hf, tmp_path):
    src = write_gguf_checkpoint(tiny_hf("dense-untied")[1], tmp_path / "a.gguf", progress=False)
    data = src.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(refqwen.WeightsError, match="truncated"):
        write_gguf_checkpoint(tmp_path / "cut.gguf", tmp_path / "out.gguf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "cut.gguf"]
