"""Write refqwen weights as a float32 GGUF in llama.cpp's qwen2/qwen2moe layout (test helper)."""

import gguf
import numpy as np

from refqwen.checkpoint.gguf import GLOBAL_NAMES, LAYER_NAMES, STACKED_EXPERTS
from refqwen.checkpoint.write_gguf import add_hparams


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
