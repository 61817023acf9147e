"""Rotary position embeddings (RoPE), with YaRN context extension.

Each pair of channels (i, i + D/2) of a query or key head is rotated by the angle
`position * inv_freq[i]` (the "half-split" layout of GPT-NeoX and Qwen2, not the
interleaved pairs of llama2.c). YaRN changes only `inv_freq` and scales cos and sin.

Everything is float32, computed the way transformers computes it, because the
angles at long positions are large and their rounding shows in the logits.
"""

import math

import numpy as np


def rotation_periods(theta: float, head_dim: int) -> np.ndarray:
    """p[i] = theta^(2i/D) for i < D/2, each correctly rounded to float32.  -> [D/2] float32

    transformers computes `theta ** (arange(0, D, 2) / D)` in float32 torch. The exponents are
    exact float32 values; the power is taken in float64 and rounded once, which is the correctly
    rounded float32 power. torch's scalar code gives exactly this; its SIMD code (SLEEF, 1 ulp)
    can be 1 ulp off in a few channels, so transformers' own table depends on the CPU it runs on
    (see docs/long-context.md).
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # exact in float32
    return np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """inv_freq[i] = 1 / theta^(2i/D) for i < D/2, rounded as transformers rounds it.  -> [D/2] float32"""
    return np.float32(1.0) / rotation_periods(theta, head_dim)


def yarn_correction_range(theta, head_dim, original_max_pos, beta_fast, beta_slow, truncate=True):
    """The channel range [low, high] over which YaRN blends from extrapolation to interpolation.

    Channel i completes `L0 * inv_freq[i] / 2pi` rotations over the original context L0;
    channels that rotate more than beta_fast times keep their frequency (extrapolate),
    those that rotate fewer than beta_slow times are divided by the factor (interpolate).
    """

    def channel_with_rotations(rotations):
        return head_dim * math.log(original_max_pos / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = channel_with_rotations(beta_fast), channel_with_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def yarn_inv_freq(theta, head_dim, factor, original_max_pos, beta_fast=32.0, beta_slow=1.0, truncate=True):
    """YaRN frequencies: a linear ramp between theta^(-2i/D) and theta^(-2i/D) / factor.  -> [D/2]"""
    periods = rotation_periods(theta, head_dim)
    extrapolated = np.float32(1.0) / periods
    interpolated = np.float32(1.0) / (np.float32(factor) * periods)  # as transformers: 1/(factor p), not (1/p)/factor
    low, high = yarn_correction_range(theta, head_dim, original_max_pos, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001  # avoid 0/0, as transformers does
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    keep = np.float32(1) - ramp  # 1 where the channel keeps its original frequency
    return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's temperature correction, 0.1 ln(factor) + 1; it multiplies both cos and sin."""
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def rotary_cos_sin(inv_freq: np.ndarray, positions: np.ndarray, attention_factor: float = 1.0):
    """cos and sin tables for the given positions.  -> ([T, D], [T, D]) float32"""
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [T, D]: both halves share a frequency
    scale = np.float32(attention_factor)
    return np.cos(angles) * scale, np.sin(angles) * scale


def rotate_half(x: np.ndarray) -> np.ndarray:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate every head of x [T, H, D] by its position's angles (cos, sin: [T, D])."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
