"""Tests for broker.wire.sparse: round trips, the KL of the rebuilt distribution, sizes, strict decoding."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import msgpack
import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.wire.codec import FORMAT_VERSION, MAX_NAME_BYTES, PayloadError
from broker.wire.quantize import step_size
from broker.wire.sparse import (
    HEADER_LIMIT,
    MAX_LOGP_SPAN,
    SparseLogits,
    SparseMeta,
    decode_sparse_logits,
    encode_sparse_logits,
    sparse_size_bound,
)
from broker.wire.sparse_rebuild import SparseLogprobMean, iter_rebuilt, rebuild_logprobs

SECRET = b"test-secret"
MAX_BYTES = 2**24
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def zipf_logits(rows: int, vocab: int, seed: int = 0, noise: float = 1.0) -> np.ndarray:
    """LM-like rows: log-Zipf over a shared random token order (frequent tokens recur), plus noise."""
    rng = np.random.default_rng(seed)
    base = -1.1 * np.log(np.arange(1, vocab + 1))[rng.permutation(vocab)]
    scale = rng.uniform(0.7, 1.5, (rows, 1))
    return (base * scale + rng.normal(0, noise, (rows, vocab))).astype(np.float32)


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def kl_rows(x: np.ndarray, logr: np.ndarray) -> np.ndarray:
    """KL(softmax(x) || exp(logr)) per row, in float64."""
    logp = log_softmax(x)
    return (np.exp(logp) * (logp - logr.astype(np.float64))).sum(axis=1)


def encode(x: np.ndarray, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(secret=SECRET, job="job-1", round=3, node="node-a", k=16, bits=8, dither_seed=None)
    args.update(kw)
    return encode_sparse_logits(x, **args)


def decode(wire: Any, **kw: Any) -> tuple[SparseLogits, SparseMeta]:
    kw.setdefault("max_bytes", MAX_BYTES)
    return decode_sparse_logits(wire, secret=SECRET, **kw)


def open_body(wire: bytes) -> dict[str, Any]:
    return msgpack.unpackb(msgpack.unpackb(wire, raw=False)["body"], raw=False)


def forge(body: Any, *, secret: bytes = SECRET) -> bytes:
    """Re-sign an arbitrary body, so the checks behind the HMAC can be exercised."""
    packed = msgpack.packb(body, use_bin_type=True)
    sig = hmac.new(secret, packed, hashlib.sha256).digest()
    return msgpack.packb({"v": FORMAT_VERSION, "body": packed, "sig": sig}, use_bin_type=True)


GOOD = encode(zipf_logits(4, 300), k=8, bits=6, dither_seed=5)


def forged(wire: bytes = GOOD, **changes: Any) -> bytes:
    return forge({**open_body(wire), **changes})


def assert_rejected(wire: Any, match: str | None = None, **kw: Any) -> None:
    with pytest.raises(PayloadError, match=match):
        decode(wire, **kw)


def with_deltas(deltas: np.ndarray, wire: bytes = GOOD) -> bytes:
    body = open_body(wire)
    return forge({**body, "ids": zstandard.ZstdCompressor().compress(deltas.astype("<" + body["id_dtype"]).tobytes())})


def deltas_of(wire: bytes = GOOD) -> np.ndarray:
    body = open_body(wire)
    raw = zstandard.ZstdDecompressor().decompress(body["ids"])
    return np.frombuffer(raw, "<" + body["id_dtype"]).astype(np.int64).reshape(body["shape"][0], body["k"])


def kl_bound(x: np.ndarray, sparse: SparseLogits, bits: int, logr: np.ndarray) -> np.ndarray:
    """Per-row bound on KL(p || rebuilt) for reference = the sender's logits and no span clipping.

    Rebuilt top-k log-probs are the true ones plus errors e_i in an interval of width step (+-step/2
    from rounding, dithered or not), renormalised to the exact top-k mass M; the tail is exactly p's.
    Then KL = M * (log E[exp(e)] - E[e]) over the normalised top-k distribution, and Hoeffding's
    lemma gives KL <= M * step**2 / 8. Slack: the float32 roundings of each log-prob before
    quantizing and after dequantizing widen the interval by 4 * rho, and the float32 output log r
    moves the computed KL by at most 2**-24 * E_p[|log r|].
    """
    logp = log_softmax(x)
    top = np.take_along_axis(logp, sparse.ids, axis=1)
    mass = np.exp(top).sum(axis=1)
    step = np.asarray(step_size(top.min(axis=1), top.max(axis=1), bits))
    rho = 2.0**-24 * (np.abs(top).max(axis=1) + 1)
    rounding = 2.0**-24 * (np.exp(logp) * np.abs(logr.astype(np.float64))).sum(axis=1)
    return mass * (step + 4 * rho) ** 2 / 8 + rounding + 1e-12


# --- round trips -------------------------------------------------------------------------------


@FAST
@given(
    rows=st.integers(0, 40),
    vocab=st.integers(1, 1500),
    k_frac=st.floats(0, 1),
    bits=st.integers(1, 16),
    seed=st.none() | st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
    chunk_rows=st.integers(1, 50),
)
def test_sparse_roundtrip(
    rows: int, vocab: int, k_frac: float, bits: int, seed: int | None, data_seed: int, chunk_rows: int
) -> None:
    """Ids are the top k (sorted), log-probs within step/2, tail mass exact to float32."""
    k = max(1, round(k_frac * vocab))
    x = np.random.default_rng(data_seed).normal(0, 4, (rows, vocab)).astype(np.float32)
    wire = encode(x, k=k, bits=bits, dither_seed=seed, chunk_rows=chunk_rows)
    sp, meta = decode(wire, expect_shape=(rows, vocab), expect_job="job-1", expect_round=3, expect_node="node-a",
                      max_bytes=sparse_size_bound(rows, vocab, k, bits))
    assert meta == SparseMeta("job-1", 3, "node-a", (rows, vocab), k, bits, seed, len(wire))
    assert sp.ids.dtype == np.int64 and sp.logp.dtype == np.float32 and sp.tail_logmass.dtype == np.float32
    assert sp.ids.shape == sp.logp.shape == (rows, k) and sp.vocab == vocab
    assert np.all(np.diff(sp.ids, axis=1) > 0)
    # Top k by the float32 input, robust to ties: everything chosen is >= everything left out.
    chosen = np.zeros((rows, vocab), bool)
    np.put_along_axis(chosen, sp.ids, True, axis=1)
    if k < vocab and rows:
        assert np.all(np.where(chosen, x, np.inf).min(axis=1) >= np.where(chosen, -np.inf, x).max(axis=1))
    logp = log_softmax(x)
    top = np.take_along_axis(logp, sp.ids, axis=1)
    if rows:
        step = np.asarray(step_size(top.min(axis=1), top.max(axis=1), bits))[:, None]
        assert np.all(np.abs(sp.logp - top) <= step / 2 + 1e-5)
    if k == vocab:
        assert np.all(sp.tail_logmass == -np.inf)
    else:
        tail = np.logaddexp.reduce(np.where(chosen, -np.inf, logp), axis=1)
        np.testing.assert_allclose(sp.tail_logmass, tail.astype(np.float32), rtol=1.2e-7, atol=0)
    if rows:  # every rebuilt row is a distribution
        for ref in (None, x):
            total = np.logaddexp.reduce(rebuild_logprobs(sp, ref).astype(np.float64), axis=1)
            np.testing.assert_allclose(total, 0, atol=1e-5)


def test_sparse_chunking_does_not_change_the_payload() -> None:
    """chunk_rows only bounds memory: the wire bytes are the same for any chunk size."""
    x = zipf_logits(13, 500)
    wires = {encode(x, chunk_rows=c, dither_seed=9) for c in (1, 4, 13, 256)}
    assert len(wires) == 1


def test_sparse_tiny_tail_is_exact() -> None:
    """A tail far below the top k (even below float64 exp range) keeps its exact log-mass."""
    x = np.zeros((3, 400), np.float32)
    x[:, 16:] = [[-80.0], [-900.0], [-3e38]]  # tail mass e-80 * 384, then underflowing twice over
    sp, _ = decode(encode(x, k=16))
    want = np.log(384.0) + np.array([-80.0, -900.0, -3e38]) - np.log(16.0)
    np.testing.assert_allclose(sp.tail_logmass, want.astype(np.float32), rtol=1.2e-7)
    np.testing.assert_array_equal(sp.ids, np.tile(np.arange(16), (3, 1)))


def test_sparse_span_cap() -> None:
    """A top-k log-prob far below the row's best is sent at the cap, leaving the others' grid fine."""
    x = np.full((2, 300), -1000.0, np.float32)
    x[:, :5] = [0.0, -1.0, -2.5, -3.0, -7.0]
    x[:, 5] = -500.0  # in the top 6, but 500 nats below the best
    sp, _ = decode(encode(x, k=6, bits=8))
    hi = sp.logp.max(axis=1)
    np.testing.assert_allclose(sp.logp[:, 5], hi - MAX_LOGP_SPAN, atol=1e-3)
    np.testing.assert_allclose(sp.logp[:, :5], log_softmax(x)[:, :5], atol=MAX_LOGP_SPAN / 255 / 2 + 1e-5)
    rebuilt = rebuild_logprobs(sp, x)
    np.testing.assert_allclose(np.logaddexp.reduce(rebuilt.astype(np.float64), axis=1), 0, atol=1e-6)


def test_sparse_full_vocabulary() -> None:
    """k == V sends every log-prob, the tail is -inf, and the rebuild is the softmax up to quantization."""
    x = zipf_logits(5, 64)
    sp, _ = decode(encode(x, k=64, bits=16))
    assert np.all(sp.tail_logmass == -np.inf)
    np.testing.assert_allclose(rebuild_logprobs(sp, None), log_softmax(x), atol=1e-3)


# --- the rebuilt distribution --------------------------------------------------------------------


def test_sparse_16_bits_self_reference_kl() -> None:
    """With 16 bits and the sender's own logits as reference the rebuild is nearly exact."""
    x = zipf_logits(32, 2000, seed=1)
    sp, _ = decode(encode(x, k=32, bits=16, dither_seed=4))
    kl = kl_rows(x, rebuild_logprobs(sp, x))
    assert np.all(kl < 1e-3) and np.all(kl > -1e-6)


@FAST
@given(
    rows=st.integers(1, 24),
    vocab=st.integers(2, 1200),
    k_frac=st.floats(0, 1),
    scale=st.floats(0.1, 4),
    zipf=st.booleans(),
    seed=st.none() | st.integers(0, 2**64 - 1),
    data_seed=st.integers(0, 2**32 - 1),
)
def test_sparse_shaped_tail_kl_bound(
    rows: int, vocab: int, k_frac: float, scale: float, zipf: bool, seed: int | None, data_seed: int
) -> None:
    """At 8 bits with reference = sender logits, KL(p || rebuilt) <= M * step**2 / 8 per row (see kl_bound)."""
    k = max(1, round(k_frac * vocab))
    rng = np.random.default_rng(data_seed)
    x = zipf_logits(rows, vocab, data_seed) * scale if zipf else rng.normal(0, scale, (rows, vocab))
    x = x.astype(np.float32)
    sp, _ = decode(encode(x, k=k, bits=8, dither_seed=seed))
    top = np.take_along_axis(log_softmax(x), sp.ids, axis=1)
    assert np.all(top.max(axis=1) - top.min(axis=1) < MAX_LOGP_SPAN)  # the bound assumes nothing was clipped
    logr = rebuild_logprobs(sp, x)
    kl = kl_rows(x, logr)
    assert np.all(kl <= kl_bound(x, sp, 8, logr)), (kl, kl_bound(x, sp, 8, logr))


def test_sparse_kl_bound_catches_a_broken_rebuild() -> None:
    """The bound is tight enough to fail: three steps of error on a half-mass token breaks it."""
    x = np.full((1, 200), -12.0, np.float32)
    x[0, :4] = [0.0, -0.4, -0.8, -1.1]  # the top token holds about half of the top-k mass
    sp, _ = decode(encode(x, k=8, bits=8))
    logr = rebuild_logprobs(sp, x)
    assert kl_rows(x, logr)[0] <= kl_bound(x, sp, 8, logr)[0]
    step = float(step_size(sp.logp.min(), sp.logp.max(), 8))
    bumped = sp.logp.copy()
    bumped[0, 0] += 3 * step
    bad = SparseLogits(sp.ids, bumped, sp.tail_logmass, sp.vocab)
    logr_bad = rebuild_logprobs(bad, x)
    assert kl_rows(x, logr_bad)[0] > kl_bound(x, sp, 8, logr_bad)[0]


def test_sparse_shaped_tail_beats_uniform() -> None:
    """A reference close to the sender (its logits plus noise) shapes the tail far better than uniform."""
    x = zipf_logits(32, 2000, seed=2)
    ref = x + np.random.default_rng(3).normal(0, 0.3, x.shape).astype(np.float32)
    sp, _ = decode(encode(x, k=32, bits=8, dither_seed=1))
    shaped, uniform = kl_rows(x, rebuild_logprobs(sp, ref)), kl_rows(x, rebuild_logprobs(sp, None))
    assert np.all(shaped < uniform)
    assert shaped.mean() < 0.25 * uniform.mean()


def test_sparse_rebuild_in_chunks_and_slices() -> None:
    """iter_rebuilt covers every row once and matches the one-shot rebuild; rows= selects a slice."""
    x = zipf_logits(11, 300)
    sp, _ = decode(encode(x, k=10, dither_seed=2))
    whole = rebuild_logprobs(sp, x)
    parts = list(iter_rebuilt(sp, x, chunk_rows=4))
    assert [s.start for s, _ in parts] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([p for _, p in parts]), whole)
    np.testing.assert_array_equal(rebuild_logprobs(sp, x, rows=slice(3, 7)), whole[3:7])
    np.testing.assert_array_equal(rebuild_logprobs(sp, None, rows=slice(0, 0)), whole[:0])


def test_sparse_rebuild_reference_edge_cases() -> None:
    """A reference masking the whole tail falls back to uniform; NaN or a wrong shape is a ValueError."""
    x = zipf_logits(2, 50)
    sp, _ = decode(encode(x, k=5))
    ref = x.copy()
    ref[0] = -np.inf
    ref[0, sp.ids[0]] = 0.0
    got, uniform = rebuild_logprobs(sp, ref), rebuild_logprobs(sp, None)
    np.testing.assert_array_equal(got[0], uniform[0])
    np.testing.assert_array_equal(got[1], rebuild_logprobs(sp, x)[1])
    for bad in (np.full_like(x, np.nan), np.full_like(x, np.inf), x[:1]):
        with pytest.raises(ValueError):
            rebuild_logprobs(sp, bad)


# --- size ----------------------------------------------------------------------------------------


def test_sparse_size_bound_and_ratio() -> None:
    """The bound holds, and at V=50,000, k=128, 8 bits the payload is over 250x smaller than float32."""
    x = zipf_logits(32, 50_000, seed=4)
    wire = encode(x, k=128, bits=8, dither_seed=7)
    assert len(wire) <= sparse_size_bound(32, 50_000, 128, 8)
    assert x.nbytes / len(wire) >= 250, x.nbytes / len(wire)
    # Incompressible ids with 4-byte deltas (V > 65536) and the longest header still fit the bound.
    name = "é" * (MAX_NAME_BYTES // 2)
    x = np.random.default_rng(5).normal(0, 1, (2, 70_000)).astype(np.float32)
    for k, bits in ((1, 1), (300, 3), (2000, 16)):
        wire = encode(x, k=k, bits=bits, job=name, node=name, round=2**63 - 1, dither_seed=2**64 - 1)
        assert len(wire) <= sparse_size_bound(2, 70_000, k, bits)


def test_sparse_header_limit_worst_case() -> None:
    """All fields but the three byte strings fit HEADER_LIMIT even at their widest msgpack encodings."""
    name = "é" * (MAX_NAME_BYTES // 2)
    body = {**open_body(GOOD), "job": name, "node": name, "round": 2**63 - 1, "dither_seed": 2**64 - 1,
            "shape": [2**31 - 1, 2**31 - 1], "k": 2**31 - 1, "bits": 16, "id_dtype": "u4"}
    big = {"ids": b"\0" * 70_000, "row_params": b"\0" * 70_000, "data": b"\0" * 70_000}  # 5-byte bin headers
    assert len(forge({**body, **big})) - 3 * 70_000 <= HEADER_LIMIT


@pytest.mark.parametrize("rows, vocab, k", [(0, 10, 3), (5, 1, 1)])
def test_sparse_degenerate_shapes(rows: int, vocab: int, k: int) -> None:
    """No rows, or a one-token vocabulary, still round-trip."""
    sp, meta = decode(encode(np.zeros((rows, vocab), np.float32), k=k))
    assert sp.ids.shape == (rows, k) and meta.shape == (rows, vocab)
    assert rebuild_logprobs(sp, None).shape == (rows, vocab)


# --- encode validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [{"k": 0}, {"k": 301}, {"k": 2.0}, {"bits": 0}, {"bits": 17}, {"bits": 32}, {"bits": True}, {"secret": b""},
     {"job": ""}, {"node": "n" * (MAX_NAME_BYTES + 1)}, {"round": -1}, {"dither_seed": -1}, {"chunk_rows": 0}],
)
def test_encode_rejects_bad_arguments(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        encode(zipf_logits(2, 300), **kw)


@pytest.mark.parametrize(
    "x", [np.zeros(5, np.float32), np.zeros((2, 0), np.float32), np.array([[1.0, np.nan]] * 2),
          np.array([[-np.inf, 0.0]] * 2), np.array([[1e39, 0.0]] * 2), np.array([["a", "b"]])],
)
def test_encode_rejects_bad_logits(x: np.ndarray) -> None:
    with pytest.raises(ValueError):
        encode(x, k=1)


# --- decode rejections ---------------------------------------------------------------------------


def test_decode_rejects_tampering_truncation_and_wrong_secret() -> None:
    """Every flipped byte and every proper prefix is refused, as is another secret's signature."""
    wire = encode(zipf_logits(2, 40), k=4, bits=5)
    for i in range(len(wire)):
        bad = bytearray(wire)
        bad[i] ^= 0x10
        assert_rejected(bytes(bad))
    for n in range(len(wire)):
        assert_rejected(wire[:n])
    assert_rejected(wire + b"\0")
    with pytest.raises(PayloadError, match="signature"):
        decode_sparse_logits(wire, secret=b"other", max_bytes=MAX_BYTES)
    outer = msgpack.unpackb(wire, raw=False)
    assert_rejected(msgpack.packb({**outer, "sig": bytes(32)}, use_bin_type=True), "signature")
    assert_rejected(wire, "max_bytes", max_bytes=len(wire) - 1)
    assert_rejected(encode_logits_wire(), "fields wrong")  # a dense payload is not a sparse one


def encode_logits_wire() -> bytes:
    from broker.wire.codec import encode_logits

    return encode_logits(zipf_logits(2, 30), secret=SECRET, job="job-1", round=3, node="node-a", bits=8)


def test_decode_rejects_expectation_mismatch() -> None:
    decode(GOOD, expect_shape=(4, 300), expect_job="job-1", expect_round=3, expect_node="node-a")
    for kw, match in (({"expect_shape": (300, 4)}, "shape"), ({"expect_job": "job-2"}, "job"),
                      ({"expect_round": 4}, "round"), ({"expect_node": "node-b"}, "node")):
        assert_rejected(GOOD, match, **kw)


def test_decode_rejects_bad_ids() -> None:
    """Ids out of range, repeated or unsorted, and id streams of the wrong length are refused."""
    d = deltas_of()
    decode(with_deltas(d))
    for row, col, value, match in ((0, 0, 300, "range"), (1, 7, 300, "range"), (2, 3, 0, "increasing")):
        bad = d.copy()
        bad[row, col] = value
        assert_rejected(with_deltas(bad), match)
    end = d.copy()
    end[3, -1] += 300 - d[3].sum()  # last id lands exactly on V
    assert_rejected(with_deltas(end), "range")
    unsorted = np.cumsum(d, axis=1)[:, ::-1].copy()  # absolute ids, descending: huge wrapped deltas
    unsorted[:, 1:] = np.diff(unsorted, axis=1) % 2**16
    assert_rejected(with_deltas(unsorted), "range|increasing")
    for n in (d.size - 1, d.size + 1):
        assert_rejected(with_deltas(np.resize(d.ravel(), n)), "zstd")
    assert_rejected(forged(id_dtype="u4"), "id_dtype")
    assert_rejected(forged(ids=b"not zstd"), "zstd")


def test_decode_rejects_zstd_bomb() -> None:
    """An id stream that would expand past its expected size is refused without expanding it."""
    for declare in (True, False):
        bomb = zstandard.ZstdCompressor(write_content_size=declare).compress(b"\0" * (64 * 2**20))
        assert len(bomb) < 10_000
        assert_rejected(forged(ids=bomb), "zstd")
    # A small payload claiming a huge id stream is refused by max_bytes before decompressing anything.
    assert_rejected(forged(k=200, data=b"\0" * 600), "max_bytes", max_bytes=len(GOOD) + 1000)


def test_decode_rejects_bad_row_params() -> None:
    """lo, hi and tail must be finite, ordered, at most 0, within the span cap, and tail < 0 (or -inf iff k == V)."""
    body = open_body(GOOD)
    lo, hi, tail = np.frombuffer(body["row_params"], "<f4").reshape(3, -1).copy()

    def params(lo: np.ndarray = lo, hi: np.ndarray = hi, tail: np.ndarray = tail) -> bytes:
        return forge({**body, "row_params": np.concatenate([lo, hi, tail]).astype("<f4").tobytes()})

    nan = np.array([np.nan, 0, 0, 0], np.float32)
    assert_rejected(params(lo=lo + nan), "non-finite")
    assert_rejected(params(hi=hi + nan), "non-finite")
    assert_rejected(params(lo=hi, hi=lo), "hi < lo")
    assert_rejected(params(lo=lo + 1 - hi, hi=hi + 1 - hi), "above 0")
    assert_rejected(params(lo=hi - MAX_LOGP_SPAN - 1), "span")
    for bad in (tail + nan, np.full_like(tail, -np.inf), np.zeros_like(tail), -tail):
        assert_rejected(params(tail=bad), "tail")
    assert_rejected(forge({**body, "row_params": body["row_params"][:-4]}), "row_params")
    full = open_body(encode(zipf_logits(2, 8), k=8))
    rp = np.frombuffer(full["row_params"], "<f4").copy()
    rp[-1] = -1.0
    assert_rejected(forge({**full, "row_params": rp.tobytes()}), "tail")


@pytest.mark.parametrize(
    "changes, match",
    [({"kind": "logits"}, "kind"), ({"version": 2}, "version"), ({"job": ""}, "job"), ({"round": -1}, "round"),
     ({"shape": [4]}, "shape"), ({"shape": [4, 0]}, "k"), ({"shape": [5, 300]}, "row_params"),
     ({"shape": [4, 7]}, "k"), ({"k": 0}, "k"), ({"k": 9}, "data"), ({"k": 8.0}, "'k'"), ({"k": True}, "'k'"),
     ({"bits": 0}, "bits"), ({"bits": 17}, "bits"), ({"bits": 7}, "data"), ({"dither_seed": -1}, "dither_seed"),
     ({"id_dtype": 2}, "id_dtype"), ({"ids": "x"}, "ids"), ({"row_params": None}, "row_params"),
     ({"data": b"\0"}, "data"), ({"data": None}, "data")],
)
def test_decode_rejects_bad_body_fields(changes: dict[str, Any], match: str) -> None:
    assert_rejected(forged(**changes), match)


def test_decode_rejects_missing_and_extra_fields() -> None:
    body = open_body(GOOD)
    del body["id_dtype"]
    assert_rejected(forge(body), "missing")
    assert_rejected(forged(extra=1), "unexpected")
    assert_rejected(forge([1, 2]), "map")


# --- fuzzing -------------------------------------------------------------------------------------

VALID = [GOOD, encode(zipf_logits(3, 20), k=20, bits=3), encode(zipf_logits(2, 70), k=5, bits=13, dither_seed=1)]


def decode_or_payload_error(wire: Any) -> None:
    try:
        decode(wire)
    except PayloadError:
        pass


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
@given(st.binary(max_size=400) | st.sampled_from([None, 7, "text", [b"x"]]))
def test_decode_fuzz_arbitrary_input(wire: Any) -> None:
    decode_or_payload_error(wire)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_decode_fuzz_mutated_wire(wire: bytes, data: st.DataObject) -> None:
    decode_or_payload_error(mutate(wire, data))


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_decode_fuzz_mutated_signed_body(wire: bytes, data: st.DataObject) -> None:
    """Mutated bodies that are re-signed (a buggy or hostile key holder) still only raise PayloadError."""
    body = mutate(msgpack.unpackb(wire, raw=False)["body"], data)
    sig = hmac.new(SECRET, body, hashlib.sha256).digest()
    decode_or_payload_error(msgpack.packb({"v": FORMAT_VERSION, "body": body, "sig": sig}, use_bin_type=True))


@FUZZ
@given(
    st.sampled_from(VALID),
    st.sampled_from(["job", "round", "node", "shape", "k", "bits", "dither_seed", "id_dtype", "ids", "row_params",
                     "data"]),
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=10)
    | st.binary(max_size=60) | st.lists(st.integers(-5, 2**40), max_size=3) | st.sampled_from(["u2", "u4"]),
)
def test_decode_fuzz_signed_field_values(wire: bytes, key: str, value: Any) -> None:
    """Any value in any signed body field is either accepted or rejected with PayloadError."""
    decode_or_payload_error(forged(wire, **{key: value}))


@pytest.mark.parametrize("rows,vocab,k", [(16, 300, 8), (6, 40, 40), (5, 64, 1)])
def test_sparse_mean_equals_the_mean_of_rebuilt_rows(rows, vocab, k):
    """SparseLogprobMean (O(rows*k) per payload) gives what averaging rebuild_logprobs gives, also for
    masked reference tokens, a reference that masks a whole tail, a tail too small for float64
    cancellation, and k == V."""
    rng = np.random.default_rng(rows + vocab + k)
    ref = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    ref[1, 3] = -np.inf  # one masked token
    ref[2, :] = -np.inf
    ref[2, : k + 1] = 1.0  # the reference leaves a single tail token
    ref[3, :] = -60.0
    ref[3, :k] = 25.0  # the top k hold all but ~1e-37 of the reference's mass
    acc, rebuilt = SparseLogprobMean(ref), []
    for node in range(4):
        x = (np.where(np.isfinite(ref), ref, 0.0) + rng.normal(0, 2, ref.shape)).astype(np.float32)
        wire = encode_sparse_logits(x, secret=SECRET, job="j", round=0, node=str(node), k=k, bits=8)
        sp, _ = decode_sparse_logits(wire, secret=SECRET, max_bytes=MAX_BYTES)
        rebuilt.append(rebuild_logprobs(sp, ref).astype(np.float64))
        acc.add(sp)
    want, got = np.mean(rebuilt, axis=0), acc.mean()
    assert acc.count == 4 and got.dtype == np.float32
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=1e-4)


def test_sparse_mean_rejects_a_payload_of_another_shape():
    acc = SparseLogprobMean(np.zeros((4, 10), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        acc.add(SparseLogits(np.zeros((3, 2), dtype=np.int64) + [0, 1], np.zeros((3, 2), np.float32),
                             np.full(3, -1.0, np.float32), 10))
    with pytest.raises(ValueError, match="no payloads"):
        acc.mean()
