"""What a backend provides: the operations the model calls, and the load-time `prepare` step.

This base class *is* the "numpy" backend: each run-time operation is the refqwen function that
defines it, held as a staticmethod, so `ops.rms_norm(x, w, eps)` calls `norm.rms_norm` itself (a
debugger's "step into" lands in the math) and the reference is the specification every backend
is tested against. A faster backend subclasses it and overrides what it accelerates with an
ordinary method; anything it leaves alone runs the reference. docs/backends.md explains how.

Shapes: T new tokens, S cached positions, C hidden size, H query heads, KV key/value heads,
D head size, I MLP width, V vocabulary, k experts per token.
"""

import numpy as np

from refqwen.model.attention import causal_attention
from refqwen.model.cache import KVCache
from refqwen.model.dca import dual_chunk_attention
from refqwen.model.linear import embed, linear
from refqwen.model.mlp import swiglu
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

    def warm_up(self, model=None) -> None:
        """Called once when a model is loaded (model: it; None when only the kernels are wanted): compile
        kernels, allocate device state, ..."""

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

    def new_cache(self, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCache:
        return KVCache(num_layers, num_kv_heads, head_dim)

    # The operations themselves. Each is the reference function (a staticmethod: no forwarding
    # call in between); a backend replaces one with a method of the same arguments.
    embed = staticmethod(embed)  # (ids [T], table [V, C] from prepare_embedding) -> [T, C] float32
    linear = staticmethod(linear)  # (x [T, in], W from prepare_linear, bias [out] or None) -> x Wᵀ + b [T, out]
    rms_norm = staticmethod(rms_norm)  # (x [T, C], weight [C], eps) -> [T, C]
    apply_rotary = staticmethod(apply_rotary)  # (x [T, heads, D], cos [T, D], sin [T, D]) -> [T, heads, D]
    # (q [T, H, D] at positions start .. start+T-1, keys and values [S, KV, D] as the layer's
    #  cache.append returned them: every position so far, start, window or None) -> [T, H, D]
    attention = staticmethod(causal_attention)
    # (q [T, H, D] not rotated, keys rotated by their place in their chunk and values [S, KV, D], start,
    #  the rotary inv_freq and attention factor, the DualChunkAttention config, hook) -> [T, H, D]
    dual_chunk_attention = staticmethod(dual_chunk_attention)
    swiglu = staticmethod(swiglu)  # (gate [T, I], up [T, I]) -> silu(gate) * up [T, I]
    # (x [T, C], experts: list of MLPs, chosen [T, k] int, weights [T, k])
    #   -> sum_j weights[:, j] * experts[chosen[:, j]](x) [T, C], each expert run only on its tokens
    moe_dispatch = staticmethod(dispatch_experts)
