"""Aggregation math: pure functions on numpy arrays, no I/O.

FPLD (arXiv 2605.09986, Algorithm 1) merges node logits by the arithmetic mean in logit space,
which makes the teacher a normalised geometric mean (product of experts) of the node models.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class RunningMean:
    """The mean of same-shape arrays added one at a time, in float64: a merge holds one sum, not K
    decoded payloads, so the aggregator's memory does not grow with the number of nodes."""

    def __init__(self) -> None:
        self.sum: np.ndarray | None = None
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        if self.sum is None:
            self.sum = np.zeros(x.shape, dtype=np.float64)
        elif x.shape != self.sum.shape:
            raise ValueError(f"shape mismatch: {x.shape} vs {self.sum.shape}")
        self.sum += x
        self.count += 1

    def state(self) -> tuple[dict[str, np.ndarray], int]:
        """The sum and its count: what a group aggregator sends the root (broker/wire/partial.py)."""
        return ({} if self.sum is None else {"sum": self.sum}), self.count

    def add_state(self, arrays: dict[str, np.ndarray], count: int) -> None:
        """Add another RunningMean's state(): the root of a two-level merge adding a group's sum."""
        if count:
            if self.sum is not None and arrays["sum"].shape != self.sum.shape:
                raise ValueError(f"shape mismatch: {arrays['sum'].shape} vs {self.sum.shape}")
            self.sum = arrays["sum"].astype(np.float64) if self.sum is None else self.sum + arrays["sum"]
            self.count += count

    def mean(self) -> np.ndarray:
        if self.sum is None:
            raise ValueError("the mean of no arrays")
        return (self.sum / self.count).astype(np.float32)


def mean_logits(logits: Sequence[np.ndarray]) -> np.ndarray:
    """Arithmetic mean of same-shape (rows, V) logit arrays, accumulated in float64."""
    if not logits:
        raise ValueError("mean_logits needs at least one array")
    acc = RunningMean()
    for x in logits:
        acc.add(x)
    return acc.mean()


class TensorMeans:
    """RunningMean per named tensor: FedAvg's merge of the nodes' weights, one node at a time."""

    def __init__(self) -> None:
        self.sums: dict[str, RunningMean] = {}
        self.count = 0

    def add(self, tensors: dict[str, np.ndarray]) -> None:
        if self.sums and set(tensors) != set(self.sums):
            raise ValueError(f"tensor names differ: {sorted(set(tensors) ^ set(self.sums))[:3]}")
        for name, x in tensors.items():
            self.sums.setdefault(name, RunningMean()).add(np.asarray(x))
        self.count += 1

    def state(self) -> tuple[dict[str, np.ndarray], int]:
        return {name: m.sum for name, m in self.sums.items()}, self.count

    def add_state(self, arrays: dict[str, np.ndarray], count: int) -> None:
        if not count:
            return
        if self.sums and set(arrays) != set(self.sums):
            raise ValueError(f"tensor names differ: {sorted(set(arrays) ^ set(self.sums))[:3]}")
        for name, x in arrays.items():
            self.sums.setdefault(name, RunningMean()).add_state({"sum": x}, count)
        self.count += count

    def means(self) -> dict:
        """The mean of every tensor, as torch tensors (what a safetensors state blob holds)."""
        import torch

        return {name: torch.from_numpy(m.mean()) for name, m in self.sums.items()}
