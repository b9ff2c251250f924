"""Split-conformal math for FC-RAG (arXiv 2605.09986, §3.3 and Theorem 5.4): pure numpy, no I/O.

Scores are nonconformity scores, lower = more plausible: s_i(X, y) = -log P(y | X, Z_i) on node i.
The hub merges node scores by the arithmetic mean over the nodes that proposed y (a product of
experts in probability space); a label no node proposed scores +inf. The prediction set is
{y : s_swarm(X, y) <= q_hat}, q_hat being the ceil((1-alpha)(n+1))-th smallest calibration score.

The slack of Theorem 5.4 (coverage >= 1 - alpha - slack) is built here from its parts:
  1/(n_cal+1)                           finite-sample term of split conformal
  Delta_RAG = f_max sqrt(sum_i v(B_i)) / K   quantized node scores (B_i bits per query summary)
  Delta_FL  = f_max sqrt(log(2/delta) / (c n_cal)) + f_max phi(B_cal)   the calibration draw
See `slack` for the constants we use and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

RAW_BITS = 32


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(alpha)


def quantile_rank(n: int, alpha: float) -> int:
    """k = ceil((1 - alpha)(n + 1)): the rank of the conformal quantile among n calibration scores.

    Rounded to 9 decimals first: (1 - 0.2) * 100 is 80.00000000000001 in floating point, and
    an exact ceil of that would ask for one score more than the definition does.
    """
    _check_alpha(alpha)
    return math.ceil(round((1.0 - alpha) * (n + 1), 9))


def conformal_quantile(scores: ArrayLike, alpha: float) -> float:
    """The k-th smallest calibration score, k = ceil((1-alpha)(n+1)); +inf when k > n.

    +inf calibration scores (true label proposed by no node) are allowed and sort last. With
    q_hat = +inf the prediction set is the whole label space, which is what keeps the
    guarantee when too few calibration points exist for this alpha.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    if np.isnan(s).any():
        raise ValueError("calibration scores contain NaN")
    k = quantile_rank(s.size, alpha)
    if k > s.size:
        return math.inf
    return float(np.partition(s, k - 1)[k - 1])


def swarm_scores(cand_ids: np.ndarray, cand_scores: np.ndarray, node_mask: ArrayLike | None = None, *,
                 vocab: int) -> np.ndarray:
    """Hub merge: (n, K, k') candidate ids and scores -> (n, vocab) mean score over proposing nodes.

    `vocab` is |Y|, the size of the label space (the options of a multiple-choice question).

    node_mask (K,) bool selects the merged nodes (dropped ones are left out). A label proposed by
    no merged node gets +inf. Candidate ids within one node's row must be distinct (the hub
    checks that when it decodes a payload), otherwise a node could count twice.
    """
    ids = np.asarray(cand_ids)
    sc = np.asarray(cand_scores, dtype=np.float64)
    if ids.shape != sc.shape or ids.ndim != 3:
        raise ValueError(f"cand_ids {ids.shape} and cand_scores {sc.shape} must both be (n, K, k')")
    n, K, kp = ids.shape
    mask = np.ones(K, dtype=bool) if node_mask is None else np.asarray(node_mask, dtype=bool)
    if mask.shape != (K,):
        raise ValueError(f"node_mask must have shape ({K},), got {mask.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"candidate ids must be in [0, {vocab})")
    use = np.broadcast_to(mask[None, :, None], ids.shape)
    rows = np.broadcast_to(np.arange(n)[:, None, None], ids.shape)
    flat = (rows * vocab + ids)[use]
    sums = np.bincount(flat, weights=sc[use], minlength=n * vocab).reshape(n, vocab)
    counts = np.bincount(flat, minlength=n * vocab).reshape(n, vocab)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    return out


def label_scores(cand_ids: np.ndarray, cand_scores: np.ndarray, labels: ArrayLike) -> np.ndarray:
    """Per node, the score of the true label: (n, K), +inf where that node did not propose it."""
    ids = np.asarray(cand_ids)
    y = np.asarray(labels).reshape(-1, 1, 1)
    hit = ids == y
    return np.where(hit, np.asarray(cand_scores, dtype=np.float64), np.inf).min(axis=2)


def merged_label_scores(per_node: np.ndarray, node_mask: ArrayLike | None = None) -> np.ndarray:
    """Swarm score of the true label from per-node label scores (n, K): mean of the finite ones.

    Equal to swarm_scores(...)[j, y_j]; kept separate so the hub can recompute calibration
    scores for any subset of nodes from what it stored at calibration time.
    """
    s = np.asarray(per_node, dtype=np.float64)
    if node_mask is not None:
        s = s[:, np.asarray(node_mask, dtype=bool)]
    finite = np.isfinite(s)
    cnt = finite.sum(axis=1)
    total = np.where(finite, s, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, total / np.maximum(cnt, 1), np.inf)


def prediction_sets(swarm: np.ndarray, qhat: float) -> np.ndarray:
    """Boolean (n, |Y|) sets {y : s_swarm <= q_hat}. q_hat = +inf gives every label."""
    swarm = np.asarray(swarm, dtype=np.float64)
    if math.isinf(qhat) and qhat > 0:
        return np.ones(swarm.shape, dtype=bool)
    return swarm <= qhat


def coverage(sets: np.ndarray, labels: ArrayLike) -> float:
    """Fraction of rows whose set contains its label."""
    y = np.asarray(labels)
    if len(y) == 0:
        raise ValueError("coverage needs at least one query")
    return float(np.asarray(sets)[np.arange(len(y)), y].mean())


def mean_set_size(sets: np.ndarray) -> float:
    return float(np.asarray(sets).sum(axis=1).mean())


# --- slack of Theorem 5.4 -----------------------------------------------------------------------

def score_variance(bits: int, s_max: float) -> float:
    """v(B): variance of one dithered quantized score on [0, s_max] at `bits` bits.

    Our quantizer (broker/wire/quantize.py) puts both range ends on the grid, step s_max/(2^b - 1), and
    subtractive dither makes the error uniform on one step: variance step^2/12. The paper's grid
    (step s_max/2^b) gives s_max^2 2^(-2b)/12 (paper_score_variance), a little smaller; we report
    the variance of the quantizer actually used. bits=32 sends float32: v = 0.
    """
    if bits == RAW_BITS:
        return 0.0
    if not 1 <= bits <= 16:
        raise ValueError(f"bits per score must be 1..16 or 32, got {bits}")
    step = s_max / ((1 << bits) - 1)
    return step * step / 12.0


def paper_score_variance(bits: int, s_max: float) -> float:
    """The paper's v(B) = s_max^2 2^(-2B/k') / 12 with B/k' = bits per score (Assumption B3)."""
    return 0.0 if bits == RAW_BITS else s_max * s_max * 2.0 ** (-2 * bits) / 12.0


def estimate_fmax(cal_scores: ArrayLike, qhat: float, radius: float = 0.0) -> float:
    """f_max of Assumption B5: the largest density of the swarm score near q_hat.

    Estimated from the calibration scores with a Gaussian kernel density (Silverman's bandwidth h),
    evaluated on a grid over [q_hat - r, q_hat + r], r = max(h, radius), and the maximum taken.
    The density is of the whole score distribution: the finite part is weighted by its share
    (labels no node proposed sit at +inf and carry no density). Returns 0 when q_hat is +inf
    (the set is then every label and nothing can perturb coverage) or scores are too few.
    """
    s = np.asarray(cal_scores, dtype=np.float64).ravel()
    finite = s[np.isfinite(s)]
    if not math.isfinite(qhat) or finite.size < 2:
        return 0.0
    q75, q25 = np.percentile(finite, [75, 25])
    spread = min(finite.std(), (q75 - q25) / 1.34) or finite.std()
    h = max(0.9 * spread * finite.size ** (-0.2), 1e-3)
    r = max(h, radius)
    grid = np.linspace(qhat - r, qhat + r, 41)
    z = (grid[:, None] - finite[None, :]) / h
    dens = np.exp(-0.5 * z * z).sum(axis=1) / (finite.size * h * math.sqrt(2 * math.pi))
    return float(dens.max() * finite.size / s.size)


def delta_rag(f_max: float, variances: Sequence[float]) -> float:
    """Delta_RAG = f_max sqrt(sum_i v(B_i)) / K over the K merged nodes."""
    if not variances:
        return 0.0
    return f_max * math.sqrt(float(sum(variances))) / len(variances)


def calibration_term(n_cal: int, delta: float) -> float:
    """sqrt(log(2/delta) / (2 n_cal)): how far the coverage of one calibration draw can fall, w.p. 1-delta.

    The paper's Delta_FL first term is f_max sqrt(log(2/delta)/(c n_cal)) with c from its quantile
    concentration (B4). We take c = 2 f_max^2, the DKW constant moved into coverage units, so the
    f_max factors cancel: it is the Dvoretzky-Kiefer-Wolfowitz bound on the empirical CDF.
    """
    if n_cal < 1 or not 0 < delta < 1:
        raise ValueError("need n_cal >= 1 and delta in (0, 1)")
    return math.sqrt(math.log(2.0 / delta) / (2.0 * n_cal))


def slack(n_cal: int, f_max: float, variances: Sequence[float], delta: float = 0.05,
          phi_cal: float = 0.0) -> dict[str, float]:
    """The slack of Theorem 5.4 and its parts: coverage >= 1 - alpha - total (w.p. 1 - delta).

    phi_cal is phi(B_cal), the error of quantized calibration summaries; 0 when the hub holds the
    calibration scores exactly, as lmteam's hub does.
    """
    parts = {"conformal": 1.0 / (n_cal + 1), "rag": delta_rag(f_max, variances),
             "fl": calibration_term(n_cal, delta) + f_max * phi_cal}
    return {**parts, "total": sum(parts.values()), "f_max": f_max, "delta": delta}


# --- the distribution of conformal coverage (for tests and the bench) ---------------------------

def coverage_beta(n_cal: int, alpha: float) -> tuple[int, int]:
    """Coverage given one calibration draw is Beta(k, n+1-k) for continuous scores (Vovk 2012).

    k > n (q_hat = +inf) means coverage 1; returned as (n+1, 0) and handled by the callers.
    """
    k = quantile_rank(n_cal, alpha)
    return min(k, n_cal + 1), max(n_cal + 1 - k, 0)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_binomial_interval(m: int, a: float, b: float, level: float = 0.999) -> tuple[float, float]:
    """Central `level` interval of X/m, X ~ BetaBinomial(m, a, b): the empirical coverage on m test
    queries when the true coverage of the calibration draw is Beta(a, b). Exact, no scipy."""
    if b <= 0:
        return 1.0, 1.0
    x = np.arange(m + 1)
    logpmf = np.array([math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1)
                       + _log_beta(i + a, m - i + b) - _log_beta(a, b) for i in x])
    cdf = np.cumsum(np.exp(logpmf - logpmf.max()))
    cdf /= cdf[-1]
    tail = (1.0 - level) / 2.0
    lo = int(np.searchsorted(cdf, tail))
    hi = int(np.searchsorted(cdf, 1.0 - tail))
    return lo / m, min(hi, m) / m
