"""The tensors a Qwen2 checkpoint holds, by their Hugging Face names, and the check that a
checkpoint holds exactly those, each with the right shape.

Every loader (safetensors folders, GGUF files) maps its tensors onto these names, so the
model code sees one naming whatever the file format.
"""

import math
from collections.abc import Callable, Mapping

import numpy as np

from refqwen.errors import WeightsError
from refqwen.model.config import Config


def expected_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model reads (linear weights are [out, in])."""
    C, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (C,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (C,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_out, C)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_out, C)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_out, C)
        shapes[f"{p}.self_attn.o_proj.weight"] = (C, q_out)
        if cfg.qkv_bias:
            shapes[f"{p}.self_attn.q_proj.bias"] = (q_out,)
            shapes[f"{p}.self_attn.k_proj.bias"] = (kv_out,)
            shapes[f"{p}.self_attn.v_proj.bias"] = (kv_out,)
        if i in cfg.sparse_layers:
            shapes[f"{p}.mlp.gate.weight"] = (cfg.num_experts, C)
            shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, C)
            shapes.update(_mlp_shapes(f"{p}.mlp.shared_expert", C, cfg.shared_expert_intermediate_size))
            for e in range(cfg.num_experts):
                shapes.update(_mlp_shapes(f"{p}.mlp.experts.{e}", C, cfg.moe_intermediate_size))
        else:
            shapes.update(_mlp_shapes(f"{p}.mlp", C, cfg.intermediate_size))
    return shapes


def _mlp_shapes(prefix: str, C: int, I: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.gate_proj.weight": (I, C), f"{prefix}.up_proj.weight": (I, C),
            f"{prefix}.down_proj.weight": (C, I)}


def check_shapes(found: dict[str, tuple[int, ...]], cfg: Config, source: str, optional=("lm_head.weight",)):
    """Raise WeightsError unless `found` (name -> shape) holds exactly the expected tensors.

    `optional` names may be present though the config does not need them (a tied model
    whose checkpoint still stores lm_head.weight).
    """
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected) - set(optional))
    wrong = [(n, expected[n], tuple(found[n])) for n in expected if n in found and tuple(found[n]) != expected[n]]
    problems = [f"missing tensor {n} (expected shape {expected[n]})" for n in missing[:10]]
    problems += [f"tensor {n} has shape {got}, expected {want}" for n, want, got in wrong[:10]]
    problems += [f"unexpected tensor {n} with shape {tuple(found[n])}" for n in extra[:10]]
    if problems:
        more = len(missing) + len(wrong) + len(extra) - len(problems)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise WeightsError(f"{source}: checkpoint does not match its config:\n  " + "\n  ".join(problems) + tail)


def check_finite(a: np.ndarray, name: str, source) -> np.ndarray:
    """`a` unchanged if every value is finite; else a WeightsError naming the tensor. A NaN or an infinity
    anywhere makes the float64 sum non-finite, so one pass with no temporary array decides."""
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the NaN that answers the question
        if np.isfinite(np.sum(a, dtype=np.float64)):
            return a
    bad = np.flatnonzero(~np.isfinite(np.asarray(a, np.float32).reshape(-1)))  # [n_bad]
    where = np.unravel_index(bad[0], a.shape)
    raise WeightsError(f"{source}: tensor {name} holds {len(bad)} NaN or infinite values (the first, "
                       f"{a[where]}, at index {tuple(int(i) for i in where)}); refusing to run a model on them")


def parameter_total(cfg: Config) -> int:
    """The number of weights the config declares, computed without listing them."""
    C, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    attention = C * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D + cfg.num_attention_heads * D * C
    sparse = len(cfg.sparse_layers)
    mlp = (cfg.num_hidden_layers - sparse) * 3 * C * cfg.intermediate_size
    moe = sparse * (cfg.num_experts * 3 * C * cfg.moe_intermediate_size + 3 * C * cfg.shared_expert_intermediate_size)
    return V * C * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * attention + mlp + moe


def check_declared_size(cfg: Config, file_bytes: int, source) -> None:
    """Refuse a config that declares far more weights than the files can hold, before listing them.
    No format refqwen reads stores a weight in less than one bit (GGUF's smallest, IQ1_S, uses 1.56)."""
    needed = parameter_total(cfg) // 8
    if needed > file_bytes:
        raise WeightsError(f"{source}: the config declares {parameter_total(cfg):,} weights, which need at least "
                           f"{needed:,} bytes, but the weight files hold {file_bytes:,} bytes")


class LazyWeights(Mapping):
    """name -> float32 array, read from the checkpoint only when asked for and not kept here.

    The model asks for each tensor once and hands it to its backend's prepare step, so a
    backend that converts weights (to int8, to a GPU) never holds the whole float32 model.
    """

    def __init__(self, readers: dict[str, Callable[[], np.ndarray]], shapes: dict[str, tuple[int, ...]]):
        self.readers, self.shapes = readers, shapes
        self.on_read: Callable[[], object] | None = None  # e.g. a progress bar's update

    def __getitem__(self, name: str) -> np.ndarray:
        array = self.readers[name]()
        if self.on_read:
            self.on_read()
        return array

    def __iter__(self):
        return iter(self.readers)

    def __len__(self) -> int:
        return len(self.readers)


GROUPS = {  # first matching name fragment -> module group
    "embed_tokens": "embedding", "lm_head": "lm_head", "self_attn": "attention", "mlp.experts.": "moe experts",
    "mlp.shared_expert": "moe shared", "mlp.gate.": "moe router", "mlp.": "mlp", "norm": "norms",
}


def parameter_counts(cfg) -> dict[str, int]:
    """Parameters by module group (a tied lm_head is the embedding and is not counted twice)."""
    counts = {}
    for name, shape in expected_shapes(cfg).items():
        group = next(g for fragment, g in GROUPS.items() if fragment in name)
        counts[group] = counts.get(group, 0) + math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts
