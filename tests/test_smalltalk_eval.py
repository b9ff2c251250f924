"""The paired bootstrap behind the mixture-vs-dense confidence interval; perplexity per byte."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.smalltalk.eval import ppl_per_byte, ppl_ratio_ci


def test_identical_models_give_a_zero_width_interval():
    nll = np.random.default_rng(0).exponential(1.5, size=(64, 16))
    assert ppl_ratio_ci(nll, nll) == (0.0, 0.0)


def test_a_uniformly_better_model_is_significant_and_centred_on_the_true_change():
    rng = np.random.default_rng(1)
    b = rng.exponential(1.5, size=(300, 32))
    a = b - 0.05 + rng.normal(0, 0.3, size=b.shape)  # 5% lower loss per token, plus noise
    lo, hi = ppl_ratio_ci(a, b)
    true = math.exp((a - b).mean()) - 1
    assert lo < true < hi < 0


def test_interval_covers_no_difference_at_about_the_nominal_rate():
    # Two models with the same expected loss: a 95% interval should contain 0 in ~95% of samples.
    rng = np.random.default_rng(2)
    covered = 0
    for trial in range(200):
        shared = rng.exponential(1.5, size=(100, 8))  # what makes a sequence hard, for both models
        a = shared + rng.normal(0, 0.5, size=shared.shape)
        b = shared + rng.normal(0, 0.5, size=shared.shape)
        lo, hi = ppl_ratio_ci(a, b, draws=500, seed=trial)
        covered += lo <= 0 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_shapes_must_match():
    with pytest.raises(ValueError, match="one shape"):
        ppl_ratio_ci(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        ppl_ratio_ci(np.zeros((0, 3)), np.zeros((0, 3)))


def test_perplexity_per_byte_divides_the_total_loss_by_the_targets_bytes():
    seqs = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])  # targets: 1 2 1 / 2 0 1
    lengths = np.array([1, 3, 2])  # bytes of tokens 0, 1, 2
    nll = np.full((2, 3), 0.5)
    assert ppl_per_byte(nll, seqs, lengths) == pytest.approx(math.exp(6 * 0.5 / (3 + 2 + 3 + 2 + 1 + 3)))
    assert ppl_per_byte(nll, seqs, np.ones(3, dtype=np.int64)) == pytest.approx(math.exp(0.5))  # bytes: per token
    with pytest.raises(ValueError):
        ppl_per_byte(nll[:, :2], seqs, lengths)
