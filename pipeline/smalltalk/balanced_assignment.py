"""SmallTalk LM's balanced assignment of sequences to experts (arXiv 2410.03529, Algorithm 1).

Pure numpy, no torch: the submitter runs it on the (sequences x experts) loss matrix that the
scoring tasks sent back, and the TF-IDF baseline runs it on squared distances to centroids.

The rule (paper, "balanced_assignments"): every expert gets an equal share, capacity ceil(N/E).
Sequences are taken most confident first, i.e. by ascending best loss (-max_e log p(x_1:M | e));
each goes to its best expert that still has room. Assigning row by row in corpus order instead
lets early sequences fill the popular experts and pushes late, confident ones to bad experts
(the paper's Fig. 1); confidence order puts the displacement on the least confident sequences.

`order="margin"` sorts by the gap between best and second-best loss instead (the classic greedy
for balanced transport); it is an option, not the paper's rule.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Order = Literal["best", "margin"]


def capacity(n: int, experts: int) -> int:
    """Most sequences one expert may take: ceil(N / E)."""
    if experts < 1:
        raise ValueError(f"need at least one expert, got {experts}")
    if n < 0:
        raise ValueError(f"number of sequences must be >= 0, got {n}")
    return math.ceil(n / experts) if n else 0


def confidence_order(losses: np.ndarray, order: Order = "best") -> np.ndarray:
    """Indices of rows, most confident first (stable: ties keep corpus order, so results are reproducible)."""
    losses = _check(losses)
    if order == "best":
        key = losses.min(axis=1)  # low best loss = high likelihood under some router
    elif order == "margin":
        if losses.shape[1] == 1:
            key = np.zeros(len(losses))
        else:
            two = np.partition(losses, 1, axis=1)[:, :2]  # (N, 2): best, second best
            key = -(two[:, 1] - two[:, 0])  # large margin first
    else:
        raise ValueError(f"order must be 'best' or 'margin', got {order!r}")
    return np.argsort(key, kind="stable")


def balanced_assignment(losses: np.ndarray, order: Order = "best", cap: int | None = None) -> np.ndarray:
    """Expert index per row of `losses` (N x E, lower is better), no expert over capacity.

    Returns an int64 array of shape (N,). With `cap` None the capacity is ceil(N/E), so every
    expert gets ceil(N/E) or floor(N/E)-ish rows; a larger `cap` loosens the balance (cap >= N is
    plain argmin). Deterministic: ties in confidence keep row order, ties in loss the lower expert.
    """
    losses = _check(losses)
    n, e = losses.shape
    cap = capacity(n, e) if cap is None else int(cap)
    if cap * e < n:
        raise ValueError(f"capacity {cap} x {e} experts cannot hold {n} sequences")
    prefs = np.argsort(losses, axis=1, kind="stable")  # (N, E): each row's experts, best first
    room = np.full(e, cap, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    for i in confidence_order(losses, order):
        for expert in prefs[i]:
            if room[expert]:
                room[expert] -= 1
                out[i] = expert
                break
    return out


def random_balanced(n: int, experts: int, seed: int) -> np.ndarray:
    """A random balanced split (the EM's starting point): a shuffled round-robin, sizes differ by <= 1."""
    if experts < 1:
        raise ValueError(f"need at least one expert, got {experts}")
    rng = np.random.default_rng(seed)
    return rng.permutation(np.arange(n) % experts).astype(np.int64)


def cluster_sizes(assignment: np.ndarray, experts: int) -> list[int]:
    return np.bincount(np.asarray(assignment, dtype=np.int64), minlength=experts).tolist()


def _check(losses: np.ndarray) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] < 1:
        raise ValueError(f"losses must be a 2-D (sequences x experts) array, got shape {losses.shape}")
    if not np.all(np.isfinite(losses)):
        raise ValueError("losses contain non-finite values")
    return losses
