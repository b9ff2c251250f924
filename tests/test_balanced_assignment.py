"""The paper's balanced assignment: capacity, confidence order, determinism (unit and property tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.smalltalk.balanced_assignment import (
    balanced_assignment,
    capacity,
    cluster_sizes,
    confidence_order,
    random_balanced,
)


def test_capacity_is_ceil_n_over_e():
    assert capacity(10, 4) == 3
    assert capacity(8, 4) == 2
    assert capacity(1, 4) == 1
    assert capacity(0, 4) == 0
    with pytest.raises(ValueError):
        capacity(5, 0)


def test_unconstrained_rows_get_their_best_expert():
    losses = np.array([[0.1, 2.0], [3.0, 0.2], [0.3, 4.0], [5.0, 0.4]])
    assert balanced_assignment(losses).tolist() == [0, 1, 0, 1]


def test_most_confident_sequences_keep_their_best_expert():
    # All four prefer expert 0; capacity 2: the two with the lowest best loss keep it.
    losses = np.array([[0.9, 1.0], [0.1, 1.0], [0.5, 1.0], [0.2, 1.0]])
    out = balanced_assignment(losses)
    assert out.tolist() == [1, 0, 1, 0]


def test_row_order_greedy_would_differ():
    # Corpus-order greedy gives rows 0 and 1 expert 0 and pushes the confident row 2 to expert 1
    # (loss 9); the paper's order keeps the confident row at its best and displaces a weak one.
    losses = np.array([[1.0, 1.1], [1.0, 1.1], [0.1, 9.0], [5.0, 5.0]])
    out = balanced_assignment(losses)
    assert out[2] == 0
    assert cluster_sizes(out, 2) == [2, 2]


def test_margin_order_is_an_option():
    losses = np.array([[0.1, 0.11], [0.5, 3.0], [0.2, 5.0], [4.0, 4.0]])
    best = balanced_assignment(losses, order="best")
    margin = balanced_assignment(losses, order="margin")
    assert best[0] == 0 and margin[0] == 1  # row 0 is most likely but barely prefers expert 0
    with pytest.raises(ValueError):
        confidence_order(losses, order="worst")  # type: ignore[arg-type]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        balanced_assignment(np.zeros(3))
    with pytest.raises(ValueError):
        balanced_assignment(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError):
        balanced_assignment(np.zeros((5, 2)), cap=2)


def test_random_balanced_is_balanced_and_seeded():
    a = random_balanced(103, 4, seed=1)
    assert sorted(cluster_sizes(a, 4)) == [25, 26, 26, 26]
    assert np.array_equal(a, random_balanced(103, 4, seed=1))
    assert not np.array_equal(a, random_balanced(103, 4, seed=2))


losses_st = st.integers(1, 6).flatmap(lambda e: arrays(
    np.float64, st.tuples(st.integers(0, 60), st.just(e)),
    elements=st.floats(0, 10, allow_nan=False, allow_infinity=False, width=32)))


@settings(max_examples=200, deadline=None)
@given(losses_st, st.sampled_from(["best", "margin"]))
def test_properties(losses, order):
    n, e = losses.shape
    out = balanced_assignment(losses, order=order)
    assert out.shape == (n,)
    assert ((out >= 0) & (out < e)).all()
    sizes = cluster_sizes(out, e)
    cap = math.ceil(n / e) if n else 0
    assert sum(sizes) == n and max(sizes, default=0) <= cap
    assert np.array_equal(out, balanced_assignment(losses.copy(), order=order))  # deterministic
    rank = np.empty(n, dtype=int)
    rank[confidence_order(losses, order)] = np.arange(n)
    for i in range(n):
        # A row is displaced from an expert it prefers only if that expert is full of rows
        # processed before it, i.e. more confident ones: the defining property of the rule.
        better = np.nonzero(losses[i] < losses[i, out[i]])[0]
        for j in better:
            holders = np.nonzero(out == j)[0]
            assert len(holders) == cap
            assert (rank[holders] < rank[i]).all()
    if n:  # the `cap` most confident rows always get their best expert
        first = confidence_order(losses, order)[:cap]
        assert np.allclose(losses[first, out[first]], losses[first].min(axis=1))


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 40), st.integers(1, 5)),
              elements=st.floats(0, 10, allow_nan=False, width=32)))
def test_large_capacity_is_plain_argmin(losses):
    out = balanced_assignment(losses, cap=len(losses))
    assert np.allclose(losses[np.arange(len(losses)), out], losses.min(axis=1))
