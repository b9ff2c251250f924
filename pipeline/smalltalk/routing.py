"""Prefix routing for SmallTalk LM and the two baselines of its ablation, as pure functions.

- SmallTalk (arXiv 2410.03529): router e scores a sequence by its mean next-token loss on the
  first M tokens; the lowest loss picks the one expert that runs (no balancing at inference).
- Random routing: a uniformly random expert, ignoring the text.
- c-BTM style (arXiv 2303.14177): TF-IDF of the prefix -> truncated SVD -> L2 normalise ->
  balanced k-means; a sequence goes to its nearest centroid. c-BTM uses word TF-IDF; on byte
  prefixes as short as 8 bytes words alone leave most vectors empty, so hashed character
  trigrams are added to the words (which makes the baseline stronger, not weaker). The balanced
  k-means assignment step is our greedy balanced rule, where c-BTM solves it exactly with an
  auction algorithm.

Everything is numpy except `prefix_losses`, which runs the router LMs.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.models.gpt import GPT
from pipeline.smalltalk.balanced_assignment import balanced_assignment

_SCORE_BATCH = 256


@torch.no_grad()
def prefix_losses(routers: list[GPT], seqs: torch.Tensor, prefix: int) -> np.ndarray:
    """Mean next-token loss (nats) of every router on the first `prefix` tokens: (N, E) float32.

    Token s+1 is predicted from tokens 1..s for s < prefix, i.e. prefix - 1 predictions (Eq. 9).
    The mean rather than the paper's sum: same argmin, and numbers comparable across prefixes.
    """
    if prefix < 2:
        raise ValueError(f"a routing prefix needs at least 2 tokens, got {prefix}")
    if seqs.ndim != 2 or seqs.shape[1] < prefix:
        raise ValueError(f"sequences of shape {tuple(seqs.shape)} are shorter than the prefix {prefix}")
    out = np.empty((len(seqs), len(routers)), dtype=np.float32)
    for e, router in enumerate(routers):
        if router.config.block_size < prefix - 1:
            raise ValueError(f"router {e} has block_size {router.config.block_size} < prefix - 1 = {prefix - 1}")
        was_training = router.training
        router.eval()
        for i in range(0, len(seqs), _SCORE_BATCH):
            x = seqs[i : i + _SCORE_BATCH, :prefix]  # (b, M)
            logits, _ = router(x[:, :-1])  # (b, M-1, V)
            nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (b, M-1)
            out[i : i + len(x), e] = nll.mean(dim=1).numpy()
        router.train(was_training)
    return out


def route(losses: np.ndarray) -> np.ndarray:
    """Inference routing: the expert whose router has the lowest prefix loss (ties: lower index)."""
    losses = np.asarray(losses)
    if losses.ndim != 2 or losses.shape[1] < 1:
        raise ValueError(f"losses must be (sequences x experts), got shape {losses.shape}")
    return losses.argmin(axis=1).astype(np.int64)


def random_routing(n: int, experts: int, seed: int) -> np.ndarray:
    """A uniformly random expert per sequence (the ablation's floor)."""
    return np.random.default_rng(seed).integers(0, experts, size=n).astype(np.int64)


# --- c-BTM style: TF-IDF + SVD + balanced k-means ------------------------------------------------

_WORD = re.compile(rb"[A-Za-z_][A-Za-z_']+|\d+")
# c-BTM drops English stop-words; a short list does most of the work without shipping a lexicon.
_STOP = frozenset(b"""a an and are as at be but by for from had has have he her his i if in into is it
its of on or she so that the their them then there they this to was we were which will with you""".split())


def _hash_features(prefixes: np.ndarray, dim: int) -> np.ndarray:
    """Term counts (N, dim) float32: hashed byte 1-, 2- and 3-grams and (lower-cased) words, numbers as #NUMBER."""
    n, m = prefixes.shape
    counts = np.zeros((n, dim), dtype=np.float32)
    p = prefixes.astype(np.uint64)
    for k in (1, 2, 3):
        if m < k:
            continue
        codes = np.full((n, m - k + 1), np.uint64(k) << np.uint64(32))  # the n-gram order is part of the term
        for j in range(k):
            codes |= p[:, j : m - k + 1 + j] << np.uint64(8 * j)
        buckets = ((codes * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) % np.uint64(dim)  # Fibonacci hash
        rows = np.repeat(np.arange(n), m - k + 1)
        np.add.at(counts, (rows, buckets.reshape(-1).astype(np.int64)), 1.0)
    for i in range(n):
        for w in _WORD.findall(prefixes[i].tobytes()):
            w = b"#NUMBER" if w[:1].isdigit() else w.lower()
            if w not in _STOP:
                counts[i, zlib.crc32(b"w:" + w) % dim] += 1.0
    return counts


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _randomized_svd(x: np.ndarray, k: int, seed: int, power: int = 3) -> np.ndarray:
    """Top-k right singular vectors (dim x k) of x (Halko et al. 2011), numpy only."""
    rng = np.random.default_rng(seed)
    k = min(k, *x.shape)
    q = np.linalg.qr(x @ rng.standard_normal((x.shape[1], k + 10)))[0]  # (N, k+10)
    for _ in range(power):
        q = np.linalg.qr(x @ (x.T @ q))[0]
    _, _, vt = np.linalg.svd(q.T @ x, full_matrices=False)  # (k+10, dim)
    return vt[:k].T.astype(np.float32)


@dataclass
class TfidfRouter:
    """A fitted c-BTM-style clusterer: idf weights, SVD basis and k centroids, all numpy."""

    prefix: int
    dim: int
    idf: np.ndarray  # (dim,)
    basis: np.ndarray  # (dim, k_svd)
    centroids: np.ndarray  # (E, k_svd), unit rows

    def embed(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        x = _hash_features(_prefix_bytes(seqs, self.prefix), self.dim)
        x = _l2(np.log1p(x) * self.idf)  # sublinear tf, idf, L2 (the TfidfVectorizer pipeline)
        return _l2(x @ self.basis)  # truncated SVD, then c-BTM's Normalizer

    def distances(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        """Squared Euclidean distance of each sequence to each centroid: (N, E), lower is closer."""
        z = self.embed(seqs)
        return np.maximum(0.0, 2.0 - 2.0 * z @ self.centroids.T)  # unit vectors: |a-b|^2 = 2 - 2ab

    def route(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        return route(self.distances(seqs))

    def assign_balanced(self, seqs: np.ndarray | torch.Tensor) -> np.ndarray:
        return balanced_assignment(self.distances(seqs))


def fit_tfidf_router(seqs: np.ndarray | torch.Tensor, experts: int, prefix: int, *, dim: int = 2048,
                     components: int = 100, iters: int = 20, seed: int = 0) -> TfidfRouter:
    """Fit TF-IDF + SVD + balanced k-means on the first `prefix` bytes of `seqs` (N, >= prefix)."""
    raw = _hash_features(_prefix_bytes(seqs, prefix), dim)
    n = len(raw)
    if n < experts:
        raise ValueError(f"need at least {experts} sequences to fit {experts} clusters, got {n}")
    df = (raw > 0).sum(axis=0)
    idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)  # smooth idf, as sklearn
    x = _l2(np.log1p(raw) * idf)
    basis = _randomized_svd(x, components, seed)
    z = _l2(x @ basis)  # (N, k)
    centroids = _kmeans_pp(z, experts, np.random.default_rng(seed))
    for _ in range(iters):
        assign = balanced_assignment(np.maximum(0.0, 2.0 - 2.0 * z @ centroids.T))
        new = np.stack([z[assign == c].mean(axis=0) if np.any(assign == c) else centroids[c]
                        for c in range(experts)])
        new = _l2(new)  # spherical k-means: centroids stay on the unit sphere like the points
        if np.allclose(new, centroids, atol=1e-6):
            break
        centroids = new
    return TfidfRouter(prefix, dim, idf, basis, centroids.astype(np.float32))


def _kmeans_pp(z: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007)."""
    centers = [z[rng.integers(len(z))]]
    for _ in range(1, k):
        d2 = np.min(np.stack([((z - c) ** 2).sum(axis=1) for c in centers]), axis=0)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(z), 1.0 / len(z))
        centers.append(z[rng.choice(len(z), p=p)])
    return np.stack(centers)


def _prefix_bytes(seqs: np.ndarray | torch.Tensor, prefix: int) -> np.ndarray:
    arr = seqs.numpy() if isinstance(seqs, torch.Tensor) else np.asarray(seqs)
    if arr.ndim != 2 or arr.shape[1] < prefix:
        raise ValueError(f"sequences of shape {arr.shape} are shorter than the prefix {prefix}")
    return np.ascontiguousarray(arr[:, :prefix]).astype(np.uint8)
