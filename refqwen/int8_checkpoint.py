"""Pre-quantized int8 checkpoints: a Hugging Face folder whose projection weights are int8.

Format (documented in docs/quantization.md):
- config.json, tokenizer.json, tokenizer_config.json, generation_config.json as usual;
- model.safetensors: every projection weight `P.weight` (q/k/v/o, gate/up/down, experts,
  shared expert, lm_head, embed_tokens) stored as int8 [out, in] under its own name, with its
  scales under `P.weight_scale`: float32 [out] (per output channel) or [out, ceil(in/32)]
  (groups of 32 along the input; the last group may be shorter). Dequantized: q * scale.
  Norms, biases, the MoE router and the shared-expert gate stay float32.
- metadata: {"refqwen.quantization": "int8-channel" | "int8-g32", "refqwen.group_size": "0" | "32",
  "refqwen.source": the checkpoint it came from, "refqwen.version"}.
"""

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

SCHEMES = {"int8-channel": "channel", "int8-g32": "g32"}
SCALE_SUFFIX = "_scale"
FLOAT_KEEP = (".mlp.gate.weight", ".shared_expert_gate.weight")  # 2-D, but they decide routing: keep float


def is_quantized_name(name: str, shape) -> bool:
    """Projection and embedding matrices are quantized; norms, biases, router and gates are not."""
    return len(shape) == 2 and not name.endswith(FLOAT_KEEP)


def write_int8_checkpoint(source, out, scheme: str = "int8-g32", force: bool = False, progress: bool = True):
    """Quantize `source` (folder, .gguf or "demo") into the folder `out`, tensor by tensor.

    The folder is written under a temporary name beside `out` and renamed at the end, so an
    interrupted run leaves nothing behind; an existing `out` is replaced only with force=True.
    """
    from refqwen import __version__
    from refqwen.loading import open_checkpoint

    if scheme not in SCHEMES:
        raise RefqwenError(f"unknown quantization scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    out = Path(out)
    if out.exists() and not force:
        raise RefqwenError(f"{out} exists; refusing to overwrite it (pass force=True / --force)")
    path, cfg, weights, tokenizer = open_checkpoint(source, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        tensors = {}
        for name in tqdm(list(weights), desc=f"quantizing to {scheme}", unit="tensor", disable=not progress):
            w = weights[name]
            if is_quantized_name(name, w.shape):
                tensors[name], tensors[name + SCALE_SUFFIX] = quant.quantize(w, SCHEMES[scheme])
            else:
                tensors[name] = np.ascontiguousarray(w, np.float32)
        metadata = {"refqwen.quantization": scheme, "refqwen.group_size": "32" if scheme == "int8-g32" else "0",
                    "refqwen.source": str(path), "refqwen.version": __version__}
        save_file(tensors, str(tmp / "model.safetensors"), metadata=metadata)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def quantized_readers(header: dict, metadata: dict, read, source) -> tuple[dict, dict]:
    """For a safetensors file of this format: (name -> reader of a QuantizedWeight or float32 array,
    name -> shape). `header` maps name -> (dtype, shape, ...); `read(name)` returns the raw array."""
    scheme = metadata.get("refqwen.quantization")
    if scheme not in SCHEMES:
        raise WeightsError(f"{source}: int8 tensors but quantization scheme {scheme!r}; refqwen runs "
                           f"{sorted(SCHEMES)}")
    readers, shapes = {}, {}
    for name, (dtype, shape, *_) in header.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        shapes[name] = shape
        if dtype != "I8":
            readers[name] = lambda name=name: read(name)
            continue
        scale = name + SCALE_SUFFIX
        if scale not in header:
            raise WeightsError(f"{source}: int8 tensor {name} has no scales ({scale} is missing)")
        _check_scales(name, shape, header[scale][1], source)
        readers[name] = lambda name=name, scale=scale: quant.QuantizedWeight(read(name), read(scale))
    return readers, shapes


def _check_scales(name, shape, scale_shape, source):
    rows, cols = shape
    groups = -(-cols // quant.GROUP)
    if tuple(scale_shape) not in ((rows,), (rows, groups)):
        raise WeightsError(f"{source}: scales of {name} have shape {tuple(scale_shape)}; expected ({rows},) per "
                           f"channel or ({rows}, {groups}) for groups of {quant.GROUP} over {cols} inputs")
