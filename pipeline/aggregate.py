"""Aggregation math: pure functions on numpy arrays, no I/O.

FPLD (arXiv 2605.09986, Algorithm 1) merges node logits by the arithmetic mean in logit space,
which makes the teacher a normalised geometric mean (product of experts) of the node models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class QuorumError(RuntimeError):
    """Too few nodes made it into the merge."""


def default_quorum(nodes: int) -> int:
    """Three quarters of the nodes, rounded up (3 of 4, 6 of 8)."""
    return max(1, math.ceil(0.75 * nodes))


def mean_logits(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Arithmetic mean of same-shape (rows, V) logit arrays, accumulated in float64."""
    if not logits:
        raise ValueError("mean_logits needs at least one array")
    shape = logits[0].shape
    acc = np.zeros(shape, dtype=np.float64)
    for x in logits:
        if x.shape != shape:
            raise ValueError(f"shape mismatch: {x.shape} vs {shape}")
        acc += x
    return (acc / len(logits)).astype(np.float32)


def check_quorum(merged: int, nodes: int, quorum: int, detail: str = "") -> None:
    """Raise QuorumError with a readable message when fewer than `quorum` nodes merged."""
    if merged < quorum:
        msg = f"only {merged} of {nodes} nodes merged, quorum is {quorum}"
        raise QuorumError(f"{msg}: {detail}" if detail else msg)
