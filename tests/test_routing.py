"""Prefix routing: router losses, route(), random routing and the c-BTM-style TF-IDF baseline."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.data import encode, windows
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.train import train_sequences
from pipeline.smalltalk.eval import cluster_stats
from pipeline.smalltalk.routing import fit_tfidf_router, prefix_losses, random_routing, route


def _router(seed: int, block: int = 16) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block, n_layer=1, n_head=2, n_embd=16))


def test_prefix_losses_are_mean_nll_of_the_prefix_only():
    routers = [_router(0), _router(1)]
    seqs = torch.randint(0, 256, (5, 33))
    out = prefix_losses(routers, seqs, prefix=8)
    assert out.shape == (5, 2) and out.dtype == np.float32
    x = seqs[:, :8]
    logits, _ = routers[1](x[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1), reduction="none").view(5, 7).mean(1)
    assert np.allclose(out[:, 1], want.detach().numpy(), atol=1e-5)
    # changing bytes after the prefix changes nothing: routing sees only the first M tokens
    seqs2 = seqs.clone()
    seqs2[:, 8:] = 0
    assert np.array_equal(prefix_losses(routers, seqs2, prefix=8), out)


def test_prefix_losses_refuse_bad_prefixes():
    with pytest.raises(ValueError):
        prefix_losses([_router(0)], torch.zeros(2, 10, dtype=torch.long), prefix=1)
    with pytest.raises(ValueError):
        prefix_losses([_router(0)], torch.zeros(2, 10, dtype=torch.long), prefix=11)
    with pytest.raises(ValueError):  # block_size 16 cannot score 40 tokens
        prefix_losses([_router(0)], torch.zeros(2, 50, dtype=torch.long), prefix=40)


def _prose_and_code() -> list[np.ndarray]:
    from pydoc_data.topics import topics

    prose = encode("\n".join(topics[k] for k in sorted(topics)))[:40_000]
    code = encode(Path(inspect.__file__).read_text())[:40_000]
    return [prose, code]


def test_trained_routers_route_their_own_text():
    sets = [windows(t, 32) for t in _prose_and_code()]
    routers = []
    for i, s in enumerate(sets):
        r = _router(i, block=32)
        train_sequences(r, s[:-40, :17], steps=300, batch_size=16, lr=3e-3, seed=i)
        routers.append(r)
    held = torch.cat([sets[0][-40:], sets[1][-40:]])
    picked = route(prefix_losses(routers, held, prefix=16))
    truth = np.repeat([0, 1], 40)
    assert (picked == truth).mean() > 0.7  # 16 bytes, tiny routers: measured 0.8 (chance: 0.5)


def test_route_is_argmin_and_random_routing_is_seeded():
    assert route(np.array([[2.0, 1.0, 3.0], [0.5, 0.5, 0.1]])).tolist() == [1, 2]
    r = random_routing(1000, 4, seed=3)
    assert np.array_equal(r, random_routing(1000, 4, seed=3))
    assert set(np.unique(r)) == {0, 1, 2, 3} and abs(np.bincount(r).mean() - 250) < 1
    with pytest.raises(ValueError):
        route(np.zeros(3))


def _two_domains(n: int = 150) -> tuple[torch.Tensor, np.ndarray]:
    prose = encode("The king walked into the garden where the roses grew and spoke of summer. " * 400)
    code = encode("def f(x):\n    return [i * 2 for i in range(x) if i % 3]\n# comment\n" * 400)
    a, b = windows(prose, 64)[:n], windows(code, 64)[:n]
    return torch.cat([a, b]), np.repeat([0, 1], n)


def test_tfidf_balanced_kmeans_separates_domains():
    seqs, labels = _two_domains()
    router = fit_tfidf_router(seqs, 2, prefix=32, dim=512, components=16, seed=0)
    assign = router.assign_balanced(seqs)
    assert np.bincount(assign).tolist() == [150, 150]  # balanced
    assert cluster_stats(assign, labels, ["prose", "code"], 2)["purity"] > 0.95
    routed = router.route(seqs)
    assert (routed == assign).mean() > 0.95
    d = router.distances(seqs[:3])
    assert d.shape == (3, 2) and (d >= 0).all()
    again = fit_tfidf_router(seqs, 2, prefix=32, dim=512, components=16, seed=0)
    assert np.array_equal(again.assign_balanced(seqs), assign)  # deterministic


def test_tfidf_runs_on_8_byte_prefixes_and_checks_sizes():
    # 8 bytes hold one or two words: k-means finds partitions as tight as the true one that are
    # not the domains (measured), the weakness the paper reports for short prefixes. Only check
    # that it works and stays balanced.
    seqs, _ = _two_domains(60)
    router = fit_tfidf_router(seqs, 2, prefix=8, dim=256, components=8, seed=1)
    assert np.bincount(router.assign_balanced(seqs)).tolist() == [60, 60]
    with pytest.raises(ValueError):
        fit_tfidf_router(seqs[:1], 2, prefix=8)
    with pytest.raises(ValueError):
        router.route(torch.zeros(2, 4, dtype=torch.long))


def test_cluster_stats_reports_size_dominant_and_purity():
    stats = cluster_stats(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 1, 1]), ["a", "b"], 3)
    c0, c1, c2 = stats["clusters"]
    assert (c0["size"], c0["dominant"], round(c0["purity"], 3)) == (3, "a", 0.667)
    assert (c1["dominant"], c1["purity"]) == ("b", 1.0)
    assert c2["size"] == 0 and c2["dominant"] is None
    assert stats["purity"] == pytest.approx(5 / 6)
