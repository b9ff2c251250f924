"""The paired bootstrap behind the mixture-vs-dense confidence interval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.smalltalk.eval import ppl_ratio_ci


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
