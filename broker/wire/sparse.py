"""Sparse logit payloads for real vocabularies: top-k log-probs, exact tail mass, shaped tail.

Dense B-bit logits (:mod:`broker.wire.codec`) cost ``V * B / 8`` bytes a position, too much at
``V ~ 50,000``; plain top-k is lossy (the top 32 of 50k tokens hold ~83% of the mass on average).
Sender and receiver both hold the broadcast student, a shared *reference* model, so a node sends

* the ids of its ``k`` most likely tokens (sorted, delta-coded, zstd-compressed),
* their log-probs, quantized on a per-row affine grid ``[lo, hi]`` at ``bits`` bits
  (:mod:`broker.wire.quantize`, optionally with subtractive dither),
* the exact log of the mass outside the top k (``tail``),

and the receiver rebuilds a full distribution whose tail has the sender's exact mass, spread in
proportion to the reference's probabilities (:mod:`broker.wire.sparse_rebuild`). With the sender's own logits
as reference and no clipping (below), the rebuilt distribution ``r`` differs from the sender's ``p``
only through the quantization error ``e_i`` of the top-k log-probs, ``|e_i| <= step/2``; since the
top-k part is renormalised to the sent mass ``M = 1 - exp(tail)``, ``KL(p || r) = M * (log E[exp(e)]
- E[e])`` under the renormalised top-k distribution, which Hoeffding's lemma bounds by
``M * step**2 / 8`` per row.

Top-k log-probs more than ``MAX_LOGP_SPAN`` nats below the row's best are sent as ``hi -
MAX_LOGP_SPAN``: such a token has under ``e**-100`` of the top token's probability, and the cap keeps
one masked or absurd logit from widening the grid of every other token in the row.

Layout: the signed envelope of :mod:`broker.wire.envelope`, with ::

    body = {"version", "kind": "sparse-logits", "job", "round", "node", "shape": [rows, V], "k",
            "bits", "dither_seed", "id_dtype": "u2" | "u4", "ids": zstd(deltas), "row_params": bytes,
            "data": packed codes}

``row_params`` is little-endian float32: all ``lo``, then all ``hi``, then all ``tail`` (``-inf`` exactly
when ``k == V``). ``ids`` decompresses to ``rows * k`` little-endian deltas: each row's first id, then
the gaps to the next (``u2`` when ``V <= 65536``, else ``u4``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from broker.wire.envelope import (
    FORMAT_VERSION,
    MAX_DIM,
    PayloadError,
    check_expected,
    check_header_args,
    check_secret,
    check_seed_arg,
    field,
    is_int,
    open_envelope,
    payload_errors,
    read_header,
    read_seed,
    seal,
    zstd_compress,
    zstd_decompress,
)
from broker.wire.quantize import MAX_BITS, dequantize, pack_bits, packed_size, quantize, unpack_bits

__all__ = ["HEADER_LIMIT", "KIND", "MAX_LOGP_SPAN", "PayloadError", "SparseLogits", "SparseMeta",
           "decode_sparse_logits", "encode_sparse_logits", "sparse_size_bound"]

KIND = "sparse-logits"
HEADER_LIMIT = 512  # everything but the contents of ids, row_params and data (worst case is ~470)
MAX_LOGP_SPAN = 100.0
ROW_PARAM_BYTES = 12  # lo, hi, tail as float32

_BODY_KEYS = frozenset({"version", "kind", "job", "round", "node", "shape", "k", "bits", "dither_seed",
                        "id_dtype", "ids", "row_params", "data"})
_F32_MAX = float(np.finfo(np.float32).max)
_SPAN_SLACK = 1e-3  # hi - lo exceeds the cap only by float32 rounding (ulp ~1e-5 at |logp| <= 122)
# Below this a float64 sum of exponentials has lost precision to subnormals: recompute with a new shift.
_TINY_SUM = 1e-290


@dataclass(frozen=True)
class SparseLogits:
    """A decoded sparse payload: per row, the top-k ids, their log-probs and the log tail mass."""

    ids: np.ndarray  # int64 (rows, k), strictly increasing within each row, all < vocab
    logp: np.ndarray  # float32 (rows, k): dequantized, not yet renormalised against the tail
    tail_logmass: np.ndarray  # float32 (rows,): log(1 - top-k mass); -inf when k == vocab
    vocab: int

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])


@dataclass(frozen=True)
class SparseMeta:  # like codec.PayloadMeta
    job: str
    round: int
    node: str
    shape: tuple[int, int]  # (rows, vocab)
    k: int
    bits: int
    dither_seed: int | None
    nbytes: int  # size of the whole wire message


def _id_dtype(vocab: int) -> str:
    return "u2" if vocab <= 2**16 else "u4"


def _zstd_bound(n: int) -> int:
    # ZSTD_COMPRESSBOUND from zstd.h: the most a single-shot compression (frame header included) can emit.
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < 128 << 10 else 0)


def sparse_size_bound(rows: int, vocab: int, k: int, bits: int) -> int:
    """An upper bound on the wire size of :func:`encode_sparse_logits` for this shape, k and bits."""
    n = rows * k
    id_bytes = n * (2 if _id_dtype(vocab) == "u2" else 4)
    return HEADER_LIMIT + _zstd_bound(id_bytes) + packed_size(n, bits) + ROW_PARAM_BYTES * rows


def _top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For float32 rows ``x`` (c, V): sorted top-k ids, their clamped float64 log-probs, the log tail mass."""
    c, vocab = x.shape
    z = x.astype(np.float64)
    mx = z.max(axis=1, keepdims=True)
    z -= mx  # the best entry of each row is now exactly 0
    if k == vocab:
        ids = np.broadcast_to(np.arange(vocab, dtype=np.int64), (c, vocab)).copy()
        log_total = np.log(np.exp(z).sum(axis=1))
        return ids, z - log_total[:, None], np.full(c, -np.inf)
    # Partitioning at V-k-1 also leaves the best tail entry there, for the rare fallback below.
    part = np.argpartition(x, vocab - k - 1, axis=1)
    ids = np.sort(part[:, vocab - k :], axis=1).astype(np.int64)
    top_z = np.take_along_axis(z, ids, axis=1)
    tail_max = np.take_along_axis(z, part[:, vocab - k - 1 : vocab - k], axis=1)[:, 0]
    del part
    e = np.exp(z, out=z)
    top_sum = np.exp(top_z).sum(axis=1)  # >= 1: the row's best entry is in the top k
    np.put_along_axis(e, ids, 0.0, axis=1)
    # Summing the tail terms directly (not 1 - top mass) keeps a tiny tail accurate.
    tail_sum = e.sum(axis=1)
    del e
    log_total = np.log(top_sum + tail_sum)
    with np.errstate(divide="ignore"):
        tail = -np.log1p(top_sum / tail_sum)
    bad = tail_sum < _TINY_SUM  # every tail term underflowed: shift by the best tail entry instead
    if np.any(bad):
        zb = x[bad].astype(np.float64) - mx[bad]
        np.put_along_axis(zb, ids[bad], -np.inf, axis=1)
        tb = tail_max[bad]
        tail[bad] = tb + np.log(np.exp(zb - tb[:, None]).sum(axis=1)) - log_total[bad]
    logp = top_z - log_total[:, None]
    # The cap (see module docstring); hi = -log_total is the row's best log-prob.
    logp = np.maximum(logp, -log_total[:, None] - MAX_LOGP_SPAN)
    return ids, logp, np.maximum(tail, -_F32_MAX)


def encode_sparse_logits(
    logits: ArrayLike,
    *,
    secret: bytes,
    job: str,
    round: int,
    node: str,
    k: int,
    bits: int,
    dither_seed: int | None = None,
    chunk_rows: int = 256,
) -> bytes:
    """Sign the top-k log-probs, ids and tail mass of each row of ``logits`` (rows, V); returns wire bytes.

    Rows are processed ``chunk_rows`` at a time, so beyond the (rows, k) results the extra memory is
    about ``2 * chunk_rows * V * 8`` bytes. Use a distinct ``dither_seed`` per (job, round, node).
    """
    secret = check_secret(secret)
    check_header_args(job, round, node)
    if not is_int(bits) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits!r}")
    check_seed_arg(dither_seed)
    if not is_int(chunk_rows) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    arr = np.asarray(logits)
    if arr.ndim != 2:
        raise ValueError(f"logits must be 2-D (rows x vocab), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"logits must be real numbers, got dtype {arr.dtype}")
    rows, vocab = arr.shape
    if not 1 <= vocab <= MAX_DIM or rows > MAX_DIM:
        raise ValueError(f"logits shape {arr.shape}: need 1 <= vocab and both dimensions <= 2**31-1")
    if not is_int(k) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in 1..{vocab}, got {k!r}")

    ids = np.empty((rows, k), dtype=np.int64)
    vals = np.empty((rows, k), dtype=np.float32)
    tail = np.empty(rows, dtype=np.float32)
    for a in range(0, rows, chunk_rows):
        b = min(a + chunk_rows, rows)
        # Like the dense codec, the sender works from float32 logits.
        with np.errstate(over="ignore", invalid="ignore"):
            x = arr[a:b].astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("logits contain non-finite values (or values beyond float32 range)")
        ids[a:b], vals[a:b], tail[a:b] = _top_k(x, k)

    # The grid spans exactly the float32 values sent, so the receiver's range is the sender's.
    lo = vals.min(axis=1, keepdims=True)
    hi = vals.max(axis=1, keepdims=True)
    codes = quantize(vals, bits, lo, hi, dither_seed)
    deltas = ids.copy()
    deltas[:, 1:] = np.diff(ids, axis=1)
    id_dtype = _id_dtype(vocab)
    return seal(
        secret,
        {
            "version": FORMAT_VERSION,
            "kind": KIND,
            "job": job,
            "round": round,
            "node": node,
            "shape": [rows, vocab],
            "k": k,
            "bits": bits,
            "dither_seed": dither_seed,
            "id_dtype": id_dtype,
            "ids": zstd_compress(deltas.astype("<" + id_dtype).tobytes()),
            "row_params": b"".join(p.astype("<f4").tobytes() for p in (lo, hi, tail)),
            "data": pack_bits(codes, bits),
        },
    )


def decode_sparse_logits(
    wire: bytes,
    *,
    secret: bytes,
    max_bytes: int,
    expect_shape: tuple[int, int] | None = None,
    expect_job: str | None = None,
    expect_round: int | None = None,
    expect_node: str | None = None,
) -> tuple[SparseLogits, SparseMeta]:
    """Verify and decode a payload from :func:`encode_sparse_logits`.

    Any problem with ``wire`` raises :class:`PayloadError`. ``max_bytes`` bounds the wire size
    (checked before parsing; :func:`sparse_size_bound` gives a fitting value) and the decompressed id
    stream. A bad ``secret`` argument is a caller bug and raises ValueError/TypeError.
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
) -> tuple[SparseLogits, SparseMeta]:
    body, nbytes = open_envelope(wire, secret, max_bytes, _BODY_KEYS)
    job, rnd, node, rows, vocab = read_header(body, KIND)
    k = field(body, "k", int)
    bits = field(body, "bits", int)
    seed = read_seed(body)
    id_dtype = field(body, "id_dtype", str)
    ids_z = field(body, "ids", bytes)
    row_params = field(body, "row_params", bytes)
    data = field(body, "data", bytes)
    if not 1 <= k <= vocab:
        raise PayloadError(f"k must be in 1..{vocab} (the vocabulary), got {k}")
    if not 1 <= bits <= MAX_BITS:
        raise PayloadError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if id_dtype != _id_dtype(vocab):
        raise PayloadError(f"id_dtype {id_dtype!r} is not {_id_dtype(vocab)!r}, the one for vocab {vocab}")
    check_expected(((rows, vocab), job, rnd, node), expect_shape, expect_job, expect_round, expect_node)

    # These two lengths are in the wire itself, so they bound rows and rows * k before anything is allocated.
    if len(row_params) != ROW_PARAM_BYTES * rows:
        raise PayloadError(f"row_params is {len(row_params)} bytes, expected {ROW_PARAM_BYTES * rows}")
    n = rows * k
    if len(data) != packed_size(n, bits):
        raise PayloadError(f"data is {len(data)} bytes, expected {packed_size(n, bits)} for {rows} x {k} codes")
    itemsize = 2 if id_dtype == "u2" else 4
    if n * itemsize > max_bytes:
        raise PayloadError(f"ids need {n * itemsize} bytes, over max_bytes")

    params = np.frombuffer(row_params, dtype="<f4").astype(np.float64).reshape(3, rows)
    lo, hi, tail = params
    for bad, why in ((~(np.isfinite(lo) & np.isfinite(hi)), "non-finite lo or hi"), (hi < lo, "hi < lo"),
                     (hi > 0, "a log-prob above 0"), (hi - lo > MAX_LOGP_SPAN + _SPAN_SLACK, "a span over the cap")):
        if np.any(bad):
            raise PayloadError(f"row_params have a row with {why}")
    if k == vocab:
        if not np.all(tail == -np.inf):
            raise PayloadError("tail log-mass must be -inf when k == vocab")
    elif not (np.all(np.isfinite(tail)) and np.all(tail < 0)):
        raise PayloadError("tail log-mass must be finite and negative when k < vocab")

    raw = zstd_decompress(ids_z, n * itemsize)
    deltas = np.frombuffer(raw, dtype="<" + id_dtype).astype(np.int64).reshape(rows, k)
    # Every delta < vocab keeps the cumulative sums far from int64 overflow.
    if n and int(deltas.max()) >= vocab:
        raise PayloadError("ids out of range")
    if k > 1 and np.any(deltas[:, 1:] < 1):
        raise PayloadError("ids are not strictly increasing within a row")
    ids = np.cumsum(deltas, axis=1)
    if n and int(ids[:, -1].max()) >= vocab:
        raise PayloadError("ids out of range")

    codes = unpack_bits(data, bits, n).reshape(rows, k)
    logp = dequantize(codes, bits, lo[:, None], hi[:, None], seed)
    sparse = SparseLogits(ids=ids, logp=logp, tail_logmass=tail.astype(np.float32), vocab=vocab)
    return sparse, SparseMeta(job, rnd, node, (rows, vocab), k, bits, seed, nbytes)
