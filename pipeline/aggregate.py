"""Aggregation math: pure functions on numpy arrays, no I/O.

FPLD (arXiv 2605.09986, Algorithm 1) merges node logits by the arithmetic mean in logit space,
which makes the teacher a normalised geometric mean (product of experts) of the node models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


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
