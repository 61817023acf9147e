"""Load a Hugging Face model folder: config.json plus safetensors weights (one file or shards).

Float32 tensors are memory-mapped straight from the file (no copy in RAM until touched,
and then only the page cache); float16 and bfloat16 tensors are widened to float32 one
tensor at a time. The `safetensors` package reads into fresh arrays and has no NumPy
bfloat16, so we read its simple layout directly: an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw data.
"""

import json
import struct
from functools import partial
from pathlib import Path

import numpy as np

from refqwen.checkpoint.quantized import quantized_readers
from refqwen.checkpoint.weights import LazyWeights, check_shapes
from refqwen.errors import WeightsError
from refqwen.model.config import Config
from refqwen.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # BF16 read as raw 16-bit words
          "I8": np.int8, "U8": np.uint8}  # quantized checkpoints (refqwen/checkpoint/quantized.py)


def load_hf_folder(folder) -> tuple[Config, LazyWeights, Tokenizer | None]:
    """Config, float32 weights (read on demand), and the tokenizer if the folder has a tokenizer.json."""
    folder = Path(folder)
    cfg = Config.from_hf_file(folder / "config.json")
    tokenizer = Tokenizer.from_hf_folder(folder, cfg.eos_token_ids + _generation_eos(folder))
    readers, shapes = {}, {}
    for file in _weight_files(folder):
        header, metadata = read_header(file)  # {name: (dtype, shape, start, end)}, {key: str}
        raw = np.memmap(file, dtype=np.uint8, mode="r")

        def read(name, raw=raw, header=header):
            return _read(raw, *header[name])

        if "refqwen.quantization" in metadata or any(dtype in ("I8", "U8") for dtype, *_ in header.values()):
            file_readers, file_shapes = quantized_readers(header, metadata, read, file)
        else:
            file_readers = {name: partial(read, name) for name in header}
            file_shapes = {name: h[1] for name, h in header.items()}
        readers.update(file_readers)
        shapes.update(file_shapes)
    check_shapes(shapes, cfg, source=str(folder))
    return cfg, LazyWeights(readers, shapes), tokenizer


def _generation_eos(folder: Path) -> tuple[int, ...]:
    """generation_config.json may name more end tokens than config.json (chat models end on <|im_end|>)."""
    path = folder / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
    return tuple([eos] if isinstance(eos, int) else eos or [])


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    index = folder / INDEX_FILE
    if not index.exists():
        raise WeightsError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
    files = sorted({folder / f for f in weight_map.values()})
    for f in files:
        if not f.exists():
            raise WeightsError(f"{index}: lists shard {f.name}, which is not in {folder}")
    return files


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict]:
    """(name -> (dtype, shape, start, end) with absolute byte offsets, all checked; the metadata)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise WeightsError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        if dtype not in DTYPES:
            raise WeightsError(f"{path}: tensor {name} is {dtype}; refqwen reads {sorted(DTYPES)} checkpoints")
        if end - start != int(np.prod(shape)) * np.dtype(DTYPES[dtype]).itemsize:
            raise WeightsError(f"{path}: tensor {name} of shape {shape} has {end - start} bytes of data")
        if 8 + n + end > size:
            raise WeightsError(f"{path}: truncated safetensors file: tensor {name} ends at byte {8 + n + end}, "
                               f"file has {size}")
        tensors[name] = (dtype, shape, 8 + n + start, 8 + n + end)
    return tensors, metadata


def _read(raw: np.memmap, dtype: str, shape, start: int, end: int) -> np.ndarray:
    a = raw[start:end].view(DTYPES[dtype]).reshape(shape)
    if dtype in ("F32", "I8", "U8"):
        return a  # stays memory-mapped
    if dtype == "F16":
        return a.astype(np.float32)
    return (a.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32
