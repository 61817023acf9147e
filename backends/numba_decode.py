"""The Numba backends' decode step: the model's own kernel calls, without the model's Python between them.

A decode step of a dense model calls the backend ~400 times from Python: per layer two RMSNorms, seven
projections (four GEMVs once q/k/v and gate/up are fused), bias adds, two rotaries, the cache append,
attention, SwiGLU and two residual adds, each through trace hooks, shape checks and fresh arrays. With every
layer's weights streaming through the CPU's caches that Python runs cold: in the model (numba-w4a8, 512 cached
positions) it took ~12 of a step's 31 ms, where the GEMV kernels took 20.

`LeanDecode` runs the layers as the same kernels, called in the same order on the same numbers, so its logits
equal the model's step bit for bit (tests/test_fused_decode.py). What it drops: the calls are bound once per
model (each projection's kernel and arrays, q/k/v and gate/up as their fused matrices), and every intermediate
lives in a buffer reused across steps. The backend's `decode` runs it where it applies; elsewhere (a trace
running, a MoE layer, Dual Chunk Attention, projections left unfused) the model's own step runs.

Shapes: C hidden size, H query heads, KV key/value heads, D head size, I MLP width.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np

from refqwen.backends import numba_attention, numba_math
from refqwen.model.mlp import MLP
from refqwen.model.rope import rotary_cos_sin


@dataclass
class LayerCalls:
    """One decoder layer's weights, each projection as its bound kernel f(x [in], y [out])."""
    attn_norm: np.ndarray  # [C]
    qkv: Callable  # [C] -> [(H + 2 KV) D]: q, k, v rows of one fused matrix
    qkv_bias: np.ndarray | None  # [(H + 2 KV) D]
    o: Callable  # [H D] -> [C]
    mlp_norm: np.ndarray  # [C]
    gate_up: Callable  # [C] -> [2 I]: gate, up rows of one fused matrix
    down: Callable  # [I] -> [C]
    window: int | None


class LeanDecode:
    """A dense model's decode step, bound to its weights: `step(model, token, cache)` -> logits [1, V]."""

    def __init__(self, model, backend, layers: list[LayerCalls]):
        cfg = model.config
        H, KV, D, C, I = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                          cfg.intermediate_size)
        self.backend, self.layers, self.eps = backend, layers, np.float32(cfg.rms_norm_eps)
        self.x, self.normed, self.o, self.down = (np.empty((1, C), np.float32) for _ in range(4))
        self.qkv = np.empty((1, (H + 2 * KV) * D), np.float32)
        self.q_raw = self.qkv[:, :H * D].reshape(1, H, D)  # views of the fused projection's output
        self.k_raw = self.qkv[:, H * D:(H + KV) * D].reshape(1, KV, D)
        self.v = self.qkv[:, (H + KV) * D:].reshape(1, KV, D)
        self.q, self.k, self.z = np.empty((1, H, D), np.float32), np.empty((1, KV, D), np.float32), \
            np.empty((1, H, D), np.float32)
        self.lse, self.lo, self.hi = np.empty((1, H), np.float32), np.empty(1, np.int64), np.empty(1, np.int64)
        self.gate_up, self.act = np.empty((1, 2 * I), np.float32), np.empty((1, I), np.float32)
        self.gate, self.up = self.gate_up[:, :I], self.gate_up[:, I:]

    @classmethod
    def plan(cls, model, backend) -> "LeanDecode | None":
        """The step for model, or None where it does not apply (the model's own step runs)."""
        cfg = model.config
        if cfg.dual_chunk_attention:
            return None
        layers = []
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            qkv = _fused_weight(attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up = _fused_weight(mlp.gate_proj, mlp.up_proj) if type(mlp) is MLP else None
            if qkv is None or gate_up is None or attn.dca is not None or gate_up.shape[0] != 2 * cfg.intermediate_size:
                return None
            bias = None if attn.q_bias is None else np.concatenate([attn.q_bias, attn.k_bias, attn.v_bias])
            layers.append(LayerCalls(layer.attn_norm, backend.row_gemv(qkv), bias, backend.row_gemv(attn.o_proj),
                                     layer.mlp_norm, backend.row_gemv(gate_up), backend.row_gemv(mlp.down_proj),
                                     layer.window))
        return cls(model, backend, layers)

    def step(self, model, token: int, cache):
        """Logits [1, V] of one more token after what cache holds, as model.logits([token], cache, last_only=True)."""
        ids, cache = model.check_input([token], cache)
        start = cache.length
        cfg = model.config
        cos, sin = rotary_cos_sin(cfg.rope_inv_freq, np.arange(start, start + 1), cfg.rope_attention_factor)
        self.x[:] = self.backend.embed(ids, model.embed_tokens)
        for layer, layer_cache in zip(self.layers, cache.layers):
            self.attention_block(layer, layer_cache, start, cos, sin)
            self.mlp_block(layer)
        numba_math.rms_norm(self.x, model.norm, self.eps, self.normed)
        return self.backend.linear(self.normed, model.lm_head)

    def attention_block(self, layer: LayerCalls, layer_cache, start, cos, sin):
        """x += o(attention(rotary(q), cache + rotary(k), cache + v)) of rms_norm(x)"""
        numba_math.rms_norm(self.x, layer.attn_norm, self.eps, self.normed)
        layer.qkv(self.normed[0], self.qkv[0])
        if layer.qkv_bias is not None:
            np.add(self.qkv[0], layer.qkv_bias, out=self.qkv[0])
        numba_math.apply_rotary(self.q_raw, cos, sin, self.q)
        numba_math.apply_rotary(self.k_raw, cos, sin, self.k)
        keys, values = layer_cache.append(self.k, self.v)  # [S, KV, D] each
        numba_attention.attend_one(self.q, keys, values, start, layer.window, self.z, self.lse, self.lo, self.hi)
        layer.o(self.z.reshape(-1), self.o[0])
        np.add(self.x, self.o, out=self.x)

    def mlp_block(self, layer: LayerCalls):
        """x += down(silu(gate) * up) of rms_norm(x)"""
        numba_math.rms_norm(self.x, layer.mlp_norm, self.eps, self.normed)
        layer.gate_up(self.normed[0], self.gate_up[0])
        numba_math.swiglu(self.gate, self.up, self.act)
        layer.down(self.act[0], self.down[0])
        np.add(self.x, self.down, out=self.x)


def _fused_weight(*members):
    """The one matrix members were fused into (backends/numba_int8.py FusedProjections), their rows in order,
    or None."""
    fused = getattr(members[0], "fused", None)
    if fused is None or any(getattr(m, "fused", None) is not fused for m in members):
        return None
    spans = [fused.rows[id(m)] for m in members]
    in_order = spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    return fused.weight if in_order and spans[-1][1] == fused.weight.shape[0] else None
