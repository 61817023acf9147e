"""Pre-quantized checkpoints: a Hugging Face folder whose projection weights are int8 or packed int4.

Format (documented in docs/quantization.md):
- config.json, tokenizer.json, tokenizer_config.json, generation_config.json as usual;
- model.safetensors, or above a size limit model-0000N-of-0000M.safetensors shards with
  model.safetensors.index.json: every projection weight `P.weight` (q/k/v/o, gate/up/down, experts,
  shared expert, lm_head, embed_tokens) under its own name,
    int8 schemes: int8 [out, in], scales `P.weight_scale` float32 [out] or [out, ceil(in/32)];
    int4 schemes: uint8 [out, in/2] (two values per byte, even column in the low nibble),
                  scales `P.weight_scale` float32 [out, in/group], zero points `P.weight_zero` uint8 [out, in/group].
  Norms, biases, the MoE router, the shared-expert gate, and the matrices named by `keep` stay float32.
- metadata of every file: refqwen.quantization, refqwen.group_size, refqwen.source,
  refqwen.source_sha256, refqwen.version, refqwen.keep.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from refqwen import quant
from refqwen.errors import RefqwenError, WeightsError

SCHEMES = tuple(quant.SCHEMES)
SCALE_SUFFIX, ZERO_SUFFIX = "_scale", "_zero"
FLOAT_KEEP = (".mlp.gate.weight", ".shared_expert_gate.weight")  # 2-D, but they decide routing: keep float
KEEPABLE = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
SHARD_BYTES = 2 * 1024 ** 3  # default size limit of one safetensors file


def is_quantized_name(name: str, shape) -> bool:
    """Projection and embedding matrices are quantized; norms, biases, router and gates are not."""
    return len(shape) == 2 and not name.endswith(FLOAT_KEEP)


def kept_names(keep) -> set[str]:
    """`keep` ("embed", "lm_head") -> the tensor names that stay float32."""
    unknown = sorted(set(keep) - set(KEEPABLE))
    if unknown:
        raise RefqwenError(f"--keep: unknown {', '.join(unknown)}; expected a comma-separated subset of "
                           f"{', '.join(KEEPABLE)}")
    return {KEEPABLE[k] for k in keep}


def write_quantized_checkpoint(source, out, scheme: str = "int8-g32", keep=(), force: bool = False,
                               progress: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Quantize `source` (folder, .gguf or "demo") into the folder `out`, tensor by tensor.

    Quantized tensors are collected until `shard_bytes`, then written as one shard, so memory holds
    one float32 tensor and at most one shard. The folder is written under a temporary name beside
    `out` and renamed at the end: an interrupted run leaves nothing behind; an existing `out` is
    replaced only with force=True.
    """
    from refqwen.loading import open_checkpoint

    if scheme not in SCHEMES:
        raise RefqwenError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    floats = kept_names(keep)
    out = Path(out)
    if out.exists() and not force:
        raise RefqwenError(f"{out} exists; refusing to overwrite it (pass force=True / --force)")
    path, cfg, weights, tokenizer = open_checkpoint(source, progress)
    check_alignment(weights.shapes, scheme, floats)
    metadata = _metadata(scheme, path, keep)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
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
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def quantize_tensor(name: str, w, scheme: str, floats=frozenset()) -> dict[str, np.ndarray]:
    """The tensors stored for one source tensor: P.weight (+ P.weight_scale, P.weight_zero)."""
    if not is_quantized_name(name, w.shape) or name in floats:
        return {name: np.ascontiguousarray(w, np.float32)}
    qw = quant.quantize_scheme(w, scheme, name)
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
    """sha256 of a checkpoint: of the file, or of a folder's files (names and contents, sorted by name)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()) if path.is_dir() else [path]:
        if path.is_dir():
            digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _metadata(scheme: str, path: Path, keep) -> dict[str, str]:
    from refqwen import __version__

    group = quant.SCHEMES[scheme][1]
    return {"refqwen.quantization": scheme, "refqwen.group_size": str(group or 0), "refqwen.source": str(path),
            "refqwen.source_sha256": source_sha256(path), "refqwen.version": __version__,
            "refqwen.keep": ",".join(keep)}


def _write_shard(folder: Path, index: int, tensors: dict, metadata: dict) -> tuple[Path, list[str]]:
    path = folder / f"shard-{index}.tmp"
    save_file(tensors, str(path), metadata=metadata)
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


# ---- reading ---------------------------------------------------------------------------------

def quantized_readers(header: dict, metadata: dict, read, source) -> tuple[dict, dict]:
    """For a safetensors file of this format: (name -> reader of a QuantizedWeight, QuantizedInt4Weight
    or float32 array, name -> shape [out, in]). `header` maps name -> (dtype, shape, ...); `read(name)`
    returns the raw array."""
    scheme = metadata.get("refqwen.quantization")
    if scheme not in SCHEMES:
        raise WeightsError(f"{source}: quantized tensors but quantization scheme {scheme!r}; refqwen runs "
                           f"{sorted(SCHEMES)}")
    group = quant.SCHEMES[scheme][1]
    if metadata.get("refqwen.group_size", str(group or 0)) != str(group or 0):
        raise WeightsError(f"{source}: scheme {scheme} has group size {group or 0}, but the metadata says "
                           f"refqwen.group_size={metadata['refqwen.group_size']}")
    readers, shapes = {}, {}
    for name, (dtype, shape, *_) in header.items():
        if name.endswith((SCALE_SUFFIX, ZERO_SUFFIX)):
            continue
        shapes[name] = shape
        if dtype not in ("I8", "U8"):
            readers[name] = lambda name=name: read(name)
        elif dtype == "I8":
            readers[name] = _int8_reader(name, shape, header, read, source, scheme)
        else:
            shapes[name] = (shape[0], 2 * shape[1])
            readers[name] = _int4_reader(name, shape, header, read, source, group, scheme)
    return readers, shapes


def _int8_reader(name, shape, header, read, source, scheme):
    if not scheme.startswith("int8"):
        raise WeightsError(f"{source}: tensor {name} is int8 in a {scheme} checkpoint (expected packed uint8)")
    scale = _companion(name, SCALE_SUFFIX, header, source, "int8")
    rows, cols = shape
    groups = -(-cols // quant.GROUP)
    if tuple(header[scale][1]) not in ((rows,), (rows, groups)):
        raise WeightsError(f"{source}: scales of {name} have shape {tuple(header[scale][1])}; expected ({rows},) per "
                           f"channel or ({rows}, {groups}) for groups of {quant.GROUP} over {cols} inputs")
    return lambda: quant.QuantizedWeight(read(name), read(scale))


def _int4_reader(name, shape, header, read, source, group, scheme):
    if not scheme.startswith("int4"):
        raise WeightsError(f"{source}: tensor {name} is uint8 (packed int4) in a {scheme} checkpoint")
    scale = _companion(name, SCALE_SUFFIX, header, source, "int4")
    zero = _companion(name, ZERO_SUFFIX, header, source, "int4")
    rows, cols = shape[0], 2 * shape[1]
    if cols % group:
        raise WeightsError(f"{source}: {name} has {cols} inputs, which groups of {group} ({scheme}) do not divide")
    for companion in (scale, zero):
        if tuple(header[companion][1]) != (rows, cols // group):
            raise WeightsError(f"{source}: {companion} has shape {tuple(header[companion][1])}; expected "
                               f"({rows}, {cols // group}) for groups of {group} over {cols} inputs")
    return lambda: quant.QuantizedInt4Weight(read(name), read(scale), read(zero), group)


def _companion(name, suffix, header, source, kind) -> str:
    other = name + suffix
    if other not in header:
        what = "scales" if suffix == SCALE_SUFFIX else "zero points"
        raise WeightsError(f"{source}: {kind} tensor {name} has no {what} ({other} is missing)")
    return other
