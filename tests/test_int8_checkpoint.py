"""Pre-quantized int8 checkpoints: written once, loaded by every backend, refused when malformed."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import refqwen
from refqwen import RefqwenError, WeightsError
from refqwen.int8_checkpoint import write_int8_checkpoint


@pytest.fixture(scope="module")
def source(tiny_hf):
    return tiny_hf("moe-step2-mlp-only")[1]


@pytest.mark.parametrize("scheme,backend", [("int8-g32", "numba-int8"), ("int8-channel", "numba-int8-channel")])
def test_round_trip_equals_quantizing_on_load(scheme, backend, source, tmp_path, rng):
    out = write_int8_checkpoint(source, tmp_path / "q", scheme, progress=False)
    loaded = refqwen.load(out, backend=backend, progress=False)
    on_load = refqwen.load(source, backend=backend, progress=False)
    ids = rng.integers(0, 128, 40)
    np.testing.assert_array_equal(loaded.forward(ids), on_load.forward(ids))  # prefill path
    cache_a, cache_b = loaded.new_cache(), on_load.new_cache()
    for t in ids[:5]:  # decode path
        np.testing.assert_array_equal(loaded.forward([t], cache_a), on_load.forward([t], cache_b))
    # the reference dequantizes the same integers
    reference = refqwen.load(out, progress=False)
    np.testing.assert_array_equal(reference.forward(ids), loaded.forward(ids))


def test_format_on_disk(source, tmp_path):
    out = write_int8_checkpoint(source, tmp_path / "q", "int8-g32", progress=False)
    tensors = load_file(out / "model.safetensors")
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    scales = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert q.dtype == np.int8 and q.shape == (64, 64) and scales.shape == (64, 2) and scales.dtype == np.float32
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32  # the router stays float
    assert tensors["model.norm.weight"].dtype == np.float32
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2MoeForCausalLM"]


def test_refusals_leave_nothing_behind(source, tmp_path, monkeypatch):
    (tmp_path / "exists").mkdir()
    with pytest.raises(RefqwenError, match="exists; refusing to overwrite"):
        write_int8_checkpoint(source, tmp_path / "exists", progress=False)
    with pytest.raises(RefqwenError, match="unknown quantization scheme 'int3'"):
        write_int8_checkpoint(source, tmp_path / "q", "int3", progress=False)

    import refqwen.int8_checkpoint as module

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        write_int8_checkpoint(source, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


@pytest.fixture
def quantized(source, tmp_path):
    return write_int8_checkpoint(source, tmp_path / "q", "int8-g32", progress=False)


def edit(folder, change, metadata=None):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "np") as f:
        metadata = metadata if metadata is not None else f.metadata()
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata=metadata)


def test_missing_scales(quantized):
    edit(quantized, lambda t: t.pop("model.layers.2.mlp.up_proj.weight_scale"))
    with pytest.raises(WeightsError, match=r"int8 tensor model.layers.2.mlp.up_proj.weight has no scales"):
        refqwen.load(quantized, backend="numba-int8", progress=False)


def test_scales_of_the_wrong_shape(quantized):
    edit(quantized, lambda t: t.update({"model.layers.0.mlp.down_proj.weight_scale": np.ones((64, 2), np.float32)}))
    with pytest.raises(WeightsError, match=r"scales of model.layers.0.mlp.down_proj.weight have shape \(64, 2\); "
                                           r"expected \(64,\) per channel or \(64, 3\) for groups of 32 over 96"):
        refqwen.load(quantized, progress=False)


def test_unknown_scheme_in_metadata(quantized):
    edit(quantized, lambda t: None, metadata={"refqwen.quantization": "int4-g128"})
    with pytest.raises(WeightsError, match="quantization scheme 'int4-g128'"):
        refqwen.load(quantized, progress=False)
