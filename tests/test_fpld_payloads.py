"""FPLD's uplink schemes and their merge at a real-sized vocabulary: pure functions, no fleet."""

from __future__ import annotations

import numpy as np
import pytest

from broker.wire.codec import decode_logits
from pipeline.fpld.config import FPLDConfig
from pipeline.fpld.merge import RoundMerge
from pipeline.fpld.steps import encode_probe_logits
from pipeline.models.train import mean_kl

SECRET = b"k" * 32
M, V = 32, 4000


def _logits(seed: int, top: float = 35.0) -> np.ndarray:
    """LM-like rows: a Zipf-shaped distribution whose top logit sits far above the clip (as SmolLM2's do)."""
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((M, V)), axis=1) + 1
    x = top - 3.0 * np.log(ranks) + rng.normal(0, 0.3, (M, V))
    return x.astype(np.float32)


def _cfg(**kw) -> FPLDConfig:
    return FPLDConfig(probe_seqs=1, block_size=M, **kw).validate()


def test_dense_rows_are_aligned_to_their_top_logit():
    """Clipping raw logits at +-20 would cut the top tokens; aligned rows keep 8 bits accurate."""
    x = _logits(0)
    cfg = _cfg(bits=8)
    wire = encode_probe_logits(cfg, x, secret=SECRET, job="j", rnd=0, node="0")
    got, _ = decode_logits(wire, secret=SECRET, expect_shape=(M, V))
    assert mean_kl(x, got) < 0.01
    clipped = np.clip(x, -cfg.clip, cfg.clip)
    assert mean_kl(x, clipped) > 10 * mean_kl(x, got)  # what the old range did to such rows


@pytest.mark.parametrize("k", [16, 64])
def test_sparse_merge_is_close_to_the_full_precision_mean(k):
    """Nodes near the reference: merging their sparse payloads (tails shaped by the reference)
    gives nearly the full-precision teacher; a token outside one node's top-k is not a zero logit."""
    ref = _logits(1)
    rng = np.random.default_rng(2)
    nodes = [ref + rng.normal(0, 0.3, ref.shape).astype(np.float32) for _ in range(3)]
    cfg = _cfg(bits=8, payload="sparse", topk=k)
    merge = RoundMerge(cfg, job="j", rnd=0, vocab=V, secret=SECRET, max_bytes=1 << 24, reference=ref)
    for i, x in enumerate(nodes):
        wire = encode_probe_logits(cfg, x, secret=SECRET, job="j", rnd=0, node=str(i))
        assert merge.fold(str(i), wire) == len(wire) < M * V  # far below one byte per logit
    full = np.mean(nodes, axis=0)
    teacher = merge.teacher.mean()
    assert merge.count == 3 and teacher.shape == (M, V) and np.all(np.isfinite(teacher))
    assert mean_kl(full, teacher) < 0.05
    # the uniform-tail alternative is much worse on the same payloads
    uniform = RoundMerge(cfg, job="j", rnd=0, vocab=V, secret=SECRET, max_bytes=1 << 24,
                         reference=np.zeros_like(ref))
    for i, x in enumerate(nodes):
        uniform.fold(str(i), encode_probe_logits(cfg, x, secret=SECRET, job="j", rnd=0, node=str(i)))
    assert mean_kl(full, uniform.teacher.mean()) > 3 * mean_kl(full, teacher)


def test_sparse_merge_needs_a_reference():
    with pytest.raises(ValueError, match="reference"):
        RoundMerge(_cfg(payload="sparse"), job="j", rnd=0, vocab=V, secret=SECRET, max_bytes=1 << 20)
