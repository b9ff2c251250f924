"""Two-level merge math: a group's partial sums, signed, added by the root, equal the one-level mean."""

from __future__ import annotations

import numpy as np
import pytest

from broker.wire.codec import PayloadError
from broker.wire.partial import decode_partial, encode_partial
from broker.wire.sparse import decode_sparse_logits, encode_sparse_logits
from broker.wire.sparse_rebuild import SparseLogprobMean
from pipeline.aggregate import RunningMean, TensorMeans, mean_logits

KEY = b"k" * 32


def _roundtrip(acc, group: str = "g0"):
    wire = encode_partial({"teacher": acc.state()}, secret=KEY, job="j", round=3, group=group)
    return decode_partial(wire, secret=KEY, max_bytes=1 << 30, expect_job="j", expect_round=3,
                          expect_group=group)["teacher"]


def test_running_mean_of_groups_is_the_mean_of_all():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(8, 5)).astype(np.float32) for _ in range(7)]
    root = RunningMean()
    for part in (xs[:3], xs[3:5], xs[5:]):
        group = RunningMean()
        for x in part:
            group.add(x)
        root.add_state(*_roundtrip(group))
    assert root.count == 7
    np.testing.assert_allclose(root.mean(), mean_logits(xs), rtol=0, atol=1e-6)


def test_tensor_means_of_groups_are_the_means_of_all():
    rng = np.random.default_rng(1)
    ws = [{"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
          for _ in range(4)]
    one, root = TensorMeans(), TensorMeans()
    for w in ws:
        one.add(w)
    for part in (ws[:1], ws[1:]):
        group = TensorMeans()
        for w in part:
            group.add(w)
        root.add_state(*_roundtrip(group))
    for name, m in one.means().items():
        np.testing.assert_allclose(root.means()[name].numpy(), m.numpy(), atol=1e-6)


def test_sparse_means_of_groups_are_the_mean_of_all_and_travel_sparse():
    rng = np.random.default_rng(2)
    rows, vocab, k = 16, 2000, 8
    ref = rng.normal(0, 2, size=(rows, vocab)).astype(np.float32)
    payloads = [decode_sparse_logits(encode_sparse_logits(ref + rng.normal(0, 1, size=ref.shape).astype(np.float32),
                                                          secret=KEY, job="j", round=0, node=str(i), k=k, bits=8),
                                     secret=KEY, max_bytes=1 << 30)[0] for i in range(6)]
    one, root = SparseLogprobMean(ref), SparseLogprobMean(ref)
    for p in payloads:
        one.add(p)
    for part in (payloads[:2], payloads[2:]):
        group = SparseLogprobMean(ref)
        for p in part:
            group.add(p)
        wire = encode_partial({"teacher": group.state()}, secret=KEY, job="j", round=0, group="g")
        # at most 4 nodes x k of V tokens per row are nonzero: indices and values, not rows x V float64
        assert len(wire) < rows * vocab * 8 / 10
        root.add_state(*decode_partial(wire, secret=KEY, max_bytes=1 << 30)["teacher"])
    np.testing.assert_allclose(root.mean(), one.mean(), atol=1e-5)


def test_an_empty_group_adds_nothing():
    root = RunningMean()
    root.add_state(*_roundtrip(RunningMean()))
    assert root.count == 0 and root.sum is None


@pytest.mark.parametrize("change", ["tamper", "group", "round", "secret"])
def test_a_bad_partial_is_refused(change):
    acc = RunningMean()
    acc.add(np.ones((3, 3), dtype=np.float32))
    wire = encode_partial({"teacher": acc.state()}, secret=KEY, job="j", round=1, group="g1")
    kwargs = dict(secret=KEY, max_bytes=1 << 20, expect_job="j", expect_round=1, expect_group="g1")
    if change == "tamper":
        wire = wire[:-40] + bytes([wire[-40] ^ 1]) + wire[-39:]
    elif change == "group":
        kwargs["expect_group"] = "g2"
    elif change == "round":
        kwargs["expect_round"] = 2
    else:
        kwargs["secret"] = b"x" * 32
    with pytest.raises(PayloadError):
        decode_partial(wire, **kwargs)


def test_nan_in_a_partial_is_refused_but_a_masked_token_is_not():
    a = np.zeros((2, 4))
    a[0, 1] = -np.inf
    wire = encode_partial({"t": ({"sum": a}, 1)}, secret=KEY, job="j", round=0, group="g")
    assert np.isneginf(decode_partial(wire, secret=KEY, max_bytes=1 << 20)["t"][0]["sum"][0, 1])
    a[1, 1] = np.nan
    wire = encode_partial({"t": ({"sum": a}, 1)}, secret=KEY, job="j", round=0, group="g")
    with pytest.raises(PayloadError, match="NaN"):
        decode_partial(wire, secret=KEY, max_bytes=1 << 20)
