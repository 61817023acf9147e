"""Load a Hugging Face model folder: config.json plus safetensors weights (one file or shards).

Float32 tensors are memory-mapped straight from the file (no copy in RAM until touched,
and then only the page cache); float16 and bfloat16 tensors are widened to float32 one
tensor at a time. The `safetensors` package reads into fresh arrays and has no NumPy
bfloat16, so we read its simple layout directly: an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw data.
"""

import struct
from functools import partial
from pathlib import Path

import numpy as np

from refqwen.checkpoint.quantized import quantized_readers
from refqwen.checkpoint.weights import LazyWeights, check_declared_size, check_finite, check_shapes
from refqwen.errors import RefqwenError, WeightsError
from refqwen.files import check_regular_file, parse_json, read_json
from refqwen.model.config import Config
from refqwen.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # BF16 read as raw 16-bit words
          "I8": np.int8, "U8": np.uint8}  # quantized checkpoints (refqwen/checkpoint/quantized.py)
MAX_HEADER_BYTES = 100 * 1024 ** 2  # the safetensors library's own limit
MAX_DIMS = 8


def load_hf_folder(folder) -> tuple[Config, LazyWeights, Tokenizer | None]:
    """Config, float32 weights (read on demand), and the tokenizer if the folder has a tokenizer.json."""
    folder = Path(folder)
    cfg = Config.from_hf_file(folder / "config.json")
    tokenizer = Tokenizer.from_hf_folder(folder, cfg.eos_token_ids + _generation_eos(folder))
    files = _weight_files(folder)
    check_declared_size(cfg, sum(f.stat().st_size for f in files), folder)
    readers, shapes = {}, {}
    for file in files:
        header, metadata = read_header(file)  # {name: (dtype, shape, start, end)}, {key: str}
        raw = np.memmap(file, dtype=np.uint8, mode="r")

        def read(name, raw=raw, header=header, file=file):
            return _read(raw, *header[name], name=name, source=file)

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
    if not path.exists():
        return ()
    eos = read_json(path, "generation_config.json").get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else eos or []
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise RefqwenError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return tuple(eos)


def _weight_files(folder: Path) -> list[Path]:
    if (folder / SINGLE_FILE).exists():
        return [check_regular_file(folder / SINGLE_FILE, "safetensors file")]
    index = folder / INDEX_FILE
    if not index.exists():
        raise WeightsError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")
    try:
        weight_map = read_json(index, "safetensors index").get("weight_map")
    except RefqwenError as e:
        raise WeightsError(str(e)) from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise WeightsError(f"{index}: not a safetensors index: 'weight_map' must map tensor names to file names")
    files = sorted({_shard_path(folder, index, f) for f in weight_map.values()})
    for f in files:
        if not f.exists():
            raise WeightsError(f"{index}: lists shard {f.name}, which is not in {folder}")
        check_regular_file(f, "safetensors file")
    return files


def _shard_path(folder: Path, index: Path, name: str) -> Path:
    """A shard named by the index, which must be a plain file name inside the model folder: a path
    with '..' or an absolute one could make refqwen read any file on the machine."""
    if not name or Path(name).is_absolute() or "\\" in name or ".." in Path(name).parts or "\0" in name:
        raise WeightsError(f"{index}: shard name {name!r} points outside {folder}; expected a file name in it")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):  # a symbolic link out of the folder
        raise WeightsError(f"{index}: shard {name!r} resolves to {path.resolve()}, outside {folder}")
    return path


def read_header(path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], dict]:
    """(name -> (dtype, shape, start, end) with absolute byte offsets, all checked; the metadata)."""
    size = check_regular_file(path, "safetensors file").stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise WeightsError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
        try:
            header = parse_json(f.read(n), f"{path}: safetensors header")
        except RefqwenError as e:
            raise WeightsError(str(e)) from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: safetensors __metadata__ must map names to strings")
    tensors = {name: _tensor_entry(path, name, info, 8 + n) for name, info in header.items()}
    _check_layout(path, tensors, size)
    return tensors, metadata


def _tensor_entry(path, name, info, data_start: int) -> tuple[str, tuple[int, ...], int, int]:
    """One header entry {dtype, shape, data_offsets} checked for types, sizes and signs."""
    def is_count(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise WeightsError(f"{path}: tensor {name}: expected {{dtype, shape, data_offsets}}, got {info!r:.200}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WeightsError(f"{path}: tensor {name} is {dtype!r}; refqwen reads {sorted(DTYPES)} checkpoints")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(is_count(d) for d in shape):
        raise WeightsError(f"{path}: tensor {name}: shape must be a list of at most {MAX_DIMS} non-negative "
                           f"integers, got {shape!r:.200}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightsError(f"{path}: tensor {name}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                           f"got {offsets!r:.200}")
    start, end = offsets
    n_elements = 1
    for d in shape:
        n_elements *= d  # a Python int, so an absurd shape cannot overflow into a small number
    if end - start != n_elements * np.dtype(DTYPES[dtype]).itemsize:
        raise WeightsError(f"{path}: tensor {name} of shape {tuple(shape)} has {end - start} bytes of data")
    return dtype, tuple(shape), data_start + start, data_start + end


def _check_layout(path, tensors: dict, size: int) -> None:
    """Every tensor inside the file, and no two sharing bytes (which would read one as the other)."""
    previous_end, previous = 0, None
    for name, (_, _, start, end) in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if end > size:
            raise WeightsError(f"{path}: truncated safetensors file: tensor {name} ends at byte {end}, "
                               f"file has {size}")
        if start < previous_end and end > start:
            raise WeightsError(f"{path}: tensors {previous} and {name} overlap in the file")
        if end > start:
            previous_end, previous = end, name


def _read(raw: np.memmap, dtype: str, shape, start: int, end: int, name="", source="") -> np.ndarray:
    a = raw[start:end].view(DTYPES[dtype]).reshape(shape)
    if dtype in ("I8", "U8"):
        return a  # stays memory-mapped
    if dtype == "F16":
        a = a.astype(np.float32)
    elif dtype == "BF16":
        a = (a.astype(np.uint32) << 16).view(np.float32)  # bfloat16 is the top half of a float32
    return check_finite(a, name, source)  # float32 stays memory-mapped
