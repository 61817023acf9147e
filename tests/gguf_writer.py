"""GGUF files for tests: refqwen weights written as a float32 GGUF in llama.cpp's qwen2/qwen2moe layout,
and a copy of a GGUF without its vocabulary."""

import struct
from pathlib import Path

import gguf
import numpy as np

from refqwen.checkpoint.gguf import GLOBAL_NAMES, LAYER_NAMES, STACKED_EXPERTS
from refqwen.checkpoint.gguf_header import _tensor_info, _Walk
from refqwen.checkpoint.write_gguf import add_hparams

VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                   "tokenizer.ggml.scores")


def write_gguf(path, cfg, weights: dict) -> None:
    arch = "qwen2" if cfg.model_type == "qwen2" else "qwen2moe"
    w = gguf.GGUFWriter(str(path), arch)
    add_hparams(w, cfg)
    for name, tensor in _gguf_tensors(cfg, weights).items():
        w.add_tensor(name, np.ascontiguousarray(tensor, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_tensors(cfg, weights):
    to_gguf = {hf: g for g, hf in GLOBAL_NAMES.items()}
    out = {}
    for name, tensor in weights.items():
        if name in to_gguf:
            out[to_gguf[name]] = tensor
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if ".experts." in rest:
            continue  # stacked below
        if rest == "mlp.shared_expert_gate.weight":
            tensor = tensor.reshape(-1)  # llama.cpp keeps this gate as a vector
        out[f"blk.{layer}.{next(g for g, h in LAYER_NAMES.items() if h == rest)}"] = tensor
    for i in cfg.sparse_layers:
        for g, proj in STACKED_EXPERTS.items():
            out[f"blk.{i}.{g}"] = np.stack([weights[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"]
                                            for e in range(cfg.num_experts)])  # [E, out, in]
    return out


def without_vocabulary(src: Path, dst: Path) -> None:
    """Copy the GGUF file src to dst byte for byte, less the vocabulary arrays (VOCABULARY_KEYS): every
    other key and every tensor as they were. transformers parses a GGUF's header twice to load a model,
    and the demo's 151,936 tokens and as many merges are 40 s of its 63."""
    data = Path(src).read_bytes()
    w = _Walk(data, src)
    w.pos = 4
    version, n_tensors, n_keys = w.take("<I"), w.take("<Q"), w.take("<Q")
    kept, alignment = [], gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_keys):
        start = w.pos
        key = w.string("a key name")
        value, _ = w.value(w.take("<I"), key)
        alignment = value if key == gguf.Keys.General.ALIGNMENT else alignment
        if key not in VOCABULARY_KEYS:
            kept.append(data[start:w.pos])
    infos = w.pos
    for _ in range(n_tensors):
        _tensor_info(w)  # offsets are relative to the data section: they stay as they are
    data_start = -(-w.pos // alignment) * alignment
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kept)) + b"".join(kept) + data[infos:w.pos]
    Path(dst).write_bytes(head + b"\0" * (-len(head) % alignment) + data[data_start:])
