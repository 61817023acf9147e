"""Write a pre-quantized checkpoint (the format in refqwen/checkpoint/quantized.py and
docs/quantization.md): streamed tensor by tensor, sharded, under a temporary name renamed at the end."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file
from tqdm import tqdm

from refqwen import quant
from refqwen.backends import numba_quant
from refqwen.checkpoint.open import open_checkpoint
from refqwen.checkpoint.quantized import SCALE_SUFFIX, SCHEMES, ZERO_SUFFIX, is_quantized_name, kept_names
from refqwen.errors import RefqwenError
from refqwen.files import clean_stale_partials, follow_umask, partial_prefix, sigterm_as_interrupt, write_errors

SHARD_BYTES = 2 * 1024 ** 3  # default size limit of one safetensors file


def write_quantized_checkpoint(source, out, scheme: str = "int8-g32", keep=(), force: bool = False,
                               progress: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Quantize `source` (folder, .gguf or "demo") into the folder `out`, tensor by tensor.

    Quantized tensors are collected until `shard_bytes`, then written as one shard, so memory holds
    one float32 tensor and at most one shard. The folder is written under a temporary name beside
    `out` and renamed at the end: an interrupted run leaves nothing behind; an existing `out` is
    replaced only with force=True.
    """
    if scheme not in SCHEMES:
        raise RefqwenError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    floats = kept_names(keep)
    out = Path(out)
    if out.exists() and not force:
        raise RefqwenError(f"{out} exists; refusing to overwrite it (pass force=True / --force)")
    path, cfg, weights, tokenizer = open_checkpoint(source, progress)
    check_alignment(weights.shapes, scheme, floats)
    metadata = _metadata(scheme, path, keep)
    with write_errors(out), sigterm_as_interrupt():
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_partials(out)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=partial_prefix(out)))
        try:
            _write_folder(tmp, weights, scheme, floats, metadata, shard_bytes, cfg, tokenizer, progress)
            follow_umask(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_folder(tmp: Path, weights, scheme, floats, metadata, shard_bytes, cfg, tokenizer, progress) -> None:
    shards, pending, size = [], {}, 0
    for name in tqdm(list(weights), desc=f"quantizing to {scheme}", unit="tensor", disable=not progress):
        tensors = quantize_tensor(name, weights[name], scheme, floats)
        pending.update(tensors)
        size += sum(t.nbytes for t in tensors.values())
        if size >= shard_bytes:
            shards.append(_write_shard(tmp, len(shards), pending, metadata))
            pending, size = {}, 0
    if pending or not shards:
        shards.append(_write_shard(tmp, len(shards), pending, metadata))
    _name_shards(tmp, shards)
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    if tokenizer is not None:
        tokenizer.save(tmp)


def quantize_tensor(name: str, w, scheme: str, floats=frozenset()) -> dict[str, np.ndarray]:
    """The tensors stored for one source tensor: P.weight (+ P.weight_scale, P.weight_zero)."""
    if not is_quantized_name(name, w.shape) or name in floats:
        return {name: np.ascontiguousarray(w, np.float32)}
    qw = numba_quant.quantize_scheme(w, scheme, name)  # quant.quantize_scheme's integers, in parallel
    if isinstance(qw, quant.QuantizedInt4Weight):
        return {name: qw.q_packed, name + SCALE_SUFFIX: qw.scales, name + ZERO_SUFFIX: qw.zeros}
    return {name: qw.q, name + SCALE_SUFFIX: qw.scales}


def check_alignment(shapes: dict, scheme: str, floats=frozenset()) -> None:
    """Refuse, before writing anything, a matrix whose input size the scheme's groups do not tile."""
    bits, group = quant.SCHEMES[scheme]
    if bits == 8:
        return  # int8-g32 allows a shorter last group
    bad = [(n, s) for n, s in shapes.items() if is_quantized_name(n, s) and n not in floats and s[1] % group]
    if bad:
        name, shape = bad[0]
        more = f" (and {len(bad) - 1} more matrices)" if len(bad) > 1 else ""
        try:
            quant.check_group(shape[1], group, f"{scheme}: {name}{more}")
        except RefqwenError as e:
            raise RefqwenError(f"{e}; nothing was written") from None


def source_sha256(path: Path) -> str:
    """sha256 of a checkpoint: of the file, or of a folder's regular files, subfolders included (relative
    names and contents, sorted by name; named pipes, devices and links to folders are skipped)."""
    digest = hashlib.sha256()
    for file in _regular_files(path) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _regular_files(folder: Path) -> list[Path]:
    found = []
    for root, _, names in os.walk(folder):  # does not follow links to folders, so it cannot loop
        found += [Path(root) / n for n in names if (Path(root) / n).is_file()]
    return sorted(found, key=lambda f: f.relative_to(folder).as_posix())


def _metadata(scheme: str, path: Path, keep) -> dict[str, str]:
    from refqwen import __version__

    group = quant.SCHEMES[scheme][1]
    return {"refqwen.quantization": scheme, "refqwen.group_size": str(group or 0), "refqwen.source": str(path),
            "refqwen.source_sha256": source_sha256(path), "refqwen.version": __version__,
            "refqwen.keep": ",".join(keep)}


def _write_shard(folder: Path, index: int, tensors: dict, metadata: dict) -> tuple[Path, list[str]]:
    path = folder / f"shard-{index}.tmp"
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:  # the library's wrapper around an OSError (disk full, ...)
        raise OSError(f"writing {path.name}: {e}") from None
    return path, list(tensors)


def _name_shards(folder: Path, shards: list[tuple[Path, list[str]]]) -> None:
    """One shard -> model.safetensors; several -> model-0000N-of-0000M.safetensors + the index."""
    if len(shards) == 1:
        os.replace(shards[0][0], folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (path, names) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += path.stat().st_size
        os.replace(path, folder / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
