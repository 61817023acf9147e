"""CuPy GPU backends: the model's operations on an NVIDIA GPU, with the weights kept there.

    cupy                int8 weights in groups of 32 (refqwen/quant.py, like numba-int8)
    cupy-int8-channel   int8 weights with one scale per output channel
    cupy-f16            float16 weights
    cupy-bf16           bfloat16 weights (held as uint16: CuPy has no bfloat16 type)

What runs where:
- decode (up to 4 tokens): GEMV kernels (backends/cuda_kernels.py) that stream each weight row
  once and accumulate in float32; decoding is memory-bound, so int8 reads half of float16's bytes;
- prefill: row tiles of the weight are dequantized to float16 and multiplied by cuBLAS on the
  tensor cores, accumulating in float32. Activations enter as float16 only after each token's
  vector is divided by a power of two at least its largest |value| (and each tile likewise), so
  nothing can overflow float16's 65504: Qwen2's activations reach thousands, and float16 that
  overflows turns outputs into "!!!!". The scales are multiplied back in float32;
- the residual stream, RMSNorm (statistics and output), rotary, attention, softmax, the MoE router
  and sampling are float32 on the device. The next token is chosen on the device
  (refqwen/generate.py runs on CuPy arrays), so a decode step returns one id, not V logits.

Host mode (`CupyBackend(host=True)`, for tests only): NumPy stands in for CuPy and each CUDA
kernel's NumPy twin (cuda_kernels.HostKernels) stands in for it, so every line of array logic
here runs, and is checked against the reference, on a machine without a GPU.
"""

import os
import warnings
from dataclasses import dataclass

import numpy as np

from refqwen import quant
from refqwen.arrays import array_module, to_host
from refqwen.backends import cuda_kernels
from refqwen.checkpoint.weights import parameter_counts
from refqwen.errors import RefqwenError, WeightsError
from refqwen.model.ops import Backend
from refqwen.quant import QUANTIZED, QuantizedWeight

TILE_ROWS = 4096  # weight rows dequantized per cuBLAS call in prefill
F16_MAX_INPUTS = 65504  # inputs scaled into [-1, 1] sum to at most I: float16 holds that for I <= 65504
SCORE_BYTES = 256 * 2**20  # attention scores [KV, G, t, S] float32 per query chunk, at most
GRAPH_POSITIONS = 1024  # a DecodeGraph is built with room for this many more positions (or twice the length)
KV_RESERVE_TOKENS = 4096  # check_fits keeps room for a KV cache of this many positions
WORKSPACE_BYTES = 2 * 2**30  # and this much for activations, dequantized tiles and cuBLAS

# storage -> (bytes per weight, bytes of scales per weight) on the device
STORAGE = {"int8-g32": (1, 4 / 32), "int8-channel": (1, 0), "float16": (2, 0), "bfloat16": (2, 0)}


@dataclass
class DeviceWeight:
    """A projection weight [O, I] as the GPU holds it. data: int8, float16 or bfloat16 bits (uint16);
    scales: [O] per channel, [O, G] per group of 32, None for 16-bit storage."""
    data: object
    scales: object
    storage: str  # "int8", "float16" or "bfloat16": which GEMV kernel reads it
    kernel_scales: object  # what the kernel reads: scales, or ones [O] for 16-bit storage

    @property
    def shape(self):
        return self.data.shape

    @property
    def group(self) -> int | None:
        return quant.GROUP if self.scales is not None and self.scales.ndim == 2 else None

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scales is None else self.scales.nbytes)

    def rows(self, start: int = 0, stop: int | None = None):
        """float32 rows [stop - start, I], dequantized where the data lives."""
        return self._float32(slice(start, stop))

    def take(self, ids):
        """float32 rows for the given row ids (the embedding lookup)."""
        return self._float32(ids)

    def _float32(self, rows):
        data = self.data[rows]
        if self.storage == "float16":
            return data.astype(np.float32)
        if self.storage == "bfloat16":
            return bf16_to_f32(data)
        return quant.dequantize(data, self.scales[rows])


def f32_to_bf16(w):
    """float32 -> bfloat16 bits (uint16), rounding to nearest even, on NumPy or CuPy arrays."""
    bits = w.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def bf16_to_f32(bits):
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


class CupyBackend(Backend):
    name = "cupy"
    description = "int8 weights in groups of 32 on an NVIDIA GPU (CuPy); float16 tensor-core prefill"
    storage = "int8-g32"
    gpu = True

    def __init__(self, host: bool = False, free_bytes: int | None = None, graphs: bool | None = None):
        """host=True: NumPy and the kernels' NumPy twins stand in for CuPy and the GPU (tests only);
        free_bytes: the memory check_fits may use in host mode (default: unlimited);
        graphs: decode dense models through a CUDA graph (DecodeGraph; default: $REFQWEN_CUDA_GRAPHS=1)."""
        self.host = host
        self._rotary_host = self._rotary_device = None  # apply_rotary's copy of this pass's cos and sin
        self._step = None  # the DecodeGraph whose step is running: embed, rotary and attention read it
        self.graphs = graphs if graphs is not None else os.environ.get("REFQWEN_CUDA_GRAPHS") == "1"
        if host:
            self.xp, self.kernels, self.free_bytes = np, cuda_kernels.HostKernels(), free_bytes
        else:
            import cupy

            self.xp, self.kernels, self.free_bytes = cupy, cuda_kernels.DeviceKernels(), None

    @classmethod
    def unavailable_reason(cls):
        return cuda_kernels.device_unavailable_reason()

    def __repr__(self):
        return f"{type(self).__name__}({'host mode' if self.host else 'GPU'})"

    # ---- load time ------------------------------------------------------------------------

    def check_fits(self, config, source: str) -> None:
        free = self._free_bytes()
        need = bytes_needed(config, self.storage)
        if free is None or need <= free:
            return
        fits = [f"{name} ({STORAGE_OF[name]}): {bytes_needed(config, STORAGE_OF[name]) / 2**30:.1f} GiB"
                for name in STORAGE_OF if bytes_needed(config, STORAGE_OF[name]) <= free]
        raise RefqwenError(
            f"{source}: does not fit on the GPU with backend {self.name}: it needs {need / 2**30:.1f} GiB "
            f"({parameter_counts(config)['total'] / 1e9:.2f} B parameters as {self.storage}, a KV cache for "
            f"{KV_RESERVE_TOKENS} positions and {WORKSPACE_BYTES / 2**30:.0f} GiB of workspace), and "
            f"{free / 2**30:.1f} GiB is free. "
            + (f"What would fit: {'; '.join(fits)}." if fits else "No cupy backend fits it on this GPU."))

    def _free_bytes(self) -> int | None:
        if self.host:
            return self.free_bytes
        return int(self.xp.cuda.runtime.memGetInfo()[0]) + int(self.xp.get_default_memory_pool().free_bytes())

    def prepare_linear(self, name, weight) -> DeviceWeight:
        xp = self.xp
        if isinstance(weight, QUANTIZED):  # a pre-quantized checkpoint
            if isinstance(weight, QuantizedWeight) and weight.scheme == self.storage:
                return self._int8(xp.asarray(weight.q), xp.asarray(weight.scales))
            if self.storage.startswith("int8"):
                raise WeightsError(f"{name} is {weight.scheme}; backend {self.name} runs {self.storage} (use "
                                   f"{'cupy-int8-channel' if self.storage == 'int8-g32' else 'cupy'} for "
                                   f"{weight.scheme} if it is int8, or cupy-f16 / numba-int4 for int4)")
            weight = weight.rows()  # an int8/int4 checkpoint on a 16-bit backend: dequantized first
        w = xp.asarray(weight, np.float32)  # [O, I] float32, copied to the device unless it is there already
        if self.storage == "float16":
            with np.errstate(over="ignore"):  # an overflow is reported by _sixteen, with the tensor's name
                return self._sixteen(w.astype(np.float16), "float16", name)
        if self.storage == "bfloat16":
            return self._sixteen(f32_to_bf16(w), "bfloat16", name)
        return self._int8(*quant.quantize(w, "g32" if self.storage == "int8-g32" else "channel"))

    def _int8(self, q, scales) -> DeviceWeight:  # scales [O, G] or [O]; the kernels read contiguous rows
        q, scales = self.xp.ascontiguousarray(q), self.xp.ascontiguousarray(scales)
        return DeviceWeight(q, scales, "int8", scales)

    def _sixteen(self, data, storage, name) -> DeviceWeight:
        if storage == "float16" and not bool(self.xp.isfinite(data).all()):
            raise WeightsError(f"{name}: a weight exceeds float16's range (65504); use cupy-bf16 or cupy")
        return DeviceWeight(self.xp.ascontiguousarray(data), None, storage, self.xp.ones(len(data), np.float32))

    def prepare_embedding(self, weight):
        return self.prepare_linear("model.embed_tokens.weight", weight)

    def prepare_float(self, name, tensor):
        return self.xp.asarray(tensor, np.float32)

    def new_cache(self, num_layers, num_kv_heads, head_dim):
        return DeviceKVCache(self.xp, self.kernels, num_layers, num_kv_heads, head_dim)

    def to_host(self, x):
        return to_host(x)

    # ---- run time -------------------------------------------------------------------------

    def embed(self, ids, table: DeviceWeight):
        ids = self._step.token if self._step else self.xp.asarray(ids)  # a graph's step reads its token on the device
        return table.take(ids)  # [T, C]

    def linear(self, x, weight: DeviceWeight, bias=None):
        """x [T, I] -> x Wᵀ + b [T, O] float32"""
        x = self.xp.asarray(x, np.float32)
        if x.shape[0] <= cuda_kernels.MAX_TOKENS:
            return self.kernels.gemv(weight, x, bias)
        y = self._gemm(x, weight)
        return y if bias is None else y + bias

    def _gemm(self, x, weight: DeviceWeight):
        """Prefill: x [T, I] @ Wᵀ, tile by tile, as float16 products accumulated in float32."""
        xp = self.xp
        T, I = x.shape
        O = weight.shape[0]
        if I > F16_MAX_INPUTS:  # a sum of I products of |v| <= 1 could pass 65504: stay float32
            return xp.concatenate([x @ weight.rows(r0, r0 + TILE_ROWS).T for r0 in range(0, O, TILE_ROWS)], axis=1)
        x16, x_scale = scaled_f16(x)  # [T, I] float16 in [-1, 1], [T, 1] powers of two
        y = xp.empty((T, O), np.float32)
        for r0 in range(0, O, TILE_ROWS):
            r1 = min(r0 + TILE_ROWS, O)
            w16, w_scale = scaled_f16(weight.rows(r0, r1), per_row=False)  # [r, I] float16, a power of two
            y[:, r0:r1] = self.kernels.matmul_f16(x16, w16).astype(np.float32) * (x_scale * w_scale)
        return y

    def rms_norm(self, x, weight, eps):
        return self.kernels.rms_norm(x, weight, eps)

    def apply_rotary(self, x, cos, sin):
        """x [T, heads, D]; cos, sin [T, D] on the host, the same arrays for every layer of one forward
        pass: copied to the device once per pass."""
        if self._step:  # a graph's step: its position's rows of the tables, the position read on the device
            return self.kernels.rotary(x, self._step.cos, self._step.sin, self._step.position)
        if self._rotary_host is None or self._rotary_host[0] is not cos or self._rotary_host[1] is not sin:
            self._rotary_host = (cos, sin)
            self._rotary_device = (self.xp.asarray(cos, np.float32), self.xp.asarray(sin, np.float32))
        return self.kernels.rotary(x, *self._rotary_device)

    def attention(self, q, keys, values, start: int, window):
        """Causal attention of q [T, H, D] at positions start .. over the cache's buffers keys, values
        [KV, capacity, D] (DeviceLayerCache.append returns them whole: the decode kernel reads them in place)
        -> [T, H, D]. Exact softmax over all visible keys, for as many queries at a time as SCORE_BYTES allows."""
        xp = self.xp
        if self._step:  # a graph's step: the keys attended follow the device position
            return self.kernels.decode_attention(q[0], keys, values, 0, window, self._step.position)[None]
        T, H, D = q.shape
        KV, S = keys.shape[0], start + T
        if T == 1 and D % 32 == 0 and D <= cuda_kernels.ATTENTION_MAX_D:  # decode: one fused kernel
            return self.kernels.decode_attention(q[0], keys, values, S, window)[None]  # [1, H, D]
        G = H // KV  # query heads per key/value head
        q = q.reshape(T, KV, G, D).transpose(1, 2, 0, 3) * np.float32(D ** -0.5)  # [KV, G, T, D]
        out = xp.empty((KV, G, T, D), np.float32)
        chunk = max(1, SCORE_BYTES // (4 * H * S))  # queries per chunk
        for t0 in range(0, T, chunk):
            t1 = min(t0 + chunk, T)
            first = 0 if window is None else max(0, start + t0 - window + 1)  # earliest key any query sees
            last = start + t1  # keys first .. last-1 can be visible
            q_pos = xp.arange(start + t0, start + t1)[:, None]  # [t, 1]
            k_pos = xp.arange(first, last)[None, :]  # [1, s]
            visible = k_pos <= q_pos
            if window is not None:
                visible &= q_pos - k_pos < window
            scores = q[:, :, t0:t1] @ keys[:, None, first:last].swapaxes(-1, -2)  # [KV, G, t, s]
            scores = xp.where(visible, scores, -np.inf)
            p = xp.exp(scores - scores.max(axis=-1, keepdims=True))
            out[:, :, t0:t1] = (p @ values[:, None, first:last]) / p.sum(axis=-1, keepdims=True)  # [KV, G, t, D]
        return out.transpose(2, 0, 1, 3).reshape(T, H, D)

    def swiglu(self, gate, up):
        return self.kernels.silu_mul(gate, up)

    def decode(self, model, token: int, cache):
        """One more token's logits [1, V]: through the cache's DecodeGraph when graphs are on and the
        model is dense (MoE routing reads its choices on the host, which a graph cannot)."""
        D = model.config.head_dim
        if not self.graphs or model.config.sparse_layers or D % 32 or D > cuda_kernels.ATTENTION_MAX_D:
            return super().decode(model, token, cache)
        graph = getattr(cache, "graph", None)
        if graph is None or not graph.fits(cache):
            capacity = min(model.config.max_position_embeddings, max(2 * cache.length, cache.length + GRAPH_POSITIONS))
            try:
                graph = cache.graph = DecodeGraph(self, model, cache, capacity)
            except Exception as e:  # a GPU or CuPy that cannot capture: decode as before, and say so once
                if self.host:
                    raise
                warnings.warn(f"{self.name}: CUDA graph capture failed ({type(e).__name__}: {e}); decoding without",
                              stacklevel=2)
                self.graphs = False
                return super().decode(model, token, cache)
        return graph.step(token)

    def moe_dispatch(self, x, experts, chosen, weights):
        """Tokens are grouped per expert on the host (chosen is [T, k] small integers), gathered on
        the device, run through their expert, and scattered back weighted."""
        xp = self.xp
        chosen_host = to_host(chosen)  # [T, k]
        out = xp.zeros_like(x)
        for e in np.unique(chosen_host):
            tokens, slot = np.nonzero(chosen_host == e)  # which tokens picked e, in which of their k slots
            tokens, slot = xp.asarray(tokens), xp.asarray(slot)
            out[tokens] += weights[tokens, slot][:, None] * experts[int(e)](x[tokens])
        return out


class CupyInt8ChannelBackend(CupyBackend):
    name = "cupy-int8-channel"
    description = "int8 weights with per-output-channel scales on an NVIDIA GPU (CuPy)"
    storage = "int8-channel"


class CupyF16Backend(CupyBackend):
    name = "cupy-f16"
    description = "float16 weights on an NVIDIA GPU (CuPy), float32 accumulation"
    storage = "float16"


class CupyBF16Backend(CupyBackend):
    name = "cupy-bf16"
    description = "bfloat16 weights on an NVIDIA GPU (CuPy), float32 accumulation"
    storage = "bfloat16"


VARIANTS = {cls.name: cls for cls in (CupyBackend, CupyInt8ChannelBackend, CupyF16Backend, CupyBF16Backend)}
STORAGE_OF = {name: cls.storage for name, cls in VARIANTS.items()}


def scaled_f16(a, per_row: bool = True):
    """a [R, I] float32 -> (a / s as float16, s): s a power of two >= max |a| per row ([R, 1]) or
    for the whole array (a scalar), so |a / s| <= 1 and the division itself is exact."""
    xp = array_module(a)
    peak = xp.abs(a).max(axis=1, keepdims=True) if per_row else xp.abs(a).max()
    s = xp.exp2(xp.ceil(xp.log2(xp.maximum(peak, np.float32(2.0 ** -100))))).astype(np.float32)
    return (a / s).astype(np.float16), s


class DecodeGraph:
    """One decode step of a dense model, captured once as a CUDA graph and replayed for every token:
    one launch instead of about 18 per layer, which for small models is most of a decode step.

    What changes from step to step is read from device memory: the token id (`token`), its position
    (`position`, advanced by the step itself), the rows of the rotary tables (`cos`, `sin`, all
    positions up to `capacity`, computed once as the reference computes them), the cache slot
    written and the keys attended. The cache's buffers are sized for `capacity` positions up front,
    so their addresses stay those the graph recorded. The step's temporaries come from a memory
    pool of the graph's own, so nothing else reuses them. In host mode nothing is captured: each
    step runs the same code eagerly, and the tests check it against the reference."""

    def __init__(self, ops, model, cache, capacity: int):
        from refqwen.model.rope import rotary_cos_sin

        xp, cfg = ops.xp, model.config
        self.ops, self.model, self.cache, self.capacity = ops, model, cache, capacity
        for layer in cache.layers:
            layer.reserve(capacity)
        self.buffers = [layer.k for layer in cache.layers]  # the addresses the graph records
        cos, sin = rotary_cos_sin(cfg.rope_inv_freq, np.arange(capacity), cfg.rope_attention_factor)  # [capacity, D]
        self.cos, self.sin = xp.asarray(cos), xp.asarray(sin)
        self.token = xp.zeros(1, np.int32)
        self.position = xp.asarray([cache.length], np.int32)
        self.graph = self.logits = None
        if not ops.host:
            self._capture()

    def fits(self, cache) -> bool:
        """Whether this graph can run the next step of cache: room left, and the buffers it recorded."""
        return cache.length < self.capacity and all(a is b.k for a, b in zip(self.buffers, cache.layers))

    def _run(self):
        """The step: the model's own code, with the backend reading token and position on the device."""
        self.ops._step = self
        for layer in self.cache.layers:
            layer.step = self
        try:
            logits = self.model.logits([0], self.cache, last_only=True)  # the token id comes from self.token
        finally:
            self.ops._step = None
            for layer in self.cache.layers:
                layer.step = None
        self.position += 1
        return logits

    def _capture(self):
        cp = self.ops.xp
        self.pool = cp.cuda.MemoryPool()
        capture = cp.cuda.Stream(non_blocking=True)
        self.stream = cp.cuda.Stream()  # replays go here: a blocking stream, ordered with the default stream
        cp.cuda.Device().synchronize()  # the prefill (on the default stream) is done
        with cp.cuda.using_allocator(self.pool.malloc), capture:
            self._run()  # once for real first: compiles every kernel and fills the pool
            self.position -= 1  # (its k, v slot is written again by the first replay)
            capture.begin_capture(mode=cp.cuda.runtime.streamCaptureModeRelaxed)
            try:
                self.logits = self._run()
            finally:
                self.graph = capture.end_capture()
        cp.cuda.Device().synchronize()

    def step(self, token: int):
        """Logits [1, V] of token at the cache's next position (the array is rewritten by the next step)."""
        if int(self.cache.length) != self._expected:  # the cache grew outside the graph (more prefill)
            self.position[...] = self.cache.length
        self.token.fill(token)
        if self.graph is None:
            logits = self._run()
        else:
            self.graph.launch(self.stream)
            logits = self.logits
        for layer in self.cache.layers:
            layer.length += 1
        self._expected = self.cache.length
        return logits

    _expected = -1


class DeviceLayerCache:
    """One layer's keys and values on the device, [KV, capacity, D] each (heads first, so each head's
    keys are one contiguous matrix for the products), grown by doubling."""

    def __init__(self, xp, kernels, num_kv_heads: int, head_dim: int):
        self.xp, self.kernels = xp, kernels
        self.step = None  # the DecodeGraph whose step is running: appends go to its device position
        self.k = xp.empty((num_kv_heads, 0, head_dim), np.float32)
        self.v = xp.empty((num_kv_heads, 0, head_dim), np.float32)
        self.length = 0

    def append(self, k, v):
        """Add k, v [T, KV, D]; return the whole buffers [KV, capacity, D] (positions past S + T unused)."""
        if self.step is not None:  # a graph's step: the slot written follows the device position
            self.kernels.append_kv(k[0], v[0], self.k, self.v, self.step.position)
            return self.k, self.v
        end = self.length + k.shape[0]
        if end > self.k.shape[1]:
            self.reserve(max(end, 2 * self.k.shape[1], 256))
        self.k[:, self.length:end] = self.xp.asarray(k).transpose(1, 0, 2)
        self.v[:, self.length:end] = self.xp.asarray(v).transpose(1, 0, 2)
        self.length = end
        return self.k, self.v

    def reserve(self, capacity: int):
        """Room for `capacity` positions now, so that appends up to it keep the same buffers."""
        if capacity > self.k.shape[1]:
            self.k, self.v = (self._grow(buffer, capacity) for buffer in (self.k, self.v))

    def _grow(self, buffer, capacity):
        bigger = self.xp.empty((buffer.shape[0], capacity, buffer.shape[2]), np.float32)
        bigger[:, :self.length] = buffer[:, :self.length]
        return bigger

    @property
    def keys(self):
        """Keys [capacity, KV, D] in the reference cache's layout (the attention-pattern trace reads it)."""
        return self.k.transpose(1, 0, 2)


class DeviceKVCache:
    def __init__(self, xp, kernels, num_layers: int, num_kv_heads: int, head_dim: int):
        self.layers = [DeviceLayerCache(xp, kernels, num_kv_heads, head_dim) for _ in range(num_layers)]
        self.graph = None  # the DecodeGraph that decodes this sequence, once there is one

    @property
    def length(self) -> int:
        return self.layers[0].length

    def reserve(self, positions: int):
        """Room for `positions` in every layer (refqwen.model.cache.KVCache.reserve)."""
        for layer in self.layers:
            layer.reserve(positions)


def bytes_needed(config, storage: str, kv_tokens: int = KV_RESERVE_TOKENS) -> int:
    """Device bytes to hold a model of this config with this weight storage, a float32 KV cache for
    kv_tokens positions, and the workspace."""
    from refqwen.checkpoint.weights import expected_shapes

    per_weight, per_scale = STORAGE[storage]
    total = 0
    for name, shape in expected_shapes(config).items():
        n = int(np.prod(shape))
        if len(shape) == 2 and not name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
            total += n * (per_weight + per_scale) + (4 * shape[0] if storage == "int8-channel" else 0)
        else:  # norms, biases, router and shared-expert gate stay float32
            total += 4 * n
    kv = 2 * config.num_hidden_layers * kv_tokens * config.num_key_value_heads * config.head_dim * 4
    return total + kv + WORKSPACE_BYTES
