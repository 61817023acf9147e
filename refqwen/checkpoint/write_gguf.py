"""Export a checkpoint as a GGUF that llama.cpp runs: projection and embedding matrices Q8_0
(int8 in blocks of 32 with a float16 scale, the GGUF form of int8-g32), norms, biases and the
MoE router F32, under llama.cpp's qwen2 / qwen2moe tensor names and header keys.

Tensors are streamed: the header and the table of tensors are written from the shapes alone,
then each tensor is read, quantized and appended, so memory holds one tensor (one layer's
stack of experts) at a time. The file is written under a temporary name and renamed at the end.
"""

import json
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from refqwen.checkpoint.gguf import GLOBAL_NAMES, LAYER_NAMES, STACKED_EXPERTS, open_gguf
from refqwen.checkpoint.open import open_checkpoint
from refqwen.checkpoint.quantized import is_quantized_name, kept_names
from refqwen.errors import RefqwenError
from refqwen.files import atomic_output_file

Q8_0 = gguf.GGMLQuantizationType.Q8_0
BLOCK = 32  # values per Q8_0 block, along a row
TO_GGUF_LAYER = {hf: g for g, hf in LAYER_NAMES.items()}
TO_GGUF_GLOBAL = {hf: g for g, hf in GLOBAL_NAMES.items()}


def write_gguf_checkpoint(source, out, keep=(), force: bool = False, progress: bool = True) -> Path:
    """Quantize `source` (folder, .gguf or "demo") into the Q8_0 GGUF file `out`."""
    out = Path(out)
    if out.suffix != ".gguf":
        raise RefqwenError(f"--gguf: the output {out} must end in .gguf")
    if out.exists() and not force:
        raise RefqwenError(f"{out} exists; refusing to overwrite it (pass force=True / --force)")
    floats = kept_names(keep)
    path, cfg, weights, tokenizer = open_checkpoint(source, progress)
    layout = gguf_layout(cfg, weights.shapes)
    check_q8_alignment(layout, weights.shapes, floats)
    with atomic_output_file(out) as tmp:
        _write_file(str(tmp), cfg, path, tokenizer, layout, weights, floats, progress)
    return out


def _write_file(tmp, cfg, path, tokenizer, layout, weights, floats, progress) -> None:
    writer = gguf.GGUFWriter(tmp, "qwen2" if cfg.model_type == "qwen2" else "qwen2moe")
    add_hparams(writer, cfg)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, path, tokenizer, cfg.vocab_size)
    for name, sources in layout:
        add_info(writer, name, sources, weights.shapes, floats)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, sources in tqdm(layout, desc="writing Q8_0 GGUF", unit="tensor", disable=not progress):
        writer.write_tensor_data(encode(name, sources, weights, floats))
    writer.close()


def gguf_layout(cfg, shapes: dict) -> list[tuple[str, list[str]]]:
    """(GGUF name, the Hugging Face tensors it holds) in file order; MoE experts become one stack [E, out, in]."""
    layout = []
    for name in shapes:
        if name in TO_GGUF_GLOBAL:
            layout.append((TO_GGUF_GLOBAL[name], [name]))
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        if ".experts." not in rest:
            layout.append((f"blk.{layer}.{TO_GGUF_LAYER[rest]}", [name]))
    for i in cfg.sparse_layers:
        for g, proj in STACKED_EXPERTS.items():
            layout.append((f"blk.{i}.{g}", [f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"
                                            for e in range(cfg.num_experts)]))
    return layout


def is_q8(hf_name: str, shape, floats) -> bool:
    return is_quantized_name(hf_name, shape) and hf_name not in floats


def check_q8_alignment(layout, shapes, floats) -> None:
    for _, sources in layout:
        shape = shapes[sources[0]]
        if is_q8(sources[0], shape, floats) and shape[1] % BLOCK:
            raise RefqwenError(f"--gguf: {sources[0]} has {shape[1]} inputs, not a multiple of Q8_0's block of "
                               f"{BLOCK}; export it as a refqwen folder (int8-g32 allows a shorter last group) "
                               f"instead; nothing was written")


def add_info(writer, name, sources, shapes, floats) -> None:
    shape = tuple(shapes[sources[0]])
    if name.endswith("ffn_gate_inp_shexp.weight"):
        shape = (int(np.prod(shape)),)  # llama.cpp keeps this [1, C] gate as a vector
    full = (len(sources), *shape) if len(sources) > 1 else shape
    if is_q8(sources[0], shape, floats):
        byte_shape = gguf.quants.quant_shape_to_byte_shape(full, Q8_0)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=Q8_0)
    else:
        writer.add_tensor_info(name, full, np.dtype(np.float32), int(np.prod(full)) * 4)


def encode(name, sources, weights, floats) -> np.ndarray:
    """The bytes of one GGUF tensor: Q8_0 blocks of each [out, in] matrix (stacked for experts), or float32."""
    parts = []
    for hf in sources:
        w = np.asarray(weights[hf], np.float32)
        parts.append(gguf.quants.quantize(w, Q8_0) if is_q8(hf, w.shape, floats) else w)
    data = np.stack(parts) if len(parts) > 1 else parts[0]
    return data.reshape(-1) if name.endswith("ffn_gate_inp_shexp.weight") else np.ascontiguousarray(data)


def add_hparams(writer: gguf.GGUFWriter, cfg) -> None:
    """The qwen2 / qwen2moe header keys that Config.from_gguf_metadata reads back."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_scaling.original_max_position_embeddings)
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def add_tokenizer(writer: gguf.GGUFWriter, path: Path, tokenizer, vocab_size: int) -> None:
    """The source's tokenizer.* keys: copied from a GGUF source, rebuilt from a tokenizer.json folder."""
    if path.suffix == ".gguf":
        header = open_gguf(path)
        for key, value in header.meta.items():
            if key.startswith("tokenizer."):
                kind, item = header.types[key]
                writer.add_key_value(key, value, kind, sub_type=item)
        return
    if tokenizer is None:
        return
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = [f"[PAD{i}]" for i in range(max(vocab_size, max(vocab.values()) + 1))]
    for token, i in vocab.items():
        tokens[i] = token
    special = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    model = json.loads(tokenizer.backend.to_str())["model"]
    if model.get("type") != "BPE":  # GGUF's gpt2 tokenizer is byte-level BPE: anything else would not read back
        raise RefqwenError(f"{path}: the tokenizer is {model.get('type')}, not byte-level BPE; a GGUF cannot hold "
                           f"it (nothing was written)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else
                            gguf.TokenType.UNUSED if t.startswith("[PAD") and t not in vocab else
                            gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    for name, add in (("eos_token", writer.add_eos_token_id), ("bos_token", writer.add_bos_token_id),
                      ("pad_token", writer.add_pad_token_id)):
        if tokenizer.special_tokens.get(name) in vocab:
            add(vocab[tokenizer.special_tokens[name]])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
