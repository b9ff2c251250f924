"""Conformal math of FC-RAG: the finite-sample quantile, the hub's merge, the slack, and a statistical
test that coverage on exchangeable synthetic data holds as split conformal says it must."""

from __future__ import annotations

import math

import numpy as np
import pytest

from broker.wire.codec import decode_logits, encode_logits
from pipeline.rag import conformal as cf


@pytest.mark.parametrize("n, alpha, k", [(9, 0.1, 9), (99, 0.2, 80), (100, 0.1, 91), (19, 0.05, 19), (5, 0.1, 6),
                                         (1, 0.5, 1)])
def test_quantile_rank_is_the_finite_sample_correction(n, alpha, k):
    """k = ceil((1-alpha)(n+1)), immune to (1-0.2)*100 = 80.00000000000001."""
    assert cf.quantile_rank(n, alpha) == k


def test_conformal_quantile_order_statistic_and_infinity():
    scores = np.arange(1.0, 10.0)[::-1]  # 9 scores 9..1, unsorted on purpose
    assert cf.conformal_quantile(scores, 0.1) == 9.0  # k = 9: the largest
    assert cf.conformal_quantile(scores, 0.2) == 8.0  # k = ceil(0.8 * 10) = 8
    assert cf.conformal_quantile(scores, 0.5) == 5.0
    assert math.isinf(cf.conformal_quantile(scores[:5], 0.1))  # k = 6 > n = 5
    assert math.isinf(cf.conformal_quantile([], 0.1))
    # +inf scores (label proposed by no node) sort last and can be the quantile
    assert math.isinf(cf.conformal_quantile([1.0, 2.0, np.inf, np.inf], 0.5))
    assert cf.conformal_quantile([1.0, 2.0, 3.0, np.inf], 0.5) == 3.0
    with pytest.raises(ValueError, match="NaN"):
        cf.conformal_quantile([1.0, np.nan], 0.1)
    with pytest.raises(ValueError, match="alpha"):
        cf.conformal_quantile([1.0], 1.0)


def test_swarm_scores_mean_over_proposing_nodes():
    ids = np.array([[[1, 2], [2, 3], [0, 1]]])  # one query, three nodes, k' = 2
    sc = np.array([[[1.0, 3.0], [5.0, 2.0], [4.0, 7.0]]])
    s = cf.swarm_scores(ids, sc, vocab=5)
    assert s.shape == (1, 5)
    np.testing.assert_allclose(s[0, :4], [4.0, 4.0, 4.0, 2.0])  # y=1: (1+7)/2, y=2: (3+5)/2
    assert math.isinf(s[0, 4])  # nobody proposed 4
    # dropping node 2: y=0 is now proposed by nobody, y=1 only by node 0
    s2 = cf.swarm_scores(ids, sc, node_mask=[True, True, False], vocab=5)
    assert math.isinf(s2[0, 0]) and s2[0, 1] == 1.0 and s2[0, 2] == 4.0


def test_label_scores_agree_with_the_swarm_merge():
    rng = np.random.default_rng(3)
    n, K, kp, V = 200, 4, 6, 16
    ids = np.stack([[rng.permutation(V)[:kp] for _ in range(K)] for _ in range(n)])
    sc = rng.uniform(0, 8, size=ids.shape)
    labels = rng.integers(0, V, n)
    for mask in ([True] * 4, [True, False, True, False]):
        swarm = cf.swarm_scores(ids, sc, mask, vocab=V)[np.arange(n), labels]
        merged = cf.merged_label_scores(cf.label_scores(ids, sc, labels), mask)
        np.testing.assert_allclose(merged, swarm)


def test_prediction_sets_coverage_and_size():
    swarm = np.array([[0.5, 2.0, np.inf], [3.0, 0.1, 1.0]])
    sets = cf.prediction_sets(swarm, 1.0)
    assert sets.tolist() == [[True, False, False], [False, True, True]]
    assert cf.coverage(sets, [0, 0]) == 0.5 and cf.mean_set_size(sets) == 1.5
    assert cf.prediction_sets(swarm, math.inf).all()  # q_hat = +inf: every label, even unproposed ones


def test_score_variance_matches_the_codec():
    """v(B) is the variance of the dithered quantization error the wire really adds."""
    s_max, rng = 10.0, np.random.default_rng(0)
    x = rng.uniform(0, s_max, size=(400, 50))
    for bits in (1, 2, 4):
        wire = encode_logits(x - s_max / 2, secret=b"k", job="j", round=0, node="0", bits=bits, clip=s_max / 2,
                             dither_seed=7)
        err = decode_logits(wire, secret=b"k")[0] + s_max / 2 - x
        v = cf.score_variance(bits, s_max)
        assert abs(err.mean()) < 4 * math.sqrt(v / err.size)  # mean zero: subtractive dither
        assert err.var() == pytest.approx(v, rel=0.05)
        assert cf.paper_score_variance(bits, s_max) < v  # the paper's grid has a slightly smaller step
    assert cf.score_variance(32, s_max) == 0.0


def test_slack_parts():
    v = cf.score_variance(4, 10.0)
    one, four = cf.delta_rag(0.5, [v]), cf.delta_rag(0.5, [v] * 4)
    assert four == pytest.approx(one / 2)  # equal budgets: Delta_RAG ~ K^(-1/2)
    s = cf.slack(99, 0.5, [v] * 4, delta=0.05)
    assert s["conformal"] == 0.01 and s["rag"] == pytest.approx(four)
    assert s["fl"] == pytest.approx(math.sqrt(math.log(40) / 198))
    assert s["total"] == pytest.approx(s["conformal"] + s["rag"] + s["fl"])


def test_estimate_fmax_of_a_known_density():
    """On N(0, 1) scores the density at the median is 1/sqrt(2 pi) ~ 0.399."""
    s = np.random.default_rng(1).normal(size=5000)
    assert cf.estimate_fmax(s, 0.0) == pytest.approx(0.399, abs=0.03)
    # half the mass at +inf halves the density of the finite part
    assert cf.estimate_fmax(np.concatenate([s, np.full(5000, np.inf)]), 0.0) == pytest.approx(0.2, abs=0.02)
    assert cf.estimate_fmax(s, math.inf) == 0.0


def test_beta_binomial_interval_matches_simulation():
    rng = np.random.default_rng(2)
    a, b = cf.coverage_beta(200, 0.1)
    sims = rng.binomial(300, rng.beta(a, b, size=20000)) / 300
    lo, hi = cf.beta_binomial_interval(300, a, b, level=0.9)
    inside = np.mean((sims >= lo) & (sims <= hi))
    assert 0.88 <= inside <= 0.94


def _synthetic(rng: np.random.Generator, n: int, K: int, kp: int, V: int, bits: int, s_max: float):
    """Exchangeable queries: label ~ p(x), node i's model is p distorted by its own fixed bias plus
    per-query noise; node scores go through the real codec at `bits` bits with dither."""
    logits = rng.normal(scale=2.0, size=(n, V))
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.minimum((p.cumsum(1) < rng.random((n, 1))).sum(1), V - 1)  # inverse-CDF draw of y ~ p
    ids = np.zeros((n, K, kp), np.int64)
    sc = np.zeros((n, K, kp))
    for i in range(K):
        node_logits = logits + rng.normal(scale=0.3, size=V) + rng.normal(scale=0.5, size=(n, V))
        logp = node_logits - np.log(np.exp(node_logits).sum(1, keepdims=True))
        top = np.argsort(-logp, axis=1)[:, :kp]
        s = np.clip(-np.take_along_axis(logp, top, 1), 0, s_max)
        wire = encode_logits(s - s_max / 2, secret=b"k", job="j", round=0, node=str(i), bits=bits,
                             clip=s_max / 2, dither_seed=100 + i)
        ids[:, i], sc[:, i] = top, decode_logits(wire, secret=b"k")[0] + s_max / 2
    return ids, sc, labels


def test_coverage_holds_on_exchangeable_data():
    """R independent calibration/test splits. Split conformal says each split's coverage is
    Beta(k, n+1-k) (k = ceil((1-alpha)(n+1))), so the empirical coverage on m test queries is
    Beta-Binomial: the mean over R splits must match k/(n+1) within 4 standard errors, and about
    1% of splits may fall outside the central 99% interval (we allow 5% of them)."""
    rng = np.random.default_rng(12345)
    R, n_cal, m, K, kp, V, alpha = 200, 200, 200, 4, 12, 32, 0.1
    ids, sc, labels = _synthetic(rng, R * (n_cal + m), K, kp, V, bits=3, s_max=8.0)
    swarm = cf.swarm_scores(ids, sc, vocab=V)
    y_scores = swarm[np.arange(len(labels)), labels]
    a, b = cf.coverage_beta(n_cal, alpha)
    lo, hi = cf.beta_binomial_interval(m, a, b, level=0.99)
    covs, outside = [], 0
    for r in range(R):
        sl = slice(r * (n_cal + m), (r + 1) * (n_cal + m))
        cal, test = y_scores[sl][:n_cal], slice(sl.start + n_cal, sl.stop)
        qhat = cf.conformal_quantile(cal, alpha)
        assert math.isfinite(qhat)
        cov = cf.coverage(cf.prediction_sets(swarm[test], qhat), labels[test])
        covs.append(cov)
        outside += not lo <= cov <= hi
    mean = a / (a + b)
    var_one = (m * a * b * (a + b + m)) / ((a + b) ** 2 * (a + b + 1)) / m**2  # Beta-Binomial variance / m^2
    se = math.sqrt(var_one / R)
    assert abs(np.mean(covs) - mean) <= 4 * se, (np.mean(covs), mean, se)
    assert np.mean(covs) >= 1 - alpha - 4 * se
    assert outside <= 0.05 * R
