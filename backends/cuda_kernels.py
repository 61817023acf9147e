"""The CUDA kernels of the cupy backends, each beside its plain NumPy twin.

Every kernel here has a twin that computes the same thing with NumPy. The backend
(backends/cupy_gpu.py) calls `DeviceKernels` on a GPU and `HostKernels` in host mode,
where NumPy stands in for CuPy; the tests check the twins against the reference on any
machine, and the real kernels against their twins on a machine with a GPU
(tests/test_gpu.py). `compile_ptx` compiles the CUDA source with NVRTC, which needs no
GPU, so CI proves that every kernel at least compiles.

    gemv_int8 / gemv_f16 / gemv_bf16   y[t, o] = sum_j w[o, j] x[t, j], T <= MAX_TOKENS tokens: decode.
                                       One warp per output row streams the row once for all T tokens,
                                       in 16-byte loads (16 int8 or 8 16-bit weights), scaled per group
                                       of 32, per row, or not at all (float16 / bfloat16 storage).
    rms_norm                           one block per row: the mean square in float32, then x r w.
    rotary                             the half-split rotation of every head, rounded as NumPy rounds it.
    decode_attention                   one new token over the KV cache: a block per query head, its warps
                                       splitting the keys with an online softmax, then merged.
    silu_mul                           silu(gate) * up, elementwise (SwiGLU's activation).
    matmul_f16                         cuBLAS: float16 inputs, float32 accumulation, float16 output
                                       (prefill; the caller scales inputs so nothing can overflow).
"""

import numpy as np

MAX_TOKENS = 4  # tokens per GEMV launch; above this the backend dequantizes tiles into cuBLAS
WARPS_PER_BLOCK = 8  # GEMV: one output row per warp, 8 rows per block of 256 threads
NORM_THREADS = 256

KINDS = {"int8": 0, "float16": 1, "bfloat16": 2}  # weight storage -> KIND in the CUDA source

CUDA_SOURCE = r"""
#define MAX_TOKENS 4
#define INFINITY __int_as_float(0x7f800000)
enum { INT8 = 0, F16 = 1, BF16 = 2 };

// float16 bits -> float through PTX (no cuda_fp16.h needed); bfloat16 is float32's top half.
__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float bf16_to_float(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }

template <int KIND> __device__ __forceinline__ float weight_at(const void* w, long i) {
    if (KIND == INT8) return (float)((const signed char*)w)[i];
    unsigned short h = ((const unsigned short*)w)[i];
    return KIND == F16 ? half_to_float(h) : bf16_to_float(h);
}

// 16 bytes of weights -> 16 (int8) or 8 (16-bit) floats
template <int KIND> __device__ __forceinline__ void unpack16(uint4 v, float* f) {
    const unsigned int words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (KIND == INT8) {
#pragma unroll
            for (int b = 0; b < 4; b++)  // byte b, sign-extended
                f[4 * i + b] = (float)(((int)(words[i] << (24 - 8 * b))) >> 24);
        } else if (KIND == F16) {
            f[2 * i] = half_to_float(words[i] & 0xffff);
            f[2 * i + 1] = half_to_float(words[i] >> 16);
        } else {
            f[2 * i] = bf16_to_float(words[i] & 0xffff);
            f[2 * i + 1] = bf16_to_float(words[i] >> 16);
        }
    }
}

// w [O, I] (KIND), scales [O] (group == 0) or [O, G] (group > 0), x [T, I] float, bias [O] (if has_bias),
// y [T, O] float.
template <int KIND>
__device__ void gemv(const void* __restrict__ w, const float* __restrict__ scales, int group,
                     const float* __restrict__ x, const float* __restrict__ bias, int has_bias,
                     float* __restrict__ y, int T, int O, int I) {
    const int BYTES = KIND == INT8 ? 1 : 2;
    const int PER_LOAD = 16 / BYTES;  // weights per 16-byte load; divides a group of 32
    const int lane = threadIdx.x & 31;
    const long o = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (o >= O) return;
    const int G = group > 0 ? (I + group - 1) / group : 1;
    const char* row = (const char*)w + o * (long)I * BYTES;
    float acc[MAX_TOKENS] = {0.f, 0.f, 0.f, 0.f};
    if ((I * BYTES) % 16 == 0) {  // rows start 16-byte aligned: vector loads, one group per load
        const uint4* vrow = (const uint4*)row;
        for (int v = lane; v < I * BYTES / 16; v += 32) {
            float f[16];
            unpack16<KIND>(vrow[v], f);
            const int j = v * PER_LOAD;
            const float s = group > 0 ? scales[o * G + j / group] : 1.f;
#pragma unroll
            for (int t = 0; t < MAX_TOKENS; t++) {
                if (t < T) {
                    const float4* xv = (const float4*)(x + (long)t * I + j);
                    float sum = 0.f;
#pragma unroll
                    for (int k = 0; k < PER_LOAD / 4; k++) {
                        const float4 xx = xv[k];
                        sum += f[4 * k] * xx.x + f[4 * k + 1] * xx.y + f[4 * k + 2] * xx.z + f[4 * k + 3] * xx.w;
                    }
                    acc[t] += sum * s;
                }
            }
        }
    } else {  // odd sizes: one weight at a time
        for (int j = lane; j < I; j += 32) {
            const float wj = weight_at<KIND>(row, j) * (group > 0 ? scales[o * G + j / group] : 1.f);
            for (int t = 0; t < T; t++) acc[t] += wj * x[(long)t * I + j];
        }
    }
    for (int t = 0; t < T; t++) {
        float a = acc[t];
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) a += __shfl_down_sync(0xffffffffu, a, offset);
        if (lane == 0) y[(long)t * O + o] = (group > 0 ? a : a * scales[o]) + (has_bias ? bias[o] : 0.f);
    }
}

#define GEMV_ARGS const void* w, const float* scales, int group, const float* x, const float* bias, int has_bias, \
                  float* y, int T, int O, int I
extern "C" __global__ void gemv_int8(GEMV_ARGS) { gemv<INT8>(w, scales, group, x, bias, has_bias, y, T, O, I); }
extern "C" __global__ void gemv_f16(GEMV_ARGS) { gemv<F16>(w, scales, group, x, bias, has_bias, y, T, O, I); }
extern "C" __global__ void gemv_bf16(GEMV_ARGS) { gemv<BF16>(w, scales, group, x, bias, has_bias, y, T, O, I); }

// x [R, C] -> y [R, C]: y = x * (1 / sqrt(mean(x^2) + eps)) * w, statistics in float32. One block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float eps,
                                    float* __restrict__ y, int C) {
    __shared__ float partial[32];
    const float* xr = x + (long)blockIdx.x * C;
    float sum = 0.f;
    for (int j = threadIdx.x; j < C; j += blockDim.x) sum += xr[j] * xr[j];
    for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x < 32) {
        sum = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
        for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_down_sync(0xffffffffu, sum, offset);
        if (threadIdx.x == 0) partial[0] = 1.f / sqrtf(sum / C + eps);
    }
    __syncthreads();
    const float r = partial[0];
    for (int j = threadIdx.x; j < C; j += blockDim.x) y[(long)blockIdx.x * C + j] = xr[j] * r * w[j];
}

// x [T, heads, D] -> y: x * cos + rotate_half(x) * sin, with rows first_row + t of cos/sin [rows, D];
// first_row is read from the device when given (a captured decode step's position), else 0.
// rotate_half pairs channel d with d + D/2 (the half-split layout). Rounded as refqwen/model/rope.py's
// NumPy does: no fused multiply-add.
extern "C" __global__ void rotary(const float* __restrict__ x, const float* __restrict__ cos,
                                  const float* __restrict__ sin, const int* __restrict__ first_row,
                                  float* __restrict__ y, int T, int heads, int D) {
    const long n = (long)T * heads * D;
    const int half = D / 2;
    const long row0 = first_row ? *first_row : 0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        const int d = i % D;
        const long t = row0 + i / ((long)heads * D);
        const float rotated = d < half ? -x[i + half] : x[i - half];
        y[i] = __fadd_rn(__fmul_rn(x[i], cos[t * D + d]), __fmul_rn(rotated, sin[t * D + d]));
    }
}

// k, v [KV, D] of one new token -> position *position of keys, values [KV, cap, D] (a captured decode step).
extern "C" __global__ void append_kv(const float* __restrict__ k, const float* __restrict__ v,
                                     float* __restrict__ keys, float* __restrict__ values,
                                     const int* __restrict__ position, int KV, int cap, int D) {
    const long pos = *position;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < KV * D; i += gridDim.x * blockDim.x) {
        const long at = ((long)(i / D) * cap + pos) * D + i % D;
        keys[at] = k[i];
        values[at] = v[i];
    }
}

// One new token's attention over the cache (decode). q [H, D] at position S - 1, where S = *position + 1
// when position is given (a captured decode step), else S = length; keys, values [KV, cap, D], the first
// S positions valid; with window > 0 only the last `window` of them are visible; out [H, D].
// One block per query head; its warps split the keys, each keeping an online softmax (running max m,
// sum l, weighted values acc) with D/32 channels per lane; then warp 0 merges the warps' partial results.
#define MAX_WARPS 8
#define MAX_D 256
extern "C" __global__ void decode_attention(const float* __restrict__ q, const float* __restrict__ keys,
                                            const float* __restrict__ values, float* __restrict__ out,
                                            int H, int KV, int D, int cap, int window, int length,
                                            const int* __restrict__ position, float scale) {
    const int S = position ? *position + 1 : length;
    const int first = window > 0 && S > window ? S - window : 0;
    __shared__ float warp_m[MAX_WARPS], warp_l[MAX_WARPS], warp_acc[MAX_WARPS * MAX_D];
    const int h = blockIdx.x, kv = h / (H / KV);  // query head h reads key/value head h / G
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int per_lane = D / 32;  // D is a multiple of 32, at most MAX_D
    const float* k = keys + (long)kv * cap * D;
    const float* v = values + (long)kv * cap * D;
    float qs[MAX_D / 32], acc[MAX_D / 32];
    for (int i = 0; i < per_lane; i++) {
        qs[i] = q[(long)h * D + lane + 32 * i] * scale;
        acc[i] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = first + warp; j < S; j += warps) {
        float dot = 0.f;
        for (int i = 0; i < per_lane; i++) dot += qs[i] * k[(long)j * D + lane + 32 * i];
        for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        const float m_new = fmaxf(m, dot);
        const float shrink = expf(m - m_new), p = expf(dot - m_new);  // m = -inf at first: shrink = 0
        l = l * shrink + p;
        for (int i = 0; i < per_lane; i++) acc[i] = acc[i] * shrink + p * v[(long)j * D + lane + 32 * i];
        m = m_new;
    }
    if (lane == 0) {
        warp_m[warp] = m;
        warp_l[warp] = l;
    }
    for (int i = 0; i < per_lane; i++) warp_acc[warp * D + lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float m_all = -INFINITY;
    for (int w = 0; w < warps; w++) m_all = fmaxf(m_all, warp_m[w]);
    float l_all = 0.f, o[MAX_D / 32] = {0.f};
    for (int w = 0; w < warps; w++) {
        const float c = warp_m[w] == -INFINITY ? 0.f : expf(warp_m[w] - m_all);  // a warp that saw no key adds 0
        l_all += warp_l[w] * c;
        for (int i = 0; i < per_lane; i++) o[i] += warp_acc[w * D + lane + 32 * i] * c;
    }
    for (int i = 0; i < per_lane; i++) out[(long)h * D + lane + 32 * i] = o[i] / l_all;
}

// y = silu(g) * u = g / (1 + exp(-g)) * u, as refqwen/model/mlp.py computes it; n elements
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ y,
                                    long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        y[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}
"""

KERNEL_NAMES = ("gemv_int8", "gemv_f16", "gemv_bf16", "rms_norm", "rotary", "append_kv", "decode_attention",
                "silu_mul")
ATTENTION_WARPS = 8  # decode_attention: warps per query head (MAX_WARPS in the source)
ATTENTION_MAX_D = 256
NVRTC_OPTIONS = ("-std=c++17",)


def compile_ptx(arch: str = "compute_90") -> str:
    """Compile CUDA_SOURCE to PTX with NVRTC, which needs no GPU.
    Raises RuntimeError with NVRTC's log when the source does not compile."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(CUDA_SOURCE, "refqwen_kernels.cu", [], [])
    try:
        nvrtc.compileProgram(program, [f"-arch={arch}", *NVRTC_OPTIONS])
    except nvrtc.NVRTCError as e:
        raise RuntimeError(f"NVRTC could not compile the kernels: {e}\n{nvrtc.getProgramLog(program)}") from e
    return nvrtc.getPTX(program).decode()


class DeviceKernels:
    """The CUDA kernels, compiled by CuPy on first use (and cached on disk by CuPy)."""

    def __init__(self):
        import cupy

        self.cupy = cupy
        module = cupy.RawModule(code=CUDA_SOURCE, options=NVRTC_OPTIONS)
        self.gemv_kernels = {kind: module.get_function(f"gemv_{suffix}")
                             for kind, suffix in (("int8", "int8"), ("float16", "f16"), ("bfloat16", "bf16"))}
        self.rms_norm_kernel = module.get_function("rms_norm")
        self.silu_mul_kernel = module.get_function("silu_mul")
        self.rotary_kernel = module.get_function("rotary")
        self.decode_attention_kernel = module.get_function("decode_attention")
        self.append_kv_kernel = module.get_function("append_kv")
        # float16 matrix products accumulate in float32 (cuBLAS's compute type), never in float16
        from cupy._core import _routines_linalg as linalg

        linalg.set_compute_type(np.dtype(np.float16), linalg.COMPUTE_TYPE_FP32)

    def gemv(self, weight, x, bias=None):
        """weight: a DeviceWeight [O, I]; x [T, I] float32 (T <= MAX_TOKENS); bias [O] -> x Wᵀ + b [T, O]"""
        cp = self.cupy
        T, I = x.shape
        O = weight.shape[0]
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        y = cp.empty((T, O), cp.float32)
        blocks = -(-O // WARPS_PER_BLOCK)
        self.gemv_kernels[weight.storage]((blocks,), (32 * WARPS_PER_BLOCK,),
                                          (weight.data, weight.kernel_scales, np.int32(weight.group or 0), x,
                                           y if bias is None else bias, np.int32(bias is not None), y,
                                           np.int32(T), np.int32(O), np.int32(I)))
        return y

    def rotary(self, x, cos, sin, first_row=None):
        """x [T, heads, D]; cos/sin [rows, D], rows first_row .. first_row+T-1 used (first_row: a device
        int32 [1], or None for 0) -> [T, heads, D]"""
        cp = self.cupy
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        y = cp.empty_like(x)
        T, heads, D = x.shape
        blocks = max(1, min(-(-x.size // 256), 65536))
        self.rotary_kernel((blocks,), (256,), (x, cos, sin, _pointer(first_row), y, np.int32(T), np.int32(heads),
                                               np.int32(D)))
        return y

    def append_kv(self, k, v, keys, values, position):
        """Write k, v [KV, D] at position (a device int32 [1]) of keys, values [KV, capacity, D]."""
        cp = self.cupy
        KV, capacity, D = keys.shape
        self.append_kv_kernel((max(1, -(-KV * D // 256)),), (256,),
                              (cp.ascontiguousarray(k), cp.ascontiguousarray(v), keys, values, position,
                               np.int32(KV), np.int32(capacity), np.int32(D)))

    def decode_attention(self, q, keys, values, length, window, position=None):
        """q [H, D] at position length - 1 (or *position: a device int32 [1]); keys, values [KV, capacity, D]
        holding the positions so far, the last `window` visible (None: all) -> [H, D]"""
        cp = self.cupy
        H, D = q.shape
        KV, capacity = keys.shape[:2]
        out = cp.empty((H, D), cp.float32)
        self.decode_attention_kernel((H,), (32 * ATTENTION_WARPS,),
                                     (cp.ascontiguousarray(q), keys, values, out, np.int32(H), np.int32(KV),
                                      np.int32(D), np.int32(capacity), np.int32(window or 0), np.int32(length),
                                      _pointer(position), np.float32(D ** -0.5)))
        return out

    def rms_norm(self, x, w, eps):
        cp = self.cupy
        x = cp.ascontiguousarray(x, dtype=cp.float32)
        y = cp.empty_like(x)
        self.rms_norm_kernel((x.shape[0],), (NORM_THREADS,), (x, w, np.float32(eps), y, np.int32(x.shape[1])))
        return y

    def silu_mul(self, gate, up):
        cp = self.cupy
        gate, up = cp.ascontiguousarray(gate, dtype=cp.float32), cp.ascontiguousarray(up, dtype=cp.float32)
        y = cp.empty_like(gate)
        blocks = min(-(-gate.size // 256), 65536)  # a grid-stride loop covers the rest
        self.silu_mul_kernel((max(blocks, 1),), (256,), (gate, up, y, np.int64(gate.size)))
        return y

    def matmul_f16(self, a, b):
        """a [T, I] float16, b [O, I] float16 -> a bᵀ [T, O] float16, accumulated in float32."""
        return a @ b.T


class HostKernels:
    """The twins: the same computations in NumPy, for host mode and as the GPU tests' expectation."""

    def gemv(self, weight, x, bias=None):
        """weight: a DeviceWeight [O, I] holding NumPy arrays; x [T, I] float32; bias [O] -> [T, O] float32"""
        y = np.empty((x.shape[0], weight.shape[0]), np.float32)
        for r0 in range(0, weight.shape[0], 4096):  # rows in chunks: the dequantized floats stay small
            r1 = min(r0 + 4096, weight.shape[0])
            y[:, r0:r1] = x @ weight.rows(r0, r1).T
        return y if bias is None else y + bias

    def rotary(self, x, cos, sin, first_row=None):
        from refqwen.model.rope import apply_rotary

        start = 0 if first_row is None else int(first_row[0])
        return apply_rotary(x, cos[start:start + len(x)], sin[start:start + len(x)])

    def append_kv(self, k, v, keys, values, position):
        keys[:, int(position[0])] = k
        values[:, int(position[0])] = v

    def decode_attention(self, q, keys, values, length, window, position=None):
        from refqwen.model.attention import causal_attention

        length = length if position is None else int(position[0]) + 1
        k, v = keys[:, :length].transpose(1, 0, 2), values[:, :length].transpose(1, 0, 2)  # [S, KV, D]
        return causal_attention(q[None], k, v, length - 1, window)[0]

    def rms_norm(self, x, w, eps):
        from refqwen.model.norm import rms_norm

        return rms_norm(x, w, eps)

    def silu_mul(self, gate, up):
        from refqwen.model.mlp import silu

        return silu(gate) * up

    def matmul_f16(self, a, b):
        return (a.astype(np.float32) @ b.astype(np.float32).T).astype(np.float16)


def _pointer(array):
    """A kernel's optional pointer argument: the array, or a null pointer for None."""
    return np.uint64(0) if array is None else array


def device_unavailable_reason() -> str | None:
    """None if CuPy can run kernels here, else why not."""
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (pip install 'refqwen[gpu]')"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver; the message says which
        return f"no usable CUDA device ({type(e).__name__}: {e})"
    return None if count > 0 else "no CUDA device"
