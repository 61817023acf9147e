"""Numba int8/int4 CPU backends: projection weights stored as int8 or packed int4 with float32
scales (refqwen/quant.py).

    numba-int8          weights int8 in groups of 32 along the input (like llama.cpp Q8_0), float32 activations
    numba-int8-channel  weights int8 with one scale per output channel
    numba-int4          weights int4 in groups of 32 with zero points, two per byte, float32 activations
                        (int8-g32 for a matrix whose input is not a multiple of 32)
    numba-w8a8          weights as numba-int8, activations quantized per token and group of 32,
                        dot products of int8 pairs accumulated in int32
    numba-w4a8          weights as numba-int4, activations as numba-w8a8: decode multiplies nibbles by
                        int8 activations in int32 (backends/int_gemv.py), about twice numba-int4's speed

The float-activation backends run a pre-quantized checkpoint of any scheme as it is (int8-channel,
int8-g32, int4-g32, int4-g128); their `layout` only decides how a float checkpoint is quantized on
load. numba-w8a8 runs int8-g32 weights only.

Decode (one token) is a parallel GEMV that streams each int8 row once: it is memory-bound,
and int8 reads a quarter of float32's bytes. Projections that read the same input (q/k/v,
gate/up) are joined into one matrix at load time and decode as one GEMV (FusedProjections).
Prefill (many tokens) dequantizes panels of 16 weight rows into float32 and runs float32 register
tiles over the tokens in Numba's thread pool (backends/numba_gemm.py: no BLAS, so no second pool
left spinning when decode starts); numba-w8a8 on a CPU with AVX-512 VNNI multiplies int8 by int8
in register tiles instead (backends/vnni.py; REFQWEN_INT8_PATH forces a path). The embedding is stored the same way and
dequantized row by row on lookup. Attention over the cache is a parallel Numba kernel
(backends/numba_attention.py); norms, rotary and the MoE router stay in float32 (the reference's
code). A dense model's decode step runs the same kernels as two compiled functions a layer, without the
model's Python between them (backends/numba_decode.py). docs/backends.md describes each kernel and its
measured speed.
"""

import weakref
from contextlib import contextmanager

import numpy as np
from threadpoolctl import ThreadpoolController

from refqwen import quant
from refqwen.backends import int_gemv, numba_attention, numba_gemm, numba_math, numba_quant, vnni
from refqwen.backends.numba_decode import LeanDecode
from refqwen.errors import WeightsError
from refqwen.model.ops import Backend
from refqwen.quant import QUANTIZED, QuantizedInt4Weight, QuantizedWeight

try:
    import numba
    from numba import njit, prange

    from refqwen.backends.prefetch import AHEAD, prefetch
except ImportError:  # reported by unavailable_reason()
    numba = None

GEMV_MAX_TOKENS = 4  # up to this many tokens, GEMV per token; above, register tiles (backends/numba_gemm.py)


_BLAS = []  # the ThreadpoolController, made on first use (it inspects the loaded libraries)


@contextmanager
def single_threaded_blas():
    """BLAS (OpenBLAS, MKL, ...) limited to the calling thread for the duration."""
    if not _BLAS:
        _BLAS.append(ThreadpoolController())
    with _BLAS[0].limit(limits=1, user_api="blas"):
        yield


class NumbaInt8Backend(Backend):
    name = "numba-int8"
    description = "int8 weights in groups of 32, float32 activations (Numba)"
    layout = "int8-g32"  # the scheme a float checkpoint is quantized to on load
    runs_schemes = tuple(quant.SCHEMES)
    quantize_activations = False

    fuse_projections = True  # q/k/v and gate/up decode as one matrix each (FusedProjections)
    lean_decode = True  # a dense model decodes through numba_decode.LeanDecode: the same kernels, less Python

    def __init__(self):
        self.int8_path = vnni.path()  # "vnni" or "portable" (REFQWEN_INT8_PATH forces one)
        self._fusion = Fusion()
        self._lean = weakref.WeakKeyDictionary()  # model -> its LeanDecode, or None where it does not apply

    @classmethod
    def unavailable_reason(cls):
        return None if numba is not None else "numba is not installed (pip install numba)"

    def warm_up(self, model=None):
        """Compile the kernels (or load them from Numba's on-disk cache) before the first token, and bind the
        decode step to the model."""
        for scheme in ("int4-g32", "int8-g32") if self.quantize_activations else ("int4-g32", "int8-g32",
                                                                                   "int8-channel"):
            self._gemv(np.ones((1, 64), np.float32), quant.quantize_scheme(np.ones((2, 64), np.float32), scheme))
        if self.quantize_activations and self.int8_path == "vnni":
            vnni.matmul_w8a8(np.ones((5, 70), np.int8), np.ones((5, 3), np.float32), np.ones((2, 70), np.int8),
                             np.ones((2, 3), np.float32), "vnni")
        numba_attention.warm_up()
        for scheme in ("int8-g32", "int8-channel", "int4-g32"):
            numba_gemm.matmul(np.ones((7, 32), np.float32), quant.quantize_scheme(np.ones((3, 32), np.float32), scheme))
        self.swiglu(np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))
        self.rms_norm(np.ones((1, 2), np.float32), np.ones(2, np.float32), 1e-6)
        self.apply_rotary(np.ones((1, 1, 2), np.float32), np.ones((1, 2), np.float32), np.ones((1, 2), np.float32))
        with single_threaded_blas():  # threadpoolctl inspects the loaded libraries once (~10 ms): not in a step
            if model is not None and self.lean_decode:
                self._lean_decode(model)

    def attention(self, q, keys, values, start, window):
        return numba_attention.attention(q, keys, values, start, window)  # parallel, bounded memory

    def swiglu(self, gate, up):
        out = np.empty(gate.shape, np.float32)
        numba_math.swiglu(np.ascontiguousarray(gate, np.float32), np.ascontiguousarray(up, np.float32), out)
        return out

    def rms_norm(self, x, weight, eps):
        out = np.empty(x.shape, np.float32)
        numba_math.rms_norm(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(weight, np.float32),
                            np.float32(eps), out)
        return out

    def apply_rotary(self, x, cos, sin):
        if x.shape[-1] % 2:  # no Qwen2 head size is odd; the reference's code says what is wrong
            return super().apply_rotary(x, cos, sin)
        out = np.empty(x.shape, np.float32)
        numba_math.apply_rotary(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(cos, np.float32),
                                np.ascontiguousarray(sin, np.float32), out)
        return out

    def dual_chunk_attention(self, q, keys, values, start, inv_freq, attention_factor, cfg, hook):
        return numba_attention.dual_chunk_attention(q, keys, values, start, inv_freq, attention_factor, cfg, hook)

    def prepare_linear(self, name, weight):
        prepared = self.convert_linear(name, weight)
        if self.fuse_projections:
            self._fusion.add(name, prepared)
        return prepared

    def convert_linear(self, name, weight):
        """One weight in this backend's form."""
        if isinstance(weight, QUANTIZED):  # a pre-quantized checkpoint runs as it is
            if weight.scheme not in self.runs_schemes:
                raise WeightsError(f"{name} is {weight.scheme}; backend {self.name} runs "
                                   f"{', '.join(self.runs_schemes)} (load this checkpoint with numba-int8 or numpy)")
            return weight
        return numba_quant.quantize_scheme(weight, self.layout, name)  # quant.quantize_scheme's, in parallel

    def prepare_embedding(self, weight):
        return self.prepare_linear("model.embed_tokens.weight", weight)

    def embed(self, ids, table) -> np.ndarray:
        return table.take(ids)  # [T, C]

    def decode(self, model, token: int, cache):
        """One token with Numba's workers only: whatever BLAS the step's float ops call runs single-threaded.
        Through LeanDecode unless a trace is running or it does not apply to the model."""
        with single_threaded_blas():
            lean = self._lean_decode(model) if self.lean_decode and model.trace_points.tracer is None else None
            return lean.step(model, token, cache) if lean is not None else super().decode(model, token, cache)

    def _lean_decode(self, model):
        if model not in self._lean:
            self._lean[model] = LeanDecode.plan(model, self)
        return self._lean[model]

    def linear(self, x, weight: QuantizedWeight, bias=None):
        T, fused = x.shape[0], getattr(weight, "fused", None)
        if T <= GEMV_MAX_TOKENS and fused is not None:
            return self._add(fused.output(x, weight, self._gemv), bias)  # siblings share one pass
        x = np.ascontiguousarray(x, np.float32)
        if T <= GEMV_MAX_TOKENS:
            y = self._gemv(x, weight)
        elif self.uses_vnni(weight):  # int8 x int8 register tiles, exact int32 group sums
            y = vnni.linear_w8a8(x, weight, "vnni")
        else:
            if self.quantize_activations:  # same products as the int32 kernel, summed in float32
                x = numba_quant.round_trip_activations(x)
            y = numba_gemm.matmul(x, weight)  # in Numba's pool, as decode: no BLAS threads left spinning
        return self._add(y, bias)

    @staticmethod
    def _add(y, bias):
        return y if bias is None else y + bias

    def uses_vnni(self, weight) -> bool:
        """Whether prefill of this weight runs the VNNI GEMM: only where activations are int8 anyway
        (numba-w8a8), so no backend's numerics change with the CPU beyond the order of float32 sums."""
        return (self.quantize_activations and self.int8_path == "vnni" and isinstance(weight, QuantizedWeight)
                and weight.scales.ndim == 2)

    def _gemv(self, x, w: QuantizedWeight) -> np.ndarray:
        """x [T, I] float32 contiguous, T <= GEMV_MAX_TOKENS -> [T, O], one GEMV per token"""
        y = np.empty((x.shape[0], w.shape[0]), np.float32)
        kernel, arrays = self.decode_gemv(w)
        for t in range(x.shape[0]):
            kernel(x[t], arrays, y[t])
        return y

    def decode_gemv(self, w):
        """(kernel, arrays) of weight w's decode GEMV: kernel(x [I] float32, arrays, y [O]) writes y = w x. One
        calling convention for every kind of weight, so that numba_decode.py compiles a layer around any."""
        if self.quantize_activations:  # int4 or int8-g32 weights (runs_schemes), int8 dot products
            return int_gemv.token_kernel(w)
        if isinstance(w, QuantizedInt4Weight):
            return gemv_int4_token, (w.q_packed, w.scales, w.zeros, w.group)
        if w.scales.ndim == 1:
            return gemv_channel_token, (w.q, w.scales)
        return int_gemv.gemv_float_token, (w.q, w.scales)


class NumbaInt8ChannelBackend(NumbaInt8Backend):
    name = "numba-int8-channel"
    description = "int8 weights with per-output-channel scales, float32 activations (Numba)"
    layout = "int8-channel"


class NumbaInt4Backend(NumbaInt8Backend):
    """Quantizes a float checkpoint to int4 on load. A matrix whose input size the int4 groups do not
    tile (only in test-sized models: every released Qwen2 size is a multiple of 128) is kept int8-g32,
    rather than refusing the whole model; a checkpoint written by refqwen quantize never has one."""
    name = "numba-int4"
    description = "int4 weights in groups of 32 with zero points, float32 activations (Numba)"
    layout = "int4-g32"

    def convert_linear(self, name, weight):
        bits, group = quant.SCHEMES[self.layout]
        if bits == 4 and not isinstance(weight, QUANTIZED) and weight.shape[1] % group:
            return numba_quant.quantize_scheme(weight, "int8-g32", name)
        return super().convert_linear(name, weight)


class NumbaW8A8Backend(NumbaInt8Backend):
    name = "numba-w8a8"
    description = "int8 weights in groups of 32 and int8 activations per token and group of 32, int32 dots (Numba)"
    runs_schemes = ("int8-g32",)
    quantize_activations = True


class NumbaW4A8Backend(NumbaInt4Backend):
    """numba-int4's weights with numba-w8a8's activations: decode runs integer dot products of the nibbles
    with int8 activations (llama.cpp's Q4 x Q8 recipe) and is bound by memory, not arithmetic."""
    name = "numba-w4a8"
    description = "int4 weights in groups of 32 with zero points, int8 activations per token and group of 32 (Numba)"
    runs_schemes = ("int4-g32", "int4-g128", "int8-g32")  # int8-g32: a matrix the int4 groups do not tile
    quantize_activations = True


# ---- projections that share an input, decoded as one matrix ----------------------------------------

FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # siblings that read the same x


class Fusion:
    """Collects sibling weights as they are prepared (names "<block>.<proj>.weight") and, once a group is
    complete, stores them as one matrix: each member's arrays become row views of it (no second copy)."""

    def __init__(self):
        self.pending = {}  # (block, group) -> {proj: weight}

    def add(self, name, weight):
        block, _, proj = name.removesuffix(".weight").rpartition(".")
        for group in FUSED:
            if proj in group:
                members = self.pending.setdefault((block, group), {})
                members[proj] = weight
                if len(members) == len(group):
                    FusedProjections.join([members[p] for p in group])
                    del self.pending[(block, group)]


class FusedProjections:
    """Several weights that read the same input, as one matrix: a decode step runs one GEMV (one parallel
    call, one pass over x) for all of them. The model still calls linear once per member with the same x:
    the first call computes every member's rows, the others take theirs from that result. A member asked
    again, or with another x, recomputes: a result is never served for an input it was not computed from."""

    def __init__(self, weight, rows):
        self.weight, self.rows = weight, rows  # the joined matrix; id(member) -> (first row, end row)
        self.x, self.y, self.waiting = None, None, set()

    @classmethod
    def join(cls, members):
        """Store members (all int8 with the same scale layout, or all int4 with the same group) as one matrix."""
        kinds = {(type(m), m.shape[1], m.scheme) for m in members}
        if len(kinds) != 1:
            return  # mixed schemes (a pre-quantized checkpoint may mix them): each stays on its own
        arrays = ("q_packed", "scales", "zeros") if isinstance(members[0], QuantizedInt4Weight) else ("q", "scales")
        joined = {a: np.concatenate([getattr(m, a) for m in members]) for a in arrays}
        weight = (QuantizedInt4Weight(**joined, group=members[0].group) if "zeros" in joined
                  else QuantizedWeight(**joined))
        rows, r0 = {}, 0
        fused = cls(weight, rows)
        for m in members:
            r1 = r0 + m.shape[0]
            for a in arrays:
                setattr(m, a, joined[a][r0:r1])  # a view: the member's own copy is freed
            rows[id(m)], m.fused, r0 = (r0, r1), fused, r1

    def output(self, x, member, gemv):
        """member's rows of (the joined matrix times x), x [T, I] -> [T, rows of member]"""
        if x is not self.x or id(member) not in self.waiting:
            self.x, self.y, self.waiting = x, gemv(np.ascontiguousarray(x, np.float32), self.weight), set(self.rows)
        self.waiting.discard(id(member))
        r0, r1 = self.rows[id(member)]
        y = self.y[:, r0:r1]
        if not self.waiting:
            self.x = self.y = None  # every member served: hold no arrays between steps
        return y


# ---- kernels: y[o] = sum over the input of w[o, j] x[j], one output row per parallel task ---------
# fastmath reassoc/contract lets LLVM vectorize the float sums (their order is not specified anyway).
# The int4 kernel keeps its lanes per row and applies each group's scale lane-wise: summing a group to
# a scalar first forces a horizontal reduction per group, which LLVM leaves scalar (measured: 3 GB/s
# against 40 GB/s for the lane-wise form on 2 cores). int8-g32 weights: int_gemv.gemv_float (LLVM IR).

FAST = {"reassoc", "contract"}
FOUR_BITS, FOUR = np.int32(15), np.int32(4)  # typed constants keep the nibble arithmetic in int32

if numba is not None:

    @njit(parallel=True, fastmath=FAST, cache=True)
    def gemv_channel(q, scales, x, y):
        """q [O, I] int8, scales [O], x [I] -> y [O]"""
        O, I = q.shape
        for o in prange(O):
            row = np.int64(q.ctypes.data) + o * q.strides[0]
            for k in range(0, I, 64):  # the lines AHEAD bytes on, one row's worth (backends/prefetch.py)
                prefetch(row + k + AHEAD)
            acc = np.float32(0)
            for j in range(I):
                acc += np.float32(q[o, j]) * x[j]
            y[o] = acc * scales[o]

    @njit(parallel=True, fastmath=FAST, cache=True)
    def gemv_int4(packed, scales, zeros, group, x_even, x_odd, y):
        """packed [O, I/2] uint8 (low nibble = even column), scales [O, G], zeros [O, G] uint8,
        x_even = x[0::2], x_odd = x[1::2] [I/2] -> y [O]; group g covers inputs group*g .. group*g + group-1.
        The nibbles are unpacked here, a group's group/2 bytes at a time, into group/2 float lanes:
        byte k of a group meets x_even[k] (low nibble) and x_odd[k] (high nibble), so every load is
        contiguous (against x interleaved, the stride-2 lanes left LLVM scalar), and the nibble
        arithmetic stays in int32 (int64 -> float32 has no packed AVX2 conversion)."""
        O = packed.shape[0]
        G = scales.shape[1]
        half = group // 2
        for o in prange(O):
            lanes = np.zeros(half, np.float32)
            for g in range(G):
                s = scales[o, g]
                z = np.float32(zeros[o, g])
                base = g * half
                for k in range(half):
                    byte = np.int32(packed[o, base + k])
                    lanes[k] += ((np.float32(byte & FOUR_BITS) - z) * x_even[base + k]
                                 + (np.float32(byte >> FOUR) - z) * x_odd[base + k]) * s
            y[o] = lanes.sum()

    @njit(cache=True)
    def gemv_int4_token(x, w, y):
        """gemv_int4 with the decode kernels' arguments: x [I], w = (packed, scales, zeros, group), y [O]."""
        gemv_int4(w[0], w[1], w[2], w[3], x[0::2].copy(), x[1::2].copy(), y)

    @njit(cache=True)
    def gemv_channel_token(x, w, y):
        """gemv_channel with the decode kernels' arguments: x [I], w = (q, scales), y [O]."""
        gemv_channel(w[0], w[1], x, y)
