"""What a backend provides: the operations the model calls, and the load-time `prepare` step.

This base class *is* the "numpy" backend: each method calls the refqwen function that
defines the operation, so the reference is the specification every backend is tested
against. A faster backend subclasses it and overrides what it accelerates; anything it
leaves alone runs the reference. docs/backends.md explains how to write one.

Shapes: T tokens, C hidden size, H query heads, KV key/value heads, D head size.
"""

import numpy as np

from refqwen.model.attention import causal_attention
from refqwen.model.cache import KVCache
from refqwen.model.linear import linear
from refqwen.model.mlp import silu
from refqwen.model.moe import dispatch_experts
from refqwen.model.norm import rms_norm
from refqwen.model.rope import apply_rotary
from refqwen.quant import QUANTIZED


class Backend:
    name = "numpy"
    description = "the float32 NumPy reference (refqwen/)"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None if this backend can run on this machine, else why not (e.g. "no CUDA device")."""
        return None

    # ---- load time ------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Called once when a model is loaded: compile kernels, allocate device state, ..."""

    def prepare_linear(self, name: str, weight: np.ndarray):
        """Convert one projection weight [out, in] into this backend's form (quantize, copy to a
        device, ...). Called once per weight at load time; `linear` receives the result. The weight
        is float32, or a QuantizedWeight / QuantizedInt4Weight from a pre-quantized checkpoint (the
        reference dequantizes it)."""
        return weight.rows() if isinstance(weight, QUANTIZED) else np.asarray(weight)

    def prepare_float(self, name: str, tensor: np.ndarray):
        """A small tensor the model keeps in float32 whatever the backend: norm weights, biases, the
        MoE router and shared-expert gate (they decide which experts run; a flipped choice costs more
        than any kernel saves). A GPU backend copies it to the device."""
        return np.asarray(tensor, np.float32)

    def check_fits(self, config, source: str) -> None:
        """Raise a RefqwenError, before any weight is read, if a model of this config cannot fit
        where this backend keeps its weights (a GPU's memory); say what would fit."""

    def prepare_embedding(self, weight: np.ndarray):
        """The embedding table [V, C], in the form `embed` reads (and, when the model is tied, the
        form `linear` receives as lm_head)."""
        return weight.rows() if isinstance(weight, QUANTIZED) else np.asarray(weight)

    # ---- run time -------------------------------------------------------------------------

    def to_host(self, x) -> np.ndarray:
        """A NumPy array of one of this backend's arrays (the logits, a traced value)."""
        return np.asarray(x)

    def decode(self, model, token: int, cache):
        """Logits [1, V] of one more token after what cache holds (generation calls this each step;
        a GPU backend may replay a captured graph instead)."""
        return model.logits([token], cache, last_only=True)

    def embed(self, ids: np.ndarray, table) -> np.ndarray:
        """Rows of the embedding table for token ids [T] -> [T, C] float32."""
        return np.asarray(table[ids], np.float32)

    def linear(self, x: np.ndarray, weight, bias: np.ndarray | None = None) -> np.ndarray:
        """x [T, in] -> x Wᵀ + b [T, out], W as returned by prepare_linear."""
        return linear(x, weight, bias)

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """x [T, C] -> [T, C]"""
        return rms_norm(x, weight, eps)

    def apply_rotary(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x [T, heads, D], cos/sin [T, D] -> [T, heads, D]"""
        return apply_rotary(x, cos, sin)

    def new_cache(self, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCache:
        return KVCache(num_layers, num_kv_heads, head_dim)

    def attention(self, q, keys, values, start: int, window: int | None) -> np.ndarray:
        """Causal attention of q [T, H, D] at positions start .. start+T-1 over keys, values [S, KV, D]
        (what the layer's cache.append returned: every position so far) -> [T, H, D]."""
        return causal_attention(q, keys, values, start, window)

    def swiglu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """silu(gate) * up, both [T, I]"""
        return silu(gate) * up

    def moe_dispatch(self, x, experts: list, chosen: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """sum_j weights[:, j] * experts[chosen[:, j]](x), running each expert only on its tokens.
        x [T, C], chosen and weights [T, k] -> [T, C]"""
        return dispatch_experts(x, experts, chosen, weights)
