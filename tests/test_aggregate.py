"""Aggregation math and quorum."""

from __future__ import annotations

import numpy as np
import pytest

from broker.round_gate import QuorumError, check_quorum, default_quorum
from pipeline.aggregate import RunningMean, TensorMeans, mean_logits


def test_mean_logits_is_arithmetic_mean():
    """The FPLD teacher is the plain mean in logit space."""
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(4)]
    np.testing.assert_allclose(mean_logits(xs), np.mean(np.stack(xs).astype(np.float64), axis=0), rtol=1e-5, atol=1e-7)


def test_mean_logits_rejects_mismatched_shapes():
    """Arrays of different shapes cannot be merged."""
    with pytest.raises(ValueError, match="shape mismatch"):
        mean_logits([np.zeros((2, 3)), np.zeros((3, 3))])
    with pytest.raises(ValueError):
        mean_logits([])


def test_default_quorum_three_quarters():
    """3 of 4, 6 of 8, 1 of 1."""
    assert [default_quorum(k) for k in (1, 2, 3, 4, 8)] == [1, 2, 3, 3, 6]


def test_check_quorum_message_names_nodes():
    """The failure says how many merged, how many needed, and why the rest did not."""
    check_quorum(3, 4, 3)
    with pytest.raises(QuorumError, match="only 2 of 4 nodes merged, quorum is 3: node 1 late"):
        check_quorum(2, 4, 3, "node 1 late")


def test_running_mean_folds_arrays_one_at_a_time():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(5, 7)).astype(np.float32) for _ in range(6)]
    acc = RunningMean()
    for x in xs:
        acc.add(x)
    assert acc.count == 6
    np.testing.assert_array_equal(acc.mean(), mean_logits(xs))
    np.testing.assert_allclose(acc.mean(), np.mean(np.stack(xs).astype(np.float64), axis=0), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="shape mismatch"):
        acc.add(np.zeros((5, 6), np.float32))
    with pytest.raises(ValueError):
        RunningMean().mean()


def test_tensor_means_is_the_mean_of_each_named_tensor():
    rng = np.random.default_rng(0)
    nodes = [{"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
             for _ in range(3)]
    acc = TensorMeans()
    for n in nodes:
        acc.add(n)
    means = acc.means()
    assert acc.count == 3
    for name in ("a", "b"):
        assert np.allclose(means[name].numpy(), np.mean([n[name] for n in nodes], axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="tensor names differ"):
        acc.add({"a": nodes[0]["a"]})
