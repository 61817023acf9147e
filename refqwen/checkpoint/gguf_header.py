"""Check a GGUF file's header against its real size before the `gguf` package reads it.

`gguf.GGUFReader` trusts every count the header declares: a 49-byte file claiming a 2^40-element
array makes it loop and allocate without end. This walk reads the same layout with `struct`, checks
each declared count and length against the bytes that remain and against the limits below, and
validates every string as UTF-8, so the reader only ever sees a header it can parse in bounded time
and memory. Layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF", version u32, tensor_count u64, kv_count u64,
    kv_count x (key: string, value_type u32, value),
    tensor_count x (name: string, n_dims u32, dims u64 x n_dims, type u32, offset u64),
    padding to general.alignment, tensor data.
    string = length u64 + UTF-8 bytes; array = item_type u32 + count u64 + items.
"""

import mmap
import struct
from pathlib import Path

import gguf

from refqwen.errors import WeightsError
from refqwen.files import check_regular_file

MAX_TENSORS = 65536  # Qwen2-57B-A14B has ~600 (experts are stacked); a GGUF with more is not a Qwen2 model
MAX_KEYS = 65536  # llama.cpp writes ~40 keys
MAX_STRING_ARRAY = 1 << 22  # strings in one array; Qwen2's vocabulary and merges are ~152k each
MAX_STRING_BYTES = 64 * 1024 ** 2  # one string; the longest real ones are chat templates (KB)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 16
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
STRING, ARRAY = 8, 9


class _Walk:
    """A cursor over the file's bytes that refuses to read past the end."""

    def __init__(self, data, path):
        self.data, self.pos, self.path = data, 0, path

    def fail(self, message):
        raise WeightsError(f"{self.path}: not a readable GGUF file: {message} (at byte {self.pos})")

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.data):
            self.fail(f"truncated (file has {len(self.data)} bytes)")
        values = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self, what: str) -> str:
        n = self.take("<Q")
        if n > MAX_STRING_BYTES or self.pos + n > len(self.data):
            self.fail(f"{what} declares {n} bytes, beyond the file or the {MAX_STRING_BYTES}-byte limit")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not UTF-8")

    def value(self, kind: int, key: str, nested: bool = False):
        if kind in SCALAR_SIZES:
            self.pos += SCALAR_SIZES[kind]
            if self.pos > len(self.data):
                self.fail("truncated")
            return None
        if kind == STRING:
            return self.string(f"the value of {key}")
        if kind != ARRAY or nested:
            self.fail(f"key {key} has value type {kind}, which GGUF does not define"
                      if kind != ARRAY else f"key {key} nests arrays, which no Qwen2 GGUF does")
        item, count = self.take("<I"), self.take("<Q")
        smallest = SCALAR_SIZES.get(item, 8)  # a string item is at least its 8-byte length
        if count * smallest > len(self.data) - self.pos:
            self.fail(f"key {key} declares an array of {count} items, more than the file holds")
        if item in SCALAR_SIZES:
            self.pos += count * SCALAR_SIZES[item]
            return None
        if count > MAX_STRING_ARRAY:
            self.fail(f"key {key} declares {count} strings, above the limit of {MAX_STRING_ARRAY}")
        for i in range(count):
            self.value(item, f"{key}[{i}]", nested=True)
        return None


def check_gguf_header(path) -> None:
    """Raise WeightsError unless the header of the GGUF file at `path` is complete and within limits,
    and every tensor it declares lies inside the file."""
    path = check_regular_file(path, "GGUF file")
    with open(path, "rb") as f:
        if Path(path).stat().st_size == 0:
            raise WeightsError(f"{path}: not a readable GGUF file: the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check(_Walk(data, path))


def _check(w: _Walk) -> None:
    if w.data[:4] != b"GGUF":
        w.fail("no GGUF magic")
    w.pos = 4
    version = w.take("<I")
    if version not in (2, 3):
        w.fail(f"version {version} (refqwen reads little-endian GGUF versions 2 and 3)")
    n_tensors, n_keys = w.take("<Q"), w.take("<Q")
    if n_tensors > MAX_TENSORS or n_keys > MAX_KEYS:
        w.fail(f"declares {n_tensors} tensors and {n_keys} keys (limits {MAX_TENSORS} and {MAX_KEYS})")
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_keys):
        key = w.string("a key name")
        kind = w.take("<I")
        start = w.pos
        w.value(kind, key)
        if key == gguf.Keys.General.ALIGNMENT:
            alignment = _alignment(w, kind, start)
    tensors = [_tensor_info(w) for _ in range(n_tensors)]
    data_start = -(-w.pos // alignment) * alignment
    names = set()
    for name, n_bytes, offset in tensors:
        if name in names:
            w.fail(f"tensor {name} is declared twice")
        names.add(name)
        if data_start + offset + n_bytes > len(w.data):
            raise WeightsError(f"{w.path}: truncated GGUF file: tensor {name} ends at byte "
                               f"{data_start + offset + n_bytes}, file has {len(w.data)}")


def _alignment(w: _Walk, kind: int, start: int) -> int:
    if kind != 4:  # UINT32
        w.fail("general.alignment is not a uint32")
    (value,) = struct.unpack_from("<I", w.data, start)
    if not 0 < value <= MAX_ALIGNMENT or value & (value - 1):
        w.fail(f"general.alignment {value} is not a power of two up to {MAX_ALIGNMENT}")
    return value


def _tensor_info(w: _Walk) -> tuple[str, int, int]:
    """(name, bytes of data, offset from the start of the data section) of one tensor."""
    name = w.string("a tensor name")
    n_dims = w.take("<I")
    if not 0 < n_dims <= MAX_DIMS:
        w.fail(f"tensor {name} has {n_dims} dimensions (1..{MAX_DIMS})")
    dims = [w.take("<Q") for _ in range(n_dims)]
    kind, offset = w.take("<I"), w.take("<Q")
    try:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        w.fail(f"tensor {name} has unknown type {kind}")
    if 0 in dims or dims[0] % block:
        w.fail(f"tensor {name} has dimensions {dims}; the first must be a multiple of {block} and none 0")
    n_elements = 1
    for d in dims:
        n_elements *= d  # a Python int: no overflow, and compared with the file size below
    n_bytes = n_elements // block * type_size
    if n_bytes > len(w.data) or offset > len(w.data):
        raise WeightsError(f"{w.path}: truncated GGUF file: tensor {name} declares {n_bytes} bytes at offset "
                           f"{offset}, file has {len(w.data)}")
    return name, n_bytes, offset
