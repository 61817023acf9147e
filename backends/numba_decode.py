"""The Numba backends' decode step: the model's own kernels, without the model's Python between them.

A decode step of a dense model calls the backend ~400 times from Python: per layer two RMSNorms, seven
projections (four GEMVs once q/k/v and gate/up are fused), bias adds, two rotaries, the cache append,
attention, SwiGLU and two residual adds, each through trace hooks, shape checks and fresh arrays. With every
layer's weights streaming through the CPU's caches that Python runs cold: in the model (numba-w4a8, 512 cached
positions) it took ~12 of a step's 31 ms, where the GEMV kernels took 20.

`LeanDecode` runs each layer as two compiled functions around the cache append — `attention_input` (RMSNorm,
the q/k/v GEMV, bias, rotary) and `attention_output_and_mlp` (attention, o, residual, RMSNorm, the gate/up GEMV,
SwiGLU, down, residual) — calling the same kernels in the same order on the same numbers, so its logits equal
the model's step bit for bit (tests/test_fused_decode.py). The projections' kernels are bound in at compile
time (`decode_gemv` of the backend: one calling convention for every kind of weight; q/k/v and gate/up as their
fused matrices), and every intermediate lives in a buffer reused across steps. The backend's `decode` runs it
where it applies; elsewhere (a trace running, a MoE layer, Dual Chunk Attention, projections left unfused) the
model's own step runs.

Shapes: C hidden size, H query heads, KV key/value heads, D head size, I MLP width.
"""

import functools
import types as pytypes
from dataclasses import dataclass

import numpy as np

from refqwen.model.mlp import MLP
from refqwen.model.rope import rotary_cos_sin

try:
    from numba import njit

    from refqwen.backends.numba_attention import _attention_kernel, decode_splits, first_visible_key
    from refqwen.backends.numba_math import apply_rotary, rms_norm, swiglu
except ImportError:  # the backends that use this module report numba as unavailable
    njit = None

NO_BIAS = np.zeros(0, np.float32)


@dataclass
class LayerCalls:
    """One decoder layer's weights; each projection as (kernel, arrays) of the backend's decode_gemv."""
    attn_norm: np.ndarray  # [C]
    qkv: tuple  # [C] -> [(H + 2 KV) D]: q, k, v rows of one fused matrix
    qkv_bias: np.ndarray  # [(H + 2 KV) D], or NO_BIAS
    o: tuple  # [H D] -> [C]
    mlp_norm: np.ndarray  # [C]
    gate_up: tuple  # [C] -> [2 I]: gate, up rows of one fused matrix
    down: tuple  # [I] -> [C]
    window: int | None


class LeanDecode:
    """A dense model's decode step, bound to its weights: `step(model, token, cache)` -> logits [1, V]."""

    def __init__(self, model, backend, layers: list[LayerCalls]):
        cfg = model.config
        H, KV, D, C, I = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size,
                          cfg.intermediate_size)
        self.backend, self.layers, self.eps = backend, layers, np.float32(cfg.rms_norm_eps)
        self.scale = np.float32(D ** -0.5)
        self.x, self.normed, self.o, self.down = (np.empty((1, C), np.float32) for _ in range(4))
        self.qkv = np.empty((1, (H + 2 * KV) * D), np.float32)
        self.q_raw = self.qkv[:, :H * D].reshape(1, H, D)  # views of the fused projection's output
        self.k_raw = self.qkv[:, H * D:(H + KV) * D].reshape(1, KV, D)
        self.v = self.qkv[:, (H + KV) * D:].reshape(1, KV, D)
        self.q, self.k, self.z = np.empty((1, H, D), np.float32), np.empty((1, KV, D), np.float32), \
            np.empty((1, H, D), np.float32)
        self.z_flat = self.z.reshape(-1)
        self.lse, self.lo, self.hi = np.empty((1, H), np.float32), np.empty(1, np.int64), np.empty(1, np.int64)
        self.gate_up, self.act = np.empty((1, 2 * I), np.float32), np.empty((1, I), np.float32)
        self.gate, self.up = self.gate_up[:, :I], self.gate_up[:, I:]

    @classmethod
    def plan(cls, model, backend) -> "LeanDecode | None":
        """The step for model, or None where it does not apply (the model's own step runs)."""
        cfg = model.config
        if cfg.dual_chunk_attention or njit is None:
            return None
        layers = []
        for layer in model.layers:
            attn, mlp = layer.attn, layer.mlp
            qkv = _fused_weight(attn.q_proj, attn.k_proj, attn.v_proj)
            gate_up = _fused_weight(mlp.gate_proj, mlp.up_proj) if type(mlp) is MLP else None
            if qkv is None or gate_up is None or attn.dca is not None or gate_up.shape[0] != 2 * cfg.intermediate_size:
                return None
            bias = NO_BIAS if attn.q_bias is None else np.concatenate([attn.q_bias, attn.k_bias, attn.v_bias])
            layers.append(LayerCalls(layer.attn_norm, backend.decode_gemv(qkv), bias, backend.decode_gemv(attn.o_proj),
                                     layer.mlp_norm, backend.decode_gemv(gate_up),
                                     backend.decode_gemv(mlp.down_proj), layer.window))
        lean = cls(model, backend, layers)
        lean.warm_up()
        return lean

    def warm_up(self):
        """Compile (or load from Numba's cache) the layers' functions, before the first step: each kind of layer
        runs once over a scratch cache of one position, writing only this step's own buffers."""
        scratch = np.zeros(self.k.shape, np.float32)  # [1, KV, D]
        ones = np.ones((1, self.q.shape[2]), np.float32)  # cos, sin [1, D]
        kinds = {tuple(kernel for kernel, _ in (l.qkv, l.o, l.gate_up, l.down)): l for l in self.layers}
        for layer in kinds.values():
            self.x[:] = 0
            self.lo[0], self.hi[0] = 0, 1
            self.run_layer(layer, lambda k, v: (scratch, scratch), ones, ones)

    def step(self, model, token: int, cache):
        """Logits [1, V] of one more token after what cache holds, as model.logits([token], cache, last_only=True)."""
        ids, cache = model.check_input([token], cache)
        start = cache.length
        cfg = model.config
        cos, sin = rotary_cos_sin(cfg.rope_inv_freq, np.arange(start, start + 1), cfg.rope_attention_factor)
        self.x[:] = self.backend.embed(ids, model.embed_tokens)
        for layer, layer_cache in zip(self.layers, cache.layers):
            self.lo[0] = first_visible_key(start, layer.window)
            self.hi[0] = start + 1
            self.run_layer(layer, layer_cache.append, cos, sin)
        rms_norm(self.x, model.norm, self.eps, self.normed)
        return self.backend.linear(self.normed, model.lm_head)

    def run_layer(self, layer: LayerCalls, append, cos, sin):
        """x += attention block, then x += MLP block: two compiled calls around append(k, v) -> (keys, values),
        the layer's LayerCache.append."""
        attention_input, attention_output_and_mlp = compiled_layer(layer.qkv[0], layer.o[0], layer.gate_up[0],
                                                                   layer.down[0])
        attention_input(self.x, layer.attn_norm, self.eps, self.normed, layer.qkv[1], self.qkv, layer.qkv_bias,
                        self.q_raw, self.k_raw, cos, sin, self.q, self.k)
        keys, values = append(self.k, self.v)  # [S, KV, D] each
        splits = decode_splits(int(self.hi[0] - self.lo[0]), keys.shape[1])
        attention_output_and_mlp(self.x, self.q, keys, values, self.lo, self.hi, self.scale, splits, self.z,
                                 self.z_flat, self.lse, layer.o[1], self.o, layer.mlp_norm, self.eps, self.normed,
                                 layer.gate_up[1], self.gate_up, self.gate, self.up, self.act, layer.down[1],
                                 self.down)


def attention_input(x, attn_norm, eps, normed, qkv_arrays, qkv, bias, q_raw, k_raw, cos, sin, q, k):
    """q, k rotated and v (a view of qkv) of rms_norm(x): x [1, C] -> q [1, H, D], k [1, KV, D]"""
    rms_norm(x, attn_norm, eps, normed)
    project_qkv(normed[0], qkv_arrays, qkv[0])
    for j in range(bias.shape[0]):
        qkv[0, j] += bias[j]
    apply_rotary(q_raw, cos, sin, q)
    apply_rotary(k_raw, cos, sin, k)


def attention_output_and_mlp(x, q, keys, values, lo, hi, scale, splits, z, z_flat, lse, o_arrays, o, mlp_norm, eps,
                             normed, gate_up_arrays, gate_up, gate, up, act, down_arrays, down):
    """x += o(attention(q, keys, values)); x += down(silu(gate) * up) of rms_norm(x)"""
    _attention_kernel(q, keys, values, lo, hi, scale, splits, z, lse)
    project_o(z_flat, o_arrays, o[0])
    for c in range(x.shape[1]):
        x[0, c] += o[0, c]
    rms_norm(x, mlp_norm, eps, normed)
    project_gate_up(normed[0], gate_up_arrays, gate_up[0])
    swiglu(gate, up, act)
    project_down(act[0], down_arrays, down[0])
    for c in range(x.shape[1]):
        x[0, c] += down[0, c]


@functools.cache
def compiled_layer(project_qkv, project_o, project_gate_up, project_down):
    """attention_input and attention_output_and_mlp compiled with these kernels (decode_gemv's) bound in: plain
    functions with their own globals, so that Numba's disk cache keeps them, named after the kernels (an edited
    kernel's file drops the cache: backends.drop_stale_numba_cache)."""
    kernels = dict(project_qkv=project_qkv, project_o=project_o, project_gate_up=project_gate_up,
                   project_down=project_down)
    suffix = "_".join(k.py_func.__qualname__ for k in kernels.values())
    compiled = []
    for function in (attention_input, attention_output_and_mlp):
        bound = pytypes.FunctionType(function.__code__, {**function.__globals__, **kernels}, function.__name__)
        bound.__qualname__ = f"{function.__qualname__}_{suffix}"
        compiled.append(njit(cache=True)(bound))
    return tuple(compiled)


def _fused_weight(*members):
    """The one matrix members were fused into (backends/numba_int8.py FusedProjections), their rows in order,
    or None."""
    fused = getattr(members[0], "fused", None)
    if fused is None or any(getattr(m, "fused", None) is not fused for m in members):
        return None
    spans = [fused.rows[id(m)] for m in members]
    in_order = spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    return fused.weight if in_order and spans[-1][1] == fused.weight.shape[0] else None
