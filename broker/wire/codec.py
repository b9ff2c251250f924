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

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from broker.wire.envelope import (
    FORMAT_VERSION,
    MAX_DIM,
    MAX_NAME_BYTES,
    PayloadError,
    check_expected,
    check_header_args,
    check_secret,
    check_seed_arg,
    field,
    is_int,
    name_error,
    open_envelope,
    payload_errors,
    read_header,
    read_seed,
    seal,
    sign,
    unpack_map,
    zstd_compress,
    zstd_decompress,
)
from broker.wire.quantize import dequantize, pack_bits, packed_size, quantize, unpack_bits

__all__ = ["FORMAT_VERSION", "HEADER_LIMIT", "KIND", "MAX_NAME_BYTES", "RAW_BITS", "PayloadError", "PayloadMeta",
           "decode_logits", "encode_logits"]

HEADER_LIMIT = 512
RAW_BITS = 32
KIND = "logits"

# Old private names, kept because sibling modules (broker/wire/weights.py) still import them from here;
# new code should import the public names from broker.wire.envelope.
_is_int, _sign, _check_secret, _name_error = is_int, sign, check_secret, name_error
_unpack_map, _field, _decompress = unpack_map, field, zstd_decompress

_BODY_KEYS = frozenset(
    {"version", "kind", "job", "round", "node", "shape", "bits", "clip", "dither_seed", "zstd", "row_params",
     "data"}
)
_F32_MAX = float(np.finfo(np.float32).max)  # a larger clip would dequantize to inf


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


def _data_size(rows: int, cols: int, bits: int) -> int:
    return rows * cols * 4 if bits == RAW_BITS else packed_size(rows * cols, bits)


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
    secret = check_secret(secret)
    check_header_args(job, round, node)
    if not is_int(bits) or not (1 <= bits <= 16 or bits == RAW_BITS):
        raise ValueError(f"bits must be in 1..16 or 32, got {bits!r}")
    if clip is not None:
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= _F32_MAX:
            raise ValueError(f"clip must be a number in (0, float32 max] or None, got {clip!r}")
        clip = float(clip)
    check_seed_arg(dither_seed)

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
    if max(rows, cols) > MAX_DIM:
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
        payload = zstd_compress(payload)

    return seal(
        secret,
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
    )


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
    secret = check_secret(secret)
    with payload_errors():
        return _decode(wire, secret, max_bytes, expect_shape, expect_job, expect_round, expect_node)


def _decode(
    wire: Any,
    secret: bytes,
    max_bytes: int,
    expect_shape: tuple[int, int] | None,
    expect_job: str | None,
    expect_round: int | None,
    expect_node: str | None,
) -> tuple[np.ndarray, PayloadMeta]:
    body, nbytes = open_envelope(wire, secret, max_bytes, _BODY_KEYS)
    job, rnd, node, rows, cols = read_header(body, KIND)
    bits = field(body, "bits", int)
    if not (1 <= bits <= 16 or bits == RAW_BITS):
        raise PayloadError(f"bits must be in 1..16 or 32, got {bits}")
    clip = body["clip"]
    if clip is not None and (not isinstance(clip, float) or not 0 < clip <= _F32_MAX):
        raise PayloadError(f"clip must be a float in (0, float32 max] or nil, got {clip!r}")
    seed = read_seed(body)
    compressed = field(body, "zstd", bool)
    row_params = body["row_params"]
    if row_params is not None and not isinstance(row_params, bytes):
        raise PayloadError(f"row_params must be bytes or nil, got {type(row_params).__name__}")
    data = field(body, "data", bytes)

    if bits == RAW_BITS and (clip is not None or seed is not None):
        raise PayloadError("raw float32 payloads carry no clip or dither_seed")
    wants_rows = bits != RAW_BITS and clip is None
    if wants_rows != (row_params is not None):
        raise PayloadError("row_params must be present exactly when quantizing without clip")

    # The caller's expectations are cheap to check, so do it before touching the data.
    check_expected(((rows, cols), job, rnd, node), expect_shape, expect_job, expect_round, expect_node)

    expected = _data_size(rows, cols, bits)
    if expected > max_bytes:
        raise PayloadError(f"shape {(rows, cols)} at {bits} bits needs {expected} bytes, over max_bytes")
    if compressed:
        data = zstd_decompress(data, expected)
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
        nbytes=nbytes,
    )
    return out, meta
