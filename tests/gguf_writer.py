"""Write refqwen weights as a float32 GGUF in llama.cpp's qwen2/qwen2moe layout (test helper)."""

import gguf
import numpy as np

from refqwen.gguf_checkpoint import GLOBAL_NAMES, LAYER_NAMES, STACKED_EXPERTS


def write_gguf(path, cfg, weights: dict) -> None:
    arch = "qwen2" if cfg.model_type == "qwen2" else "qwen2moe"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_scaling.factor)
        w.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position_embeddings)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
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
