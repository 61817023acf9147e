"""Every kind of broken checkpoint gets an error that names the file and tensor at fault."""

import json
import shutil

import numpy as np
import pytest
from gguf_writer import write_gguf
from oracle import random_weights, tiny_config
from safetensors.numpy import load_file, save_file

import refqwen
from refqwen import ConfigError, RefqwenError, WeightsError


@pytest.fixture
def folder(tiny_hf, tmp_path):
    """A writable copy of a tiny untied dense checkpoint."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_hf("dense-untied")[1], dst)
    return dst


def rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_truncated_safetensors(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"model.safetensors: truncated safetensors file: tensor .* ends at byte"):
        refqwen.load(folder, progress=False)


def test_wrong_shape(folder):
    rewrite(folder, lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(WeightsError, match=r"tensor model.layers.1.self_attn.k_proj.weight has shape \(64, 64\), "
                                           r"expected \(32, 64\)"):
        refqwen.load(folder, progress=False)


def test_missing_tensor(folder):
    rewrite(folder, lambda t: t.pop("model.layers.2.self_attn.q_proj.bias"))
    with pytest.raises(WeightsError, match=r"missing tensor model.layers.2.self_attn.q_proj.bias \(expected shape"):
        refqwen.load(folder, progress=False)


def test_extra_tensor(folder):
    rewrite(folder, lambda t: t.update({"model.layers.9.mystery": np.zeros(3, np.float32)}))
    with pytest.raises(WeightsError, match=r"unexpected tensor model.layers.9.mystery"):
        refqwen.load(folder, progress=False)


def test_tied_checkpoint_without_lm_head_loads(tiny_hf, tmp_path):
    shutil.copytree(tiny_hf("dense-tied")[1], tmp_path / "m")
    rewrite(tmp_path / "m", lambda t: t.pop("lm_head.weight", None))
    model = refqwen.load(tmp_path / "m", progress=False)
    assert model.lm_head is model.embed_tokens


def test_unknown_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, architectures=["MistralForCausalLM"])))
    with pytest.raises(ConfigError, match=r"config.json: architecture \['MistralForCausalLM'\] is not supported"):
        refqwen.load(folder, progress=False)


def test_no_weights(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors or model.safetensors.index.json"):
        refqwen.load(folder, progress=False)


@pytest.fixture
def gguf_file(tmp_path):
    cfg = tiny_config("dense-untied")
    write_gguf(tmp_path / "tiny.gguf", cfg, random_weights(cfg))
    return tmp_path / "tiny.gguf"


def test_corrupt_gguf(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    data[:4] = b"NOPE"
    gguf_file.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"tiny.gguf: not a readable GGUF file"):
        refqwen.load(gguf_file, progress=False)


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.99])
def test_truncated_gguf(gguf_file, fraction):
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(WeightsError, match=r"tiny.gguf: "):
        refqwen.load(gguf_file, progress=False)


def test_not_a_model(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(RefqwenError, match="not a model"):
        refqwen.load(tmp_path / "weights.bin")


def test_unknown_backend(folder):
    with pytest.raises(RefqwenError, match=r"unknown backend 'fast'; available: numpy"):
        refqwen.load(folder, backend="fast")


def test_bad_token_ids_and_context(folder):
    model = refqwen.load(folder, progress=False)
    with pytest.raises(RefqwenError, match=r"token id 128 is outside the vocabulary \[0, 128\)"):
        model.forward([1, 128])
    with pytest.raises(RefqwenError, match="513 new tokens need 513 positions; the context window holds 512: turn on"):
        model.forward(np.zeros(513, int))
