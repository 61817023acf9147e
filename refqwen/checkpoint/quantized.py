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

import numpy as np

from refqwen import quant
from refqwen.checkpoint.weights import check_finite
from refqwen.errors import RefqwenError, WeightsError

SCHEMES = tuple(quant.SCHEMES)
SCALE_SUFFIX, ZERO_SUFFIX = "_scale", "_zero"
FLOAT_KEEP = (".mlp.gate.weight", ".shared_expert_gate.weight")  # 2-D, but they decide routing: keep float
KEEPABLE = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}


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
    return lambda: quant.QuantizedWeight(read(name), check_finite(read(scale), scale, source))


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
    return lambda: quant.QuantizedInt4Weight(read(name), check_finite(read(scale), scale, source),
                                             _checked_zeros(read(zero), zero, source), group)


def _checked_zeros(zeros: np.ndarray, name: str, source) -> np.ndarray:
    """int4 zero points are 4-bit values stored one per byte: anything above 15 is corrupt."""
    if zeros.size and zeros.max() > 15:
        bad = np.unravel_index(np.argmax(zeros > 15), zeros.shape)
        raise WeightsError(f"{source}: {name} holds zero point {zeros[bad]} at {tuple(int(i) for i in bad)}; "
                           f"int4 zero points are 0..15")
    return zeros


def _companion(name, suffix, header, source, kind) -> str:
    other = name + suffix
    what = "scales" if suffix == SCALE_SUFFIX else "zero points"
    if other not in header:
        raise WeightsError(f"{source}: {kind} tensor {name} has no {what} ({other} is missing)")
    dtype = "F32" if suffix == SCALE_SUFFIX else "U8"
    if header[other][0] != dtype:
        raise WeightsError(f"{source}: {what} {other} are {header[other][0]}; expected {dtype}")
    return other
