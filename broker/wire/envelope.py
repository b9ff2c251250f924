"""The signed envelope and strict parsing shared by every payload kind in :mod:`broker.wire`.

Every payload travels as ``{"v": FORMAT_VERSION, "body": <msgpack bytes>, "sig": HMAC-SHA256(secret,
body)}``. The body is a msgpack map whose first fields (``version``, ``kind``, ``job``, ``round``,
``node``, ``shape``) mean the same thing in every kind, so their checks live here once; the kind's own
module (:mod:`broker.wire.codec`, :mod:`broker.wire.sparse`) validates the rest.

Internal to ``broker.wire``: callers use the codecs, and catch :class:`PayloadError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import zstandard

FORMAT_VERSION = 1
MAX_NAME_BYTES = 128
MAX_INT = 2**63 - 1  # round must fit a signed 64-bit int on any consumer
MAX_DIM = 2**31 - 1
MAX_SEED = 2**64 - 1  # largest integer msgpack can carry
ZSTD_LEVEL = 3

_OUTER_KEYS = frozenset({"v", "body", "sig"})


class PayloadError(ValueError):
    """The only exception the decoders of :mod:`broker.wire` raise for a bad payload."""


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def check_secret(secret: Any) -> bytes:
    # A misconfigured secret is the caller's bug, not a bad payload, so this is a plain
    # ValueError/TypeError even inside the decoders.
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    secret = bytes(secret)
    if not secret:
        raise ValueError("secret must be non-empty")
    return secret


def name_error(field: str, v: Any) -> str | None:
    if not isinstance(v, str):
        return f"{field} must be a str, got {type(v).__name__}"
    if not v or len(v.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"{field} must be 1..{MAX_NAME_BYTES} UTF-8 bytes"
    return None


def check_header_args(job: Any, round: Any, node: Any) -> None:
    """Encoder-side checks of the names and round; a bad argument is a ValueError."""
    for field_name, v in (("job", job), ("node", node)):
        if (err := name_error(field_name, v)) is not None:
            raise ValueError(err)
    if not is_int(round) or not 0 <= round <= MAX_INT:
        raise ValueError(f"round must be an integer in 0..2**63-1, got {round!r}")


def check_seed_arg(dither_seed: Any) -> None:
    if dither_seed is not None and (not is_int(dither_seed) or not 0 <= dither_seed <= MAX_SEED):
        raise ValueError(f"dither_seed must be an integer in 0..2**64-1 or None, got {dither_seed!r}")


def seal(secret: bytes, body: dict[str, Any]) -> bytes:
    """Pack ``body`` and wrap it in the signed outer map."""
    packed = msgpack.packb(body, use_bin_type=True)
    return msgpack.packb({"v": FORMAT_VERSION, "body": packed, "sig": sign(secret, packed)}, use_bin_type=True)


def unpack_map(buf: bytes, what: str, keys: frozenset[str]) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            buf,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=4 * MAX_NAME_BYTES,
            max_bin_len=len(buf),
            max_array_len=16,
            max_map_len=32,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, ValueError, UnicodeError, ...)
        raise PayloadError(f"{what} is not valid msgpack: {exc}") from exc
    if not isinstance(obj, dict):
        raise PayloadError(f"{what} must be a msgpack map, got {type(obj).__name__}")
    if set(obj) != keys:
        missing = sorted(keys - set(obj))
        extra = sorted(map(repr, set(obj) - keys))
        raise PayloadError(f"{what} fields wrong: missing {missing}, unexpected {extra}")
    return obj


def field(obj: dict[str, Any], key: str, types: type | tuple[type, ...], what: str = "body") -> Any:
    v = obj[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise PayloadError(f"{what} field {key!r} must not be a bool")
    if not isinstance(v, types):
        raise PayloadError(f"{what} field {key!r} has type {type(v).__name__}")
    return v


def open_envelope(
    wire: Any, secret: bytes, max_bytes: int, body_keys: frozenset[str]
) -> tuple[dict[str, Any], int]:
    """Size-check, verify and parse ``wire``; returns the body map (exactly ``body_keys``) and the wire size.

    The HMAC is checked before the body is parsed, so an unauthenticated sender can only make us
    parse the small outer map.
    """
    if not isinstance(wire, (bytes, bytearray, memoryview)):
        raise PayloadError(f"wire must be bytes, got {type(wire).__name__}")
    wire = bytes(wire)
    if len(wire) > max_bytes:
        raise PayloadError(f"payload is {len(wire)} bytes, over max_bytes={max_bytes}")

    outer = unpack_map(wire, "envelope", _OUTER_KEYS)
    v = field(outer, "v", int, "envelope")
    if v != FORMAT_VERSION:
        raise PayloadError(f"unsupported format version {v!r}, this decoder reads {FORMAT_VERSION}")
    body_bytes = field(outer, "body", bytes, "envelope")
    sig = field(outer, "sig", bytes, "envelope")
    if not hmac.compare_digest(sign(secret, body_bytes), sig):
        raise PayloadError("bad signature: wrong secret or tampered payload")
    return unpack_map(body_bytes, "body", body_keys), len(wire)


def read_header(body: dict[str, Any], kind: str) -> tuple[str, int, str, int, int]:
    """Check the fields every kind shares; returns ``(job, round, node, rows, cols)``."""
    if field(body, "version", int) != FORMAT_VERSION:
        raise PayloadError(f"body version {body['version']!r} does not match envelope version {FORMAT_VERSION}")
    if field(body, "kind", str) != kind:
        raise PayloadError(f"payload kind is {body['kind']!r}, expected {kind!r}")
    for name in ("job", "node"):
        if (err := name_error(name, body[name])) is not None:
            raise PayloadError(err)
    rnd = field(body, "round", int)
    if not 0 <= rnd <= MAX_INT:
        raise PayloadError(f"round {rnd} out of range")
    shape = field(body, "shape", list)
    if len(shape) != 2 or not all(is_int(s) and 0 <= s <= MAX_DIM for s in shape):
        raise PayloadError(f"shape must be two integers in 0..2**31-1, got {shape!r}")
    return body["job"], rnd, body["node"], shape[0], shape[1]


def read_seed(body: dict[str, Any]) -> int | None:
    seed = body["dither_seed"]
    if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise PayloadError(f"dither_seed must be a non-negative integer or nil, got {seed!r}")
    return seed


def check_expected(
    got: tuple[tuple[int, int], str, int, str],
    expect_shape: tuple[int, int] | None,
    expect_job: str | None,
    expect_round: int | None,
    expect_node: str | None,
) -> None:
    """Compare ``(shape, job, round, node)`` with the caller's expectations (None: anything goes)."""
    shape, job, rnd, node = got
    if expect_shape is not None and shape != tuple(expect_shape):
        raise PayloadError(f"shape {shape} does not match expected {tuple(expect_shape)}")
    if expect_job is not None and job != expect_job:
        raise PayloadError(f"job {job!r} does not match expected {expect_job!r}")
    if expect_round is not None and rnd != expect_round:
        raise PayloadError(f"round {rnd} does not match expected {expect_round}")
    if expect_node is not None and node != expect_node:
        raise PayloadError(f"node {node!r} does not match expected {expect_node!r}")


def zstd_decompress(data: bytes, expected: int) -> bytes:
    """zstd-decompress ``data`` to exactly ``expected`` bytes, never allocating more than that."""
    try:
        declared = zstandard.frame_content_size(data)
        # A declared size makes zstd allocate it up front, so vet it before decompressing.
        if declared not in (-1, expected):
            raise PayloadError(f"zstd frame declares {declared} bytes, expected {expected}")
        # Without a declared size, max_output_size bounds the output buffer.
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(expected, 1))
    except zstandard.ZstdError as exc:
        raise PayloadError(f"zstd decompression failed: {exc}") from exc
    if len(out) != expected:
        raise PayloadError(f"zstd data decompressed to {len(out)} bytes, expected {expected}")
    return out


def zstd_compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(data)


@contextmanager
def payload_errors() -> Iterator[None]:
    """Turn any stray error from decoding into a PayloadError.

    A safety net: every check should already have produced a PayloadError.
    """
    try:
        yield
    except PayloadError:
        raise
    except (ValueError, TypeError, ArithmeticError, LookupError) as exc:
        raise PayloadError(f"malformed payload: {type(exc).__name__}: {exc}") from exc
