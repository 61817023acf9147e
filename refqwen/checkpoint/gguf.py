"""Load a GGUF file (llama.cpp's format) with the `gguf` package: read its qwen2/qwen2moe
header into a Config, dequantize every tensor to float32 and rename it to the Hugging Face
name the model code uses.

GGUF lists dimensions innermost first (ggml order); NumPy order is the reverse, so a
Linear weight of ggml shape [in, out] arrives as the familiar [out, in].
"""

import re
from functools import lru_cache, partial
from pathlib import Path

import gguf
import numpy as np

from refqwen.checkpoint import gguf_header
from refqwen.checkpoint.gguf_header import GGUFTensor
from refqwen.checkpoint.weights import LazyWeights, check_finite, check_shapes
from refqwen.errors import RefqwenError, WeightsError
from refqwen.model.config import LIMITS, Config
from refqwen.tokenizer import Tokenizer

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # MoE router
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
# MoE experts are stored stacked, [E, out, in]; we split them into one tensor per expert.
STACKED_EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                   "ffn_down_exps.weight": "down_proj"}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
ROWS_PER_CHUNK = 8192  # dequantize this many rows at a time to bound temporary memory


def open_gguf(path) -> gguf_header.GGUFHeader:
    """The key/values and tensor table of a GGUF file, read by a walk that checks every count it declares
    against the file first (refqwen/checkpoint/gguf_header.py)."""
    try:
        return gguf_header.read_header(Path(path))
    except WeightsError:
        raise
    except RefqwenError as e:  # not a regular file, ...
        raise WeightsError(str(e)) from None


def load_gguf(path) -> tuple[Config, LazyWeights, Tokenizer | None]:
    """Config, float32 weights under Hugging Face names (dequantized on demand), and the tokenizer."""
    cfg, tensors, meta = read_gguf_header(path)
    tokenizer = Tokenizer.from_gguf_metadata(meta, str(path))
    readers, shapes = {}, {}
    for t in tensors:
        for name, shape, read in _hf_views(t, path):
            readers[name], shapes[name] = read, shape
    check_shapes(shapes, cfg, source=str(path))
    return cfg, LazyWeights(readers, shapes), tokenizer


def read_gguf_header(path) -> tuple[Config, list[GGUFTensor], dict]:
    """The Config, where each tensor lies, and all key/values (read and checked by gguf_header)."""
    header = open_gguf(path)
    tensors, meta = header.tensors, header.meta
    by_name = {t.name: t for t in tensors}
    if "token_embd.weight" not in by_name:
        raise WeightsError(f"{path}: missing tensor token_embd.weight")
    n_layers = max((_layer_index(n, path) + 1 for n in by_name if n.startswith("blk.")), default=0)
    dense = tuple(i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in by_name)
    vocab_size = by_name["token_embd.weight"].shape[0]
    cfg = Config.from_gguf_metadata(meta, vocab_size, "output.weight" in by_name, dense, str(path))
    size = Path(path).stat().st_size
    for t in tensors:
        if t.offset + t.n_bytes > size:
            raise WeightsError(f"{path}: truncated GGUF file: tensor {t.name} ends at byte {t.offset + t.n_bytes}, "
                               f"file has {size}")
    return cfg, tensors, meta


def _layer_index(name: str, path) -> int:
    """N of a `blk.N.` tensor name, checked before anything loops over layers."""
    m = re.match(r"blk\.(\d{1,9})\.", name)
    if not m or int(m.group(1)) >= LIMITS["num_hidden_layers"]:
        raise WeightsError(f"{path}: tensor {name}: expected blk.N. with a layer index N below "
                           f"{LIMITS['num_hidden_layers']}")
    return int(m.group(1))


def dequantize(path, t: GGUFTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Read one tensor (or its rows start..stop-1) of any type the gguf package knows and widen it
    to float32, chunk by chunk, so temporary memory stays small even for the 151936-row embedding."""
    try:
        row_bytes = gguf.quants.quant_shape_to_byte_shape(t.shape, t.qtype)[-1]
    except (KeyError, ValueError) as e:
        raise WeightsError(f"{path}: tensor {t.name} has unsupported type {t.qtype.name} ({e})") from None
    n_rows = t.n_bytes // row_bytes
    start, stop, _ = slice(start, stop).indices(n_rows)
    with open(path, "rb") as f:
        f.seek(t.offset + start * row_bytes)
        raw = np.fromfile(f, dtype=np.uint8, count=(stop - start) * row_bytes).reshape(-1, row_bytes)  # [R, bytes]
    shape = t.shape if (start, stop) == (0, n_rows) else (stop - start, t.shape[-1])
    out = np.empty(shape, np.float32)
    rows_out = out.reshape(-1, t.shape[-1])  # [R, cols]
    try:
        for r0 in range(0, raw.shape[0], ROWS_PER_CHUNK):
            chunk = gguf.quants.dequantize(raw[r0:r0 + ROWS_PER_CHUNK], t.qtype)
            rows_out[r0:r0 + ROWS_PER_CHUNK] = chunk.reshape(-1, t.shape[-1])
    except NotImplementedError:
        raise WeightsError(f"{path}: tensor {t.name} has type {t.qtype.name}, "
                           f"which the gguf package cannot dequantize") from None
    return check_finite(out, t.name, path)


class GGUFMatrix:
    """A 2-D GGUF tensor that dequantizes only the rows asked for: `w[a:b]` reads rows a..b-1,
    `np.asarray(w)` the whole matrix. A backend that quantizes the 151936-row embedding slice by
    slice then never holds it in float32."""

    def __init__(self, path, t: GGUFTensor):
        self.path, self.t = path, t
        self.shape, self.ndim, self.dtype = t.shape, 2, np.dtype(np.float32)

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            return np.asarray(self)[rows]
        return dequantize(self.path, self.t, rows.start or 0, rows.stop)

    def __array__(self, dtype=None, copy=None):
        full = dequantize(self.path, self.t)
        return full if dtype is None else full.astype(dtype)


@lru_cache(maxsize=3)  # a layer's gate, up and down stacks, while its experts are read one by one
def _dequantize_stack(path, t: GGUFTensor) -> np.ndarray:
    return dequantize(path, t)


def _hf_views(t: GGUFTensor, path):
    """(Hugging Face name, shape, reader) for the tensor or tensors one GGUF tensor holds."""
    if t.name in GLOBAL_NAMES:  # embedding and lm_head are read lazily, row slice by row slice
        read = partial(GGUFMatrix, path, t) if len(t.shape) == 2 else partial(dequantize, path, t)
        return [(GLOBAL_NAMES[t.name], t.shape, read)]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
    if m and m.group(2) == "ffn_gate_inp_shexp.weight":  # llama.cpp keeps this [1, C] gate as a vector
        shape = (1, int(np.prod(t.shape)))
        return [(f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}", shape,
                 lambda: dequantize(path, t).reshape(shape))]
    if m and m.group(2) in LAYER_NAMES:
        return [(f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}", t.shape, partial(dequantize, path, t))]
    if m and m.group(2) in STACKED_EXPERTS:  # [E, out, in]: one tensor per expert
        prefix = f"model.layers.{m.group(1)}.mlp.experts"
        return [(f"{prefix}.{e}.{STACKED_EXPERTS[m.group(2)]}.weight", t.shape[1:],
                 partial(lambda e: _dequantize_stack(path, t)[e], e)) for e in range(t.shape[0])]
    return [(t.name, t.shape, partial(dequantize, path, t))]  # unknown: the shape check reports it
