"""backends/numba_quant.py: the Numba backends quantize a float checkpoint on load with the reference's
arithmetic, bit for bit (integers, scales and zero points equal to quant.quantize_scheme's)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refqwen import quant
from refqwen.backends import numba_quant
from refqwen.errors import RefqwenError


def assert_same(got, expected):
    assert type(got) is type(expected)
    if isinstance(expected, quant.QuantizedWeight):
        assert got.scales.shape == expected.scales.shape and got.q.dtype == expected.q.dtype
        assert np.array_equal(got.q, expected.q)
    else:
        assert got.group == expected.group
        assert np.array_equal(got.q_packed, expected.q_packed) and np.array_equal(got.zeros, expected.zeros)
    assert np.array_equal(got.scales, expected.scales, equal_nan=True)


KINDS = ("normal", "quarters", "halves", "constant", "zeros", "subnormal", "huge", "positive", "negative", "one nan")


def weights(rng, R, I, kind):
    w = rng.standard_normal((R, I)).astype(np.float32)
    if kind == "quarters":  # w / s lands on many exact halves: the rounding rules decide
        w = (rng.integers(-60, 61, (R, I)) / 4).astype(np.float32)
    elif kind == "halves":  # int4: every group spans -6.5..8.5: a scale of exactly 1, the zero point 6.5
        w = (rng.integers(-13, 18, (R, I)) / 2).astype(np.float32)  # and values on exact halves
        w[:, 0::32], w[:, 1::32] = -6.5, 8.5
    elif kind == "constant":
        w[:] = np.float32(0.37)
    elif kind == "zeros":
        w[:] = 0
    elif kind == "subnormal":
        w *= np.float32(1e-41)
    elif kind == "huge":
        w *= np.float32(1e37)
    elif kind == "positive":
        w = np.abs(w)
    elif kind == "negative":
        w = -np.abs(w)
    elif kind == "one nan":
        w[rng.integers(R), rng.integers(I)] = np.nan
    return w


@settings(max_examples=60, deadline=None)
@given(R=st.integers(1, 9), groups=st.integers(1, 5), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1),
       scheme=st.sampled_from(sorted(quant.SCHEMES)), short=st.integers(0, 31))
def test_equals_the_reference_bit_for_bit(R, groups, kind, seed, scheme, short):
    bits, group = quant.SCHEMES[scheme]
    I = groups * (group or 32) - (short if bits == 8 else 0)  # int8 allows a shorter last group
    w = weights(np.random.default_rng(seed), R, max(I, 1), kind)
    assert_same(numba_quant.quantize_scheme(w, scheme), quant.quantize_scheme(w, scheme))


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 9), groups=st.integers(1, 5), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**32 - 1),
       short=st.integers(0, 31))
def test_activations_round_trip_as_the_reference(T, groups, kind, seed, short):
    """What a W8A8/W4A8 prefill multiplies: quant.dequantize(*quant.quantize_activations(x)), bit for bit."""
    x = weights(np.random.default_rng(seed), T, max(groups * 32 - short, 1), kind)
    expected = quant.dequantize(*quant.quantize_activations(x))
    assert np.array_equal(numba_quant.round_trip_activations(x), expected, equal_nan=True)


@pytest.mark.parametrize("scheme", sorted(quant.SCHEMES))
def test_a_large_matrix_and_a_memory_map(scheme, tmp_path):
    w = np.random.default_rng(0).standard_normal((300, 4864)).astype(np.float32) * 0.02
    np.save(tmp_path / "w.npy", w)
    mapped = np.load(tmp_path / "w.npy", mmap_mode="r")  # as a safetensors float32 tensor arrives
    assert_same(numba_quant.quantize_scheme(mapped, scheme), quant.quantize_scheme(w, scheme))


def test_errors_are_the_references():
    w = np.ones((2, 48), np.float32)
    for scheme in ("int4-g32", "int4-g128", "int5"):
        with pytest.raises(RefqwenError) as expected:
            quant.quantize_scheme(w, scheme, "layers.0.mlp.up_proj.weight")
        with pytest.raises(RefqwenError) as got:
            numba_quant.quantize_scheme(w, scheme, "layers.0.mlp.up_proj.weight")
        assert str(got.value) == str(expected.value)


class RowsOnDemand:
    """A matrix read a slice of rows at a time, as checkpoint/gguf.GGUFMatrix dequantizes an embedding."""

    def __init__(self, w):
        self.w, self.shape, self.largest = w, w.shape, 0

    def __getitem__(self, rows):
        part = self.w[rows]
        self.largest = max(self.largest, len(part))
        return part


@pytest.mark.parametrize("scheme", ["int8-g32", "int4-g32"])
def test_rows_are_read_in_chunks(scheme):
    """A 545 MB float32 embedding is never held whole while it is quantized (the peak RSS of a load)."""
    w = np.random.default_rng(1).standard_normal((1000, 64)).astype(np.float32)
    source = RowsOnDemand(w)
    assert_same(numba_quant.quantize_scheme(source, scheme, rows_per_chunk=96), quant.quantize_scheme(w, scheme))
    assert source.largest == 96
