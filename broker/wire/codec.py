"""Signed, compact wire format for quantized logit payloads (node -> aggregator over Redis).

A node quantizes its ``rows x cols`` logits with the FPLD quantizer (arXiv 2605.09986, see
:mod:`broker.wire.quantize`) and ships the bit-packed codes. Two range modes:

* ``clip=L``: clip everything to ``[-L, L]`` with one global affine grid, as in the paper. The only
  parameters are ``L`` and ``bits``, which live in the header.
* ``clip=None``: per-row affine grid over each row's own ``[min, max]``. Each row's ``lo`` and ``hi``
  travel as little-endian float32 (8 bytes per row) in ``row_params``: all ``lo`` values, then all
  ``hi`` values.

``bits == 32`` sends raw little-endian float32 instead (a lossless reference).

Layout (all msgpack, ``use_bin_type=True``)::

    outer = {"v": FORMAT_VERSION, "body": <msgpack bytes>, "sig": HMAC-SHA256(secret, body)}
    body  = {"version", "kind": "logits", "job", "round", "node", "shape": [rows, cols], "bits",
             "clip", "dither_seed", "zstd", "row_params": bytes | nil, "data": bytes}

``data`` is the packed codes (optionally zstd-compressed; nothing else is). The HMAC covers the
whole body and is checked before the body is parsed, so an unauthenticated sender can only make us
parse the small outer map. Headers (everything but ``data`` and ``row_params``) stay under
``HEADER_LIMIT`` bytes because names are capped at ``MAX_NAME_BYTES`` UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zstandard
from numpy.typing import ArrayLike

from broker.wire.quantize import dequantize, pack_bits, packed_size, quantize, unpack_bits

FORMAT_VERSION = 1
HEADER_LIMIT = 512
MAX_NAME_BYTES = 128
RAW_BITS = 32
KIND = "logits"

_OUTER_KEYS = frozenset({"v", "body", "sig"})
_BODY_KEYS = frozenset(
    {"version", "kind", "job", "round", "node", "shape", "bits", "clip", "dither_seed", "zstd", "row_params",
     "data"}
)
_MAX_INT = 2**63 - 1  # round must fit a signed 64-bit int on any consumer
_MAX_DIM = 2**31 - 1
_F32_MAX = float(np.finfo(np.float32).max)  # a larger clip would dequantize to inf
_MAX_SEED = 2**64 - 1  # largest integer msgpack can carry
_ZSTD_LEVEL = 3


class PayloadError(ValueError):
    """The only exception :func:`decode_logits` raises for a bad payload."""


@dataclass(frozen=True)
class PayloadMeta:
    job: str
    round: int
    node: str
    shape: tuple[int, int]
    bits: int
    clip: float | None
    dither_seed: int | None
    compressed: bool
    nbytes: int  # size of the whole wire message


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _data_size(rows: int, cols: int, bits: int) -> int:
    return rows * cols * 4 if bits == RAW_BITS else packed_size(rows * cols, bits)


def _sign(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def _check_secret(secret: Any) -> bytes:
    # A misconfigured secret is the caller's bug, not a bad payload, so this is a plain
    # ValueError/TypeError even inside decode_logits.
    if not isinstance(secret, (bytes, bytearray, memoryview)):
        raise TypeError(f"secret must be bytes, got {type(secret).__name__}")
    secret = bytes(secret)
    if not secret:
        raise ValueError("secret must be non-empty")
    return secret


def _name_error(field: str, v: Any) -> str | None:
    if not isinstance(v, str):
        return f"{field} must be a str, got {type(v).__name__}"
    if not v or len(v.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"{field} must be 1..{MAX_NAME_BYTES} UTF-8 bytes"
    return None


def encode_logits(
    logits: ArrayLike,
    *,
    secret: bytes,
    job: str,
    round: int,
    node: str,
    bits: int,
    clip: float | None = None,
    dither_seed: int | None = None,
    compress: bool = False,
) -> bytes:
    """Quantize, pack, optionally compress and sign a 2-D logit array; returns the wire bytes.

    ``bits`` in 1..16 quantizes; ``bits == 32`` sends raw float32, in which case ``clip`` and
    ``dither_seed`` do not apply and are recorded as None. Use a distinct ``dither_seed`` per
    (job, round, node) so that different nodes' dithers are independent.
    """
    secret = _check_secret(secret)
    for field, v in (("job", job), ("node", node)):
        if (err := _name_error(field, v)) is not None:
            raise ValueError(err)
    if not _is_int(round) or not 0 <= round <= _MAX_INT:
        raise ValueError(f"round must be an integer in 0..2**63-1, got {round!r}")
    if not _is_int(bits) or not (1 <= bits <= 16 or bits == RAW_BITS):
        raise ValueError(f"bits must be in 1..16 or 32, got {bits!r}")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= _F32_MAX:
            raise ValueError(f"clip must be a number in (0, float32 max] or None, got {clip!r}")
        clip = float(clip)
    if dither_seed is not None and (not _is_int(dither_seed) or not 0 <= dither_seed <= _MAX_SEED):
        raise ValueError(f"dither_seed must be an integer in 0..2**64-1 or None, got {dither_seed!r}")

    arr = np.asarray(logits)
    if arr.ndim != 2:
        raise ValueError(f"logits must be 2-D (rows x cols), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"logits must be real numbers, got dtype {arr.dtype}")
    # Everything downstream sees float32 so row ranges are exactly what the receiver gets.
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported as non-finite just below
        x = arr.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("logits contain non-finite values (or values beyond float32 range)")
    rows, cols = x.shape
    if max(rows, cols) > _MAX_DIM:
        raise ValueError(f"logits shape {x.shape} has a dimension over 2**31-1")

    row_params: bytes | None = None
    if bits == RAW_BITS:
        clip = dither_seed = None
        payload = x.astype("<f4").tobytes()
    else:
        if clip is not None:
            lo: np.ndarray | float = -clip
            hi: np.ndarray | float = clip
        else:
            if cols:
                lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
            else:
                lo = hi = np.zeros((rows, 1), dtype=np.float32)
            row_params = lo.astype("<f4").tobytes() + hi.astype("<f4").tobytes()
        payload = pack_bits(quantize(x, bits, lo, hi, dither_seed), bits)

    if compress:
        payload = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True).compress(payload)

    body = msgpack.packb(
        {
            "version": FORMAT_VERSION,
            "kind": KIND,
            "job": job,
            "round": round,
            "node": node,
            "shape": [rows, cols],
            "bits": bits,
            "clip": clip,
            "dither_seed": dither_seed,
            "zstd": bool(compress),
            "row_params": row_params,
            "data": payload,
        },
        use_bin_type=True,
    )
    return msgpack.packb({"v": FORMAT_VERSION, "body": body, "sig": _sign(secret, body)}, use_bin_type=True)


def _unpack_map(buf: bytes, what: str, keys: frozenset[str]) -> dict[str, Any]:
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


def _field(obj: dict[str, Any], key: str, types: type | tuple[type, ...], what: str = "body") -> Any:
    v = obj[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise PayloadError(f"{what} field {key!r} must not be a bool")
    if not isinstance(v, types):
        raise PayloadError(f"{what} field {key!r} has type {type(v).__name__}")
    return v


def _decompress(data: bytes, expected: int) -> bytes:
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


def decode_logits(
    wire: bytes,
    *,
    secret: bytes,
    max_bytes: int = 256 * 2**20,
    expect_shape: tuple[int, int] | None = None,
    expect_job: str | None = None,
    expect_round: int | None = None,
    expect_node: str | None = None,
) -> tuple[np.ndarray, PayloadMeta]:
    """Verify and decode a payload from :func:`encode_logits` into float32 ``rows x cols`` logits.

    Any problem with ``wire`` raises :class:`PayloadError`. ``max_bytes`` bounds both the wire size
    (checked before parsing) and the size of the decompressed packed data. A bad ``secret`` argument
    is a caller bug and raises ValueError/TypeError.
    """
    secret = _check_secret(secret)
    try:
        return _decode(wire, secret, max_bytes, expect_shape, expect_job, expect_round, expect_node)
    except PayloadError:
        raise
    except (ValueError, TypeError, ArithmeticError, LookupError) as exc:
        # Safety net: every check below should already have produced a PayloadError.
        raise PayloadError(f"malformed payload: {type(exc).__name__}: {exc}") from exc


def _decode(
    wire: Any,
    secret: bytes,
    max_bytes: int,
    expect_shape: tuple[int, int] | None,
    expect_job: str | None,
    expect_round: int | None,
    expect_node: str | None,
) -> tuple[np.ndarray, PayloadMeta]:
    if not isinstance(wire, (bytes, bytearray, memoryview)):
        raise PayloadError(f"wire must be bytes, got {type(wire).__name__}")
    wire = bytes(wire)
    if len(wire) > max_bytes:
        raise PayloadError(f"payload is {len(wire)} bytes, over max_bytes={max_bytes}")

    outer = _unpack_map(wire, "envelope", _OUTER_KEYS)
    v = _field(outer, "v", int, "envelope")
    if v != FORMAT_VERSION:
        raise PayloadError(f"unsupported format version {v!r}, this decoder reads {FORMAT_VERSION}")
    body_bytes = _field(outer, "body", bytes, "envelope")
    sig = _field(outer, "sig", bytes, "envelope")
    if not hmac.compare_digest(_sign(secret, body_bytes), sig):
        raise PayloadError("bad signature: wrong secret or tampered payload")

    body = _unpack_map(body_bytes, "body", _BODY_KEYS)
    if _field(body, "version", int) != FORMAT_VERSION:
        raise PayloadError(f"body version {body['version']!r} does not match envelope version {v}")
    if _field(body, "kind", str) != KIND:
        raise PayloadError(f"payload kind is {body['kind']!r}, expected {KIND!r}")
    for name in ("job", "node"):
        if (err := _name_error(name, body[name])) is not None:
            raise PayloadError(err)
    job, node = body["job"], body["node"]
    rnd = _field(body, "round", int)
    if not 0 <= rnd <= _MAX_INT:
        raise PayloadError(f"round {rnd} out of range")
    shape = _field(body, "shape", list)
    if len(shape) != 2 or not all(_is_int(s) and 0 <= s <= _MAX_DIM for s in shape):
        raise PayloadError(f"shape must be two integers in 0..2**31-1, got {shape!r}")
    rows, cols = shape
    bits = _field(body, "bits", int)
    if not (1 <= bits <= 16 or bits == RAW_BITS):
        raise PayloadError(f"bits must be in 1..16 or 32, got {bits}")
    clip = body["clip"]
    if clip is not None and (not isinstance(clip, float) or not 0 < clip <= _F32_MAX):
        raise PayloadError(f"clip must be a float in (0, float32 max] or nil, got {clip!r}")
    seed = body["dither_seed"]
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= _MAX_SEED):
        raise PayloadError(f"dither_seed must be a non-negative integer or nil, got {seed!r}")
    compressed = _field(body, "zstd", bool)
    row_params = body["row_params"]
    if row_params is not None and not isinstance(row_params, bytes):
        raise PayloadError(f"row_params must be bytes or nil, got {type(row_params).__name__}")
    data = _field(body, "data", bytes)

    if bits == RAW_BITS and (clip is not None or seed is not None):
        raise PayloadError("raw float32 payloads carry no clip or dither_seed")
    wants_rows = bits != RAW_BITS and clip is None
    if wants_rows != (row_params is not None):
        raise PayloadError("row_params must be present exactly when quantizing without clip")

    # The caller's expectations are cheap to check, so do it before touching the data.
    if expect_shape is not None and (rows, cols) != tuple(expect_shape):
        raise PayloadError(f"shape {(rows, cols)} does not match expected {tuple(expect_shape)}")
    if expect_job is not None and job != expect_job:
        raise PayloadError(f"job {job!r} does not match expected {expect_job!r}")
    if expect_round is not None and rnd != expect_round:
        raise PayloadError(f"round {rnd} does not match expected {expect_round}")
    if expect_node is not None and node != expect_node:
        raise PayloadError(f"node {node!r} does not match expected {expect_node!r}")

    expected = _data_size(rows, cols, bits)
    if expected > max_bytes:
        raise PayloadError(f"shape {(rows, cols)} at {bits} bits needs {expected} bytes, over max_bytes")
    if compressed:
        data = _decompress(data, expected)
    elif len(data) != expected:
        raise PayloadError(f"data is {len(data)} bytes, expected {expected} for shape {(rows, cols)}")

    if bits == RAW_BITS:
        out = np.frombuffer(data, dtype="<f4").astype(np.float32).reshape(rows, cols)
        if not np.all(np.isfinite(out)):
            raise PayloadError("raw float32 data contains non-finite values")
    else:
        if clip is not None:
            lo: np.ndarray | float = -clip
            hi: np.ndarray | float = clip
        else:
            if len(row_params) != 8 * rows:
                raise PayloadError(f"row_params is {len(row_params)} bytes, expected {8 * rows}")
            params = np.frombuffer(row_params, dtype="<f4").astype(np.float64).reshape(2, rows, 1)
            lo, hi = params[0], params[1]
            if not np.all(np.isfinite(params)):
                raise PayloadError("row_params contain non-finite values")
            if np.any(hi < lo):
                raise PayloadError("row_params have a row with hi < lo")
        codes = unpack_bits(data, bits, rows * cols).reshape(rows, cols)
        out = dequantize(codes, bits, lo, hi, seed)
        # Only reachable with ranges near float32 max, where the dither can push past it.
        if not np.all(np.isfinite(out)):
            raise PayloadError("decoded values overflow float32")

    meta = PayloadMeta(
        job=job,
        round=rnd,
        node=node,
        shape=(rows, cols),
        bits=bits,
        clip=clip,
        dither_seed=seed,
        compressed=compressed,
        nbytes=len(wire),
    )
    return out, meta
