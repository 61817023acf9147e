"""Pluggable implementations of the model's layer operations, picked by name.

`refqwen.model.ops.Backend` lists what a backend provides; "numpy" is that class itself, the
reference, which lives with the model. This package holds only the accelerated backends.
`available()` says which backends can run on this machine and why the others cannot;
`get(name)` makes one.
"""

import hashlib
import importlib
import os
from pathlib import Path

from refqwen.errors import RefqwenError

SOURCES = Path(__file__).parent

# name -> "module:class"
REGISTRY = {
    "numpy": "refqwen.model.ops:Backend",
    "numba-int8": "refqwen.backends.numba_int8:NumbaInt8Backend",
    "numba-int8-channel": "refqwen.backends.numba_int8:NumbaInt8ChannelBackend",
    "numba-int4": "refqwen.backends.numba_int8:NumbaInt4Backend",
    "numba-w8a8": "refqwen.backends.numba_int8:NumbaW8A8Backend",
    "numba-w4a8": "refqwen.backends.numba_int8:NumbaW4A8Backend",
    "cupy": "refqwen.backends.cupy_gpu:CupyBackend",
    "cupy-int8-channel": "refqwen.backends.cupy_gpu:CupyInt8ChannelBackend",
    "cupy-f16": "refqwen.backends.cupy_gpu:CupyF16Backend",
    "cupy-bf16": "refqwen.backends.cupy_gpu:CupyBF16Backend",
}


def _backend_class(name: str):
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def available() -> dict[str, str | None]:
    """Backend name -> None if it can run here, else the reason it cannot."""
    reasons = {}
    for name in REGISTRY:
        try:
            reasons[name] = _backend_class(name).unavailable_reason()
        except ImportError as e:
            reasons[name] = f"cannot import: {e}"
    return reasons


def describe() -> str:
    return ", ".join(name if why is None else f"{name} (unavailable: {why})" for name, why in available().items())


def get(name: str):
    """A fresh backend instance by name."""
    if name not in REGISTRY:
        raise RefqwenError(f"unknown backend {name!r}; available: {describe()}")
    reason = available()[name]
    if reason is not None:
        raise RefqwenError(f"backend {name!r} cannot run here: {reason}")
    return _backend_class(name)()


def sources_stamp(folder: Path = SOURCES) -> str:
    """8 hex digits that change with any .py file of `folder` (its name, size and modification time)."""
    digest = hashlib.sha1()
    for path in sorted(folder.glob("*.py")):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_mtime_ns} {stat.st_size};".encode())
    return digest.hexdigest()[:8]


def drop_stale_numba_cache(folder: Path = SOURCES):
    """Numba's disk cache checks only the file a function is defined in, and the kernels here call intrinsics
    and functions of the other files here (an edited float_tiles.py would leave numba_attention's cached
    kernels stale, silently): when any source here changed since the cache was written, all of it goes."""
    cache = folder / "__pycache__"
    marker = cache / "numba-sources.stamp"
    stamp = sources_stamp(folder)
    try:
        if marker.read_text() == stamp:
            return
    except OSError:
        pass
    try:
        for path in cache.glob("*.nb[ic]"):
            path.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        partial = cache / f"numba-sources.stamp.{os.getpid()}.tmp"
        partial.write_text(stamp)
        partial.replace(marker)
    except OSError:
        pass  # not writable (an installed package): Numba caches elsewhere, and these files are not edited


drop_stale_numba_cache()
