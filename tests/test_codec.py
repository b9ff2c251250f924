"""Tests for broker.wire.codec: round trips, size bounds, and strict rejection of bad payloads."""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.wire.codec import (
    FORMAT_VERSION,
    HEADER_LIMIT,
    MAX_NAME_BYTES,
    PayloadError,
    PayloadMeta,
    decode_logits,
    encode_logits,
)
from broker.wire.quantize import step_size

SECRET = b"test-secret"
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def logits(rows: int = 6, cols: int = 40, seed: int = 0, scale: float = 4.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, scale, (rows, cols)) + rng.normal(0, scale, (rows, 1))).astype(np.float32)


def encode(x: np.ndarray | None = None, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(secret=SECRET, job="job-1", round=3, node="node-a", bits=8, clip=20.0)
    args.update(kw)
    return encode_logits(logits() if x is None else x, **args)


def decode(wire: bytes, **kw: Any) -> tuple[np.ndarray, PayloadMeta]:
    return decode_logits(wire, secret=SECRET, **kw)


def open_body(wire: bytes) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.unpackb(wire, raw=False)["body"], raw=False)


def forge(body: dict[str, Any], *, v: Any = FORMAT_VERSION, secret: bytes = SECRET) -> bytes:
    """Re-sign an arbitrary body, so the checks behind the HMAC can be exercised."""
    packed = msgpack.packb(body, use_bin_type=True)
    sig = hmac.new(secret, packed, hashlib.sha256).digest()
    return msgpack.packb({"v": v, "body": packed, "sig": sig}, use_bin_type=True)


def forged(**changes: Any) -> bytes:
    body = open_body(encode())
    body.update(changes)
    return forge(body)


def assert_rejected(wire: Any, match: str | None = None, **kw: Any) -> None:
    with pytest.raises(PayloadError, match=match):
        decode(wire, **kw)


def f32_eps(bound: float) -> float:
    return float(2 * np.spacing(np.float32(bound))) + 1e-12


# --- round trips -------------------------------------------------------------------------------


@FAST
@given(
    rows=st.integers(1, 50),
    cols=st.integers(1, 300),
    bits=st.integers(1, 16),
    clip=st.none() | st.sampled_from([1.0, 8.0, 20.0]),
    seed=st.none() | st.integers(0, 2**64 - 1),
    compress=st.booleans(),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_codec_roundtrip_error_within_half_step(
    rows: int, cols: int, bits: int, clip: float | None, seed: int | None, compress: bool, data_seed: int
) -> None:
    """Decoded in-range values are within step/2 in clip and row modes, dithered or not."""
    x = logits(rows, cols, data_seed)
    x[0] = x[0, 0]  # a constant row exercises the zero-step path in row mode
    wire = encode(x, bits=bits, clip=clip, dither_seed=seed, compress=compress)
    out, meta = decode(wire, expect_shape=(rows, cols), expect_job="job-1", expect_round=3, expect_node="node-a")
    assert out.dtype == np.float32 and out.shape == (rows, cols)
    assert meta == PayloadMeta("job-1", 3, "node-a", (rows, cols), bits, clip, seed, compress, len(wire))
    x64 = x.astype(np.float64)
    if clip is None:
        lo, hi = x64.min(axis=1, keepdims=True), x64.max(axis=1, keepdims=True)
        in_range = np.ones_like(x64, dtype=bool)
    else:
        lo, hi = -clip, clip
        in_range = np.abs(x64) <= clip
    tol = np.asarray(step_size(lo, hi, bits)) / 2 + f32_eps(max(np.abs(lo).max(), np.abs(hi).max()))
    err = np.abs(out.astype(np.float64) - x64)
    assert np.all((err <= tol)[np.broadcast_to(in_range, err.shape)])
    if clip is not None:  # clipped values land at most half a step outside the range
        assert np.all(np.abs(out) <= clip + step_size(-clip, clip, bits) / 2 + f32_eps(clip))


def test_codec_raw32_is_lossless() -> None:
    """bits=32 sends float32 verbatim and ignores clip and dither."""
    x = logits(5, 33) * 100
    out, meta = decode(encode(x, bits=32, clip=1.0, dither_seed=9))
    np.testing.assert_array_equal(out, x)
    assert meta.bits == 32 and meta.clip is None and meta.dither_seed is None


def test_codec_accepts_float64_and_int_input() -> None:
    """Non-float32 input is converted to float32 before quantizing."""
    x = logits(3, 7).astype(np.float64)
    np.testing.assert_array_equal(decode(encode(x, bits=32))[0], x.astype(np.float32))
    ints = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(decode(encode(ints, bits=4, clip=None))[0], ints)


def test_codec_empty_shapes() -> None:
    """Zero rows or zero columns encode and decode to the same empty shape."""
    for shape in ((0, 5), (5, 0), (0, 0)):
        for clip in (None, 20.0):
            out, meta = decode(encode(np.zeros(shape, np.float32), bits=3, clip=clip, compress=True))
            assert out.shape == shape and meta.shape == shape


def test_codec_compression_shrinks_redundant_data() -> None:
    """zstd is applied to the data and recorded in the header."""
    x = np.zeros((64, 256), np.float32)
    plain, packed = encode(x, bits=8), encode(x, bits=8, compress=True)
    assert len(packed) < len(plain) // 10
    out, meta = decode(packed)
    assert meta.compressed and not decode(plain)[1].compressed
    np.testing.assert_array_equal(out, decode(plain)[0])


def test_codec_dither_seed_matters() -> None:
    """Decoding needs the sender's dither; the seed is in the signed header."""
    x = logits()
    a, b = decode(encode(x, bits=2, dither_seed=1))[0], decode(encode(x, bits=2, dither_seed=2))[0]
    assert not np.array_equal(a, b)


# --- size ----------------------------------------------------------------------------------------


@FAST
@given(rows=st.integers(0, 80), cols=st.integers(0, 400), bits=st.integers(1, 16), row_mode=st.booleans())
def test_codec_size_bound(rows: int, cols: int, bits: int, row_mode: bool) -> None:
    """Uncompressed wire size is packed data + HEADER_LIMIT, plus 8 bytes a row in row mode."""
    name = "é" * (MAX_NAME_BYTES // 2)  # worst-case header: longest names, largest integers
    wire = encode(
        logits(rows, cols) if rows and cols else np.zeros((rows, cols), np.float32),
        job=name, node=name, round=2**63 - 1, dither_seed=2**64 - 1, bits=bits, clip=None if row_mode else 20.0,
    )
    bound = math.ceil(rows * cols * bits / 8) + HEADER_LIMIT + (8 * rows if row_mode else 0)
    assert len(wire) <= bound


def test_codec_size_bound_large_shapes() -> None:
    """The bound holds when shape and body lengths need the widest msgpack headers."""
    name = "x" * MAX_NAME_BYTES
    for shape in ((70_000, 1), (1, 70_000), (300, 300)):
        for bits in (1, 16, 32):
            wire = encode(np.ones(shape, np.float32), job=name, node=name, round=2**63 - 1,
                          dither_seed=2**64 - 1, bits=bits, clip=3.0)
            assert len(wire) <= math.ceil(shape[0] * shape[1] * bits / 8) + HEADER_LIMIT


# --- encode validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"bits": 0}, {"bits": 17}, {"bits": 31}, {"bits": 33}, {"bits": True}, {"bits": 8.0},
        {"secret": b""}, {"clip": 0.0}, {"clip": -1.0}, {"clip": float("nan")}, {"clip": float("inf")},
        {"job": ""}, {"job": "j" * (MAX_NAME_BYTES + 1)}, {"node": 5}, {"round": -1}, {"round": True},
        {"dither_seed": -1}, {"dither_seed": 2**64},
    ],
)
def test_encode_rejects_bad_arguments(kw: dict[str, Any]) -> None:
    """Invalid parameters raise ValueError before anything is built."""
    with pytest.raises(ValueError):
        encode(**kw)


@pytest.mark.parametrize(
    "x",
    [np.zeros(5, np.float32), np.zeros((2, 2, 2), np.float32), np.float32(1.0),
     np.array([[1.0, np.nan]]), np.array([[np.inf, 0.0]]), np.array([[1e39]]), np.array([["a"]])],
)
def test_encode_rejects_bad_logits(x: np.ndarray) -> None:
    """Non-2-D, non-finite, float32-overflowing and non-numeric input raise ValueError."""
    with pytest.raises(ValueError):
        encode(x)


# --- decode rejections ---------------------------------------------------------------------------


def test_decode_rejects_tampered_byte() -> None:
    """Flipping any single byte of the wire is detected."""
    wire = encode(logits(4, 20), bits=4)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        assert_rejected(bytes(bad))


def test_decode_rejects_wrong_secret() -> None:
    """A payload signed with another secret fails the HMAC check."""
    with pytest.raises(PayloadError, match="signature"):
        decode_logits(encode(), secret=b"other-secret")


def test_decode_rejects_truncated() -> None:
    """Every proper prefix of a valid payload is rejected."""
    wire = encode(logits(3, 10), bits=3, clip=None)
    for n in range(len(wire)):
        assert_rejected(wire[:n])
    assert_rejected(wire + b"\x00")


def test_decode_rejects_oversize_before_parsing() -> None:
    """Payloads over max_bytes are refused, even if otherwise garbage."""
    wire = encode()
    assert decode(wire, max_bytes=len(wire))[1].nbytes == len(wire)
    assert_rejected(wire, "max_bytes", max_bytes=len(wire) - 1)
    assert_rejected(b"\xff" * 100, "max_bytes", max_bytes=99)


def test_decode_rejects_wrong_version() -> None:
    """Unknown envelope versions and body/envelope version mismatches are refused."""
    body = open_body(encode())
    assert_rejected(forge(body, v=2), "version")
    assert_rejected(forge(body, v="1"), "'v'")
    assert_rejected(forge(body, v=True), "'v'")
    assert_rejected(forged(version=2), "version")


def test_decode_rejects_expectation_mismatch() -> None:
    """expect_shape/job/round/node must match the signed header."""
    wire = encode(logits(6, 40))
    decode(wire, expect_shape=(6, 40), expect_job="job-1", expect_round=3, expect_node="node-a")
    assert_rejected(wire, "shape", expect_shape=(40, 6))
    assert_rejected(wire, "job", expect_job="job-2")
    assert_rejected(wire, "round", expect_round=4)
    assert_rejected(wire, "node", expect_node="node-b")


@pytest.mark.parametrize(
    "wire",
    [b"", b"\x00", b"\xc1", b"garbage bytes", b"\x93\x01\x02\x03", msgpack.packb([1, 2]), msgpack.packb(None),
     msgpack.packb({"v": 1}), msgpack.packb({1: 2}), msgpack.packb({"v": 1, "body": b"", "sig": b""}),
     bytes(range(256)), "not bytes", None, 12],
)
def test_decode_rejects_garbage(wire: Any) -> None:
    """Random bytes, wrong msgpack types and non-bytes input all raise PayloadError."""
    assert_rejected(wire)


def test_decode_rejects_envelope_fields() -> None:
    """Missing, extra or mistyped envelope fields are refused."""
    good = msgpack.unpackb(encode(), raw=False)
    for change in ({"sig": "text"}, {"body": "text"}, {"extra": 1}, {"sig": good["sig"][:16]}):
        assert_rejected(msgpack.packb({**good, **change}, use_bin_type=True))
    del good["sig"]
    assert_rejected(msgpack.packb(good, use_bin_type=True), "missing")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"kind": "weights"}, "kind"),
        ({"job": 7}, "job"),
        ({"job": ""}, "job"),
        ({"node": None}, "node"),
        ({"round": "3"}, "round"),
        ({"round": -1}, "round"),
        ({"round": True}, "round"),
        ({"shape": [6]}, "shape"),
        ({"shape": [6, 40, 1]}, "shape"),
        ({"shape": [6, -40]}, "shape"),
        ({"shape": [6.0, 40]}, "shape"),
        ({"shape": "6x40"}, "shape"),
        ({"shape": [40, 6]}, None),  # same element count: still fine to decode, different matrix
        ({"shape": [7, 40]}, "data"),
        ({"bits": 0}, "bits"),
        ({"bits": 17}, "bits"),
        ({"bits": 64}, "bits"),
        ({"bits": "8"}, "bits"),
        ({"clip": 0.0}, "clip"),
        ({"clip": float("nan")}, "clip"),
        ({"clip": float("inf")}, "clip"),
        ({"clip": 20}, "clip"),
        ({"dither_seed": -1}, "dither_seed"),
        ({"dither_seed": 1.5}, "dither_seed"),
        ({"zstd": 1}, "zstd"),
        ({"zstd": True}, "zstd"),
        ({"data": "text"}, "data"),
        ({"row_params": b"\0" * 48}, "row_params"),
        ({"row_params": "x"}, "row_params"),
    ],
)
def test_decode_rejects_bad_body_fields(changes: dict[str, Any], match: str | None) -> None:
    """Correctly signed bodies with invalid field values are still refused."""
    wire = forged(**changes)
    if match is None:
        assert decode(wire)[0].shape == tuple(changes["shape"])
    else:
        assert_rejected(wire, match)


def test_decode_rejects_missing_and_extra_body_fields() -> None:
    """The body must have exactly the documented fields."""
    body = open_body(encode())
    del body["dither_seed"]
    assert_rejected(forge(body), "missing")
    assert_rejected(forged(extra=1), "unexpected")
    assert_rejected(forge([1, 2, 3]), "map")  # type: ignore[arg-type]


def test_decode_rejects_wrong_data_length() -> None:
    """data must be exactly the packed length for shape and bits."""
    data = open_body(encode())["data"]
    assert_rejected(forged(data=data[:-1]), "data")
    assert_rejected(forged(data=data + b"\0"), "data")
    assert_rejected(forged(bits=7), "data")


def test_decode_rejects_bad_row_params() -> None:
    """Row-mode params must be 8 bytes per row, finite, with lo <= hi."""
    body = open_body(encode(logits(2, 5), clip=None))
    rp = body["row_params"]
    assert len(rp) == 16
    for bad in (rp[:-4], rp + b"\0" * 8, None):
        assert_rejected(forge({**body, "row_params": bad}), "row_params")
    nan_lo = np.frombuffer(rp, "<f4").copy()
    nan_lo[0] = np.nan
    assert_rejected(forge({**body, "row_params": nan_lo.tobytes()}), "non-finite")
    swapped = rp[8:] + rp[:8]  # hi values in the lo slot
    assert_rejected(forge({**body, "row_params": swapped}), "hi < lo")


def test_decode_rejects_raw_with_params() -> None:
    """Raw float32 payloads may not carry clip or dither, and must be finite."""
    body = open_body(encode(bits=32))
    assert_rejected(forge({**body, "clip": 20.0}), "raw")
    assert_rejected(forge({**body, "dither_seed": 3}), "raw")
    data = np.frombuffer(body["data"], "<f4").copy()
    data[5] = np.inf
    assert_rejected(forge({**body, "data": data.tobytes()}), "non-finite")


def test_decode_rejects_zstd_bomb() -> None:
    """Compressed data that would expand past the expected size is refused without expanding it."""
    expected = len(open_body(encode())["data"])
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * 2**20))
    assert len(bomb) < 10_000
    assert_rejected(forged(zstd=True, data=bomb), "zstd")
    # Same, but without a declared content size, so only the output bound stops it.
    sneaky = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 * 2**20))
    assert_rejected(forged(zstd=True, data=sneaky), "zstd")
    short = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (expected - 1))
    assert_rejected(forged(zstd=True, data=short), "zstd")
    assert_rejected(forged(zstd=True, data=b"not zstd at all"), "zstd")
    assert_rejected(forged(zstd=True, data=b""), "zstd")


def test_decode_rejects_shape_beyond_max_bytes() -> None:
    """A tiny compressed payload claiming a huge shape is refused before decompression."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (2**20))
    wire = forged(shape=[2**20, 2**10], bits=8, zstd=True, data=bomb)
    assert_rejected(wire, "max_bytes", max_bytes=2**24)
    assert_rejected(forged(shape=[2**31, 1]), "shape")


def test_decode_error_is_value_error() -> None:
    """PayloadError subclasses ValueError so generic handlers still catch it."""
    assert issubclass(PayloadError, ValueError)
    with pytest.raises(ValueError):
        decode(b"junk")


# --- fuzzing -------------------------------------------------------------------------------------

VALID = [
    encode(logits(3, 9), bits=4),
    encode(logits(3, 9), bits=5, clip=None, dither_seed=11),
    encode(logits(3, 9), bits=12, compress=True),
    encode(logits(2, 4), bits=32),
]


def decode_or_payload_error(wire: bytes) -> None:
    try:
        decode(wire)
    except PayloadError:
        pass


@FUZZ
@given(st.binary(max_size=600))
def test_decode_fuzz_arbitrary_bytes(wire: bytes) -> None:
    """Arbitrary bytes never raise anything but PayloadError."""
    decode_or_payload_error(wire)


def mutate(buf: bytes, data: st.DataObject) -> bytes:
    out = bytearray(buf)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        pos = data.draw(st.integers(0, max(len(out) - 1, 0)))
        if op == "set" and out:
            out[pos] = data.draw(st.integers(0, 255))
        elif op == "insert":
            out[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[pos : pos + data.draw(st.integers(1, 8))]
        else:
            del out[pos:]
    return bytes(out)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_decode_fuzz_mutated_wire(wire: bytes, data: st.DataObject) -> None:
    """Randomly mutated valid payloads never raise anything but PayloadError."""
    decode_or_payload_error(mutate(wire, data))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_decode_fuzz_mutated_signed_body(wire: bytes, data: st.DataObject) -> None:
    """Mutated bodies that are re-signed (a buggy or hostile key holder) still only raise PayloadError."""
    outer = msgpack.unpackb(wire, raw=False)
    body = mutate(outer["body"], data)
    sig = hmac.new(SECRET, body, hashlib.sha256).digest()
    decode_or_payload_error(msgpack.packb({"v": FORMAT_VERSION, "body": body, "sig": sig}, use_bin_type=True))


@FUZZ
@given(
    st.sampled_from(VALID),
    st.sampled_from(["job", "round", "node", "shape", "bits", "clip", "dither_seed", "zstd", "row_params", "data"]),
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40) | st.lists(st.integers(-5, 2**40), max_size=3),
)
def test_decode_fuzz_signed_field_values(wire: bytes, key: str, value: Any) -> None:
    """Any value in any signed body field is either accepted or rejected with PayloadError."""
    body = open_body(wire)
    body[key] = value
    decode_or_payload_error(forge(body))
