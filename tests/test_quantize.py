"""Tests for broker.wire.quantize: the FPLD uniform quantizer with subtractive dither, and bit packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.wire.quantize import (
    code_dtype,
    dequantize,
    dither,
    pack_bits,
    packed_size,
    quantize,
    step_size,
    unpack_bits,
)

FAST = settings(max_examples=60, deadline=None)


def reference_pack(values: list[int], bits: int) -> bytes:
    """Pack with Python big ints: value i at bit offset i*bits, little-endian."""
    acc = 0
    for i, v in enumerate(values):
        acc |= int(v) << (i * bits)
    return acc.to_bytes((len(values) * bits + 7) // 8, "little")


def f32_eps(*bounds: float) -> float:
    """Slack for the final float64 -> float32 rounding of values up to max(|bounds|)."""
    return float(2 * np.spacing(np.float32(max(abs(b) for b in bounds)))) + 1e-12


def test_step_size_endpoint_inclusive() -> None:
    """The grid has 2**bits levels including both lo and hi."""
    assert step_size(-1.0, 1.0, 1) == 2.0
    assert step_size(0.0, 255.0, 8) == 1.0
    steps = step_size(np.zeros((3, 1)), np.array([[3.0], [6.0], [0.0]]), 2)
    np.testing.assert_array_equal(steps, [[1.0], [2.0], [0.0]])


def test_dither_deterministic_and_in_range() -> None:
    """The same seed regenerates the same float32 dither in [-0.5, 0.5)."""
    a, b, c = dither(7, (40, 50)), dither(7, (40, 50)), dither(8, (40, 50))
    assert a.dtype == np.float32 and a.shape == (40, 50)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= -0.5 and a.max() < 0.5


def test_quantize_dtype_by_width() -> None:
    """Codes are uint8 up to 8 bits and uint16 up to 16 bits."""
    x = np.linspace(-1, 1, 12).reshape(3, 4)
    for bits in range(1, 17):
        codes = quantize(x, bits, -1.0, 1.0)
        assert codes.dtype == code_dtype(bits) == (np.uint8 if bits <= 8 else np.uint16)
        assert codes.min() == 0 and codes.max() == (1 << bits) - 1


def test_quantize_clips_out_of_range() -> None:
    """Values outside [lo, hi] map to the end codes."""
    x = np.array([[-100.0, -1.0, 1.0, 100.0]])
    np.testing.assert_array_equal(quantize(x, 3, -1.0, 1.0), [[0, 0, 7, 7]])
    np.testing.assert_array_equal(quantize(x, 3, -1.0, 1.0, dither_seed=1), [[0, 0, 7, 7]])


def test_quantize_endpoints_reconstruct_exactly() -> None:
    """lo and hi are grid points, so plain rounding reproduces them exactly."""
    x = np.array([[-2.5, 4.0]])
    for bits in (1, 5, 16):
        codes = quantize(x, bits, -2.5, 4.0)
        np.testing.assert_array_equal(dequantize(codes, bits, -2.5, 4.0), x.astype(np.float32))


def test_quantize_flat_row() -> None:
    """A row with hi == lo gets all-zero codes and decodes to lo, dithered or not."""
    x = np.array([[3.0, 3.0, 3.0], [0.0, 1.0, 2.0]])
    lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    for seed in (None, 123):
        codes = quantize(x, 4, lo, hi, dither_seed=seed)
        np.testing.assert_array_equal(codes[0], 0)
        out = dequantize(codes, 4, lo, hi, dither_seed=seed)
        np.testing.assert_array_equal(out[0], 3.0)
        assert np.abs(out[1] - x[1]).max() <= step_size(0, 2, 4) / 2 + 1e-6


@FAST
@given(
    rows=st.integers(1, 50),
    cols=st.integers(1, 300),
    bits=st.integers(1, 16),
    per_row=st.booleans(),
    seed=st.none() | st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
)
def test_quantize_roundtrip_error_within_half_step(
    rows: int, cols: int, bits: int, per_row: bool, seed: int | None, data_seed: int, scale: float
) -> None:
    """In-range values come back within step/2, with and without dither."""
    rng = np.random.default_rng(data_seed)
    x = rng.normal(0, scale, (rows, cols)) + rng.normal(0, scale, (rows, 1))
    if per_row:
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
    else:
        lo, hi = float(x.min()), float(x.max())
    codes = quantize(x, bits, lo, hi, dither_seed=seed)
    assert codes.shape == x.shape and int(codes.max()) < 1 << bits
    out = dequantize(codes, bits, lo, hi, dither_seed=seed)
    assert out.dtype == np.float32
    tol = np.asarray(step_size(lo, hi, bits)) / 2 + f32_eps(np.max(np.abs(lo)), np.max(np.abs(hi)))
    assert np.all(np.abs(out.astype(np.float64) - x) <= tol)


def test_dequantize_dither_error_is_mean_zero() -> None:
    """Subtractive dither makes the error mean-zero with variance step**2/12, even for a constant input."""
    bits, lo, hi = 3, -1.0, 1.0
    step = step_size(lo, hi, bits)
    x = np.full((200, 1000), lo + 0.3 * step)  # deliberately between grid points
    plain = dequantize(quantize(x, bits, lo, hi), bits, lo, hi) - x
    np.testing.assert_allclose(plain, -0.3 * step, rtol=1e-5)  # plain rounding: constant bias
    errs = dequantize(quantize(x, bits, lo, hi, dither_seed=5), bits, lo, hi, dither_seed=5) - x
    sigma = step / np.sqrt(12)
    assert abs(errs.mean()) < 5 * sigma / np.sqrt(errs.size)
    assert abs(errs.std() / sigma - 1) < 0.02


def test_quantize_rejects_bad_arguments() -> None:
    """Bad widths, non-2-D input and inverted or non-finite ranges raise ValueError."""
    x = np.zeros((2, 2))
    for bad in (0, 17, 32, True, 2.0):
        with pytest.raises(ValueError):
            quantize(x, bad, 0.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        quantize(np.zeros(4), 4, 0.0, 1.0)
    with pytest.raises(ValueError):
        quantize(x, 4, 1.0, 0.0)
    with pytest.raises(ValueError):
        quantize(x, 4, 0.0, np.inf)
    with pytest.raises(ValueError):
        quantize(x, 4, np.zeros((3, 1)), np.ones((3, 1)))


@pytest.mark.parametrize("bits", range(1, 17))
def test_pack_bits_roundtrip_every_width(bits: int) -> None:
    """Every width packs into exactly ceil(n*bits/8) bytes, matches the reference layout and round-trips."""
    rng = np.random.default_rng(bits)
    for count in (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 1000, 4099):
        codes = rng.integers(0, 1 << bits, count).astype(code_dtype(bits))
        if count:
            codes[0], codes[-1] = (1 << bits) - 1, 0
        buf = pack_bits(codes, bits)
        assert isinstance(buf, bytes) and len(buf) == packed_size(count, bits) == (count * bits + 7) // 8
        if count <= 1000:
            assert buf == reference_pack(codes.tolist(), bits)
        back = unpack_bits(buf, bits, count)
        assert back.dtype == code_dtype(bits)
        np.testing.assert_array_equal(back, codes)


def test_pack_bits_little_endian_layout() -> None:
    """First value sits in the lowest bits of the first byte."""
    assert pack_bits(np.array([1, 2]), 4) == bytes([0x21])
    assert pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1) == bytes([0x01, 0x01])
    assert pack_bits(np.array([0b101, 0b011]), 3) == bytes([0b011101])
    assert pack_bits(np.array([0xABC]), 12) == bytes([0xBC, 0x0A])
    assert pack_bits(np.array([0x1234]), 16) == bytes([0x34, 0x12])
    assert pack_bits(np.array([3, 0, 1, 2, 1]), 2) == bytes([0b10010011, 0b01])


@FAST
@given(bits=st.integers(1, 16), data=st.data())
def test_pack_bits_roundtrip_property(bits: int, data: st.DataObject) -> None:
    """Arbitrary code lists survive pack/unpack and match the reference packer."""
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=200))
    buf = pack_bits(np.array(values, dtype=np.int64), bits)
    assert buf == reference_pack(values, bits)
    assert unpack_bits(buf, bits, len(values)).tolist() == values


def test_unpack_bits_wrong_length() -> None:
    """A buffer of any length other than the exact packed size is rejected."""
    buf = pack_bits(np.arange(10), 4)
    for bad in (buf[:-1], buf + b"\0", b""):
        with pytest.raises(ValueError):
            unpack_bits(bad, 4, 10)
    with pytest.raises(ValueError):
        unpack_bits(pack_bits(np.arange(3), 12), 12, 4)
    with pytest.raises(ValueError):
        unpack_bits(buf, 4, -1)


def test_pack_bits_rejects_bad_codes() -> None:
    """Codes must be integers within the width."""
    with pytest.raises(ValueError):
        pack_bits(np.array([16]), 4)
    with pytest.raises(ValueError):
        pack_bits(np.array([-1]), 4)
    with pytest.raises(ValueError):
        pack_bits(np.array([0.5]), 4)
    with pytest.raises(ValueError):
        pack_bits(np.array([1]), 0)
