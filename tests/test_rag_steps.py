"""FC-RAG node and hub steps without a fleet: scoring, the signed payload, calibration, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from broker.wire.codec import PayloadError
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.rag import steps as rag_steps
from pipeline.rag.config import RAGConfig, RAGConfigError
from pipeline.rag.retrieval import PassageIndex, TfidfEmbedder

SECRET = b"test-secret"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))


@pytest.fixture(scope="module")
def index():
    text = np.frombuffer(b"The quick brown fox jumps over the lazy dog. " * 40, dtype=np.uint8)
    return PassageIndex.build(text, 32, TfidfEmbedder(128))


def test_model_input_keeps_the_query_whole_and_the_best_passage_next_to_it():
    x = rag_steps.model_input(b"query", [b"second best", b"best"], 16)
    assert x.tobytes() == b"second best\nbest\nquery"[-16:]
    assert rag_steps.model_input(b"q" * 40, [b"p"], 16).tobytes() == b"q" * 16
    assert rag_steps.model_input(b"", [], 16).tobytes() == b"\n"


def test_node_scores_are_the_top_candidates_clipped(model, index):
    cfg = RAGConfig(candidates=8, budget=32, s_max=6.0).validate()
    out = rag_steps.node_scores(model, index, [b"the lazy d", b"jumps ov", b""], cfg)
    assert out.ids.shape == out.scores.shape == (3, 8) and out.retrieved.shape == (3, 1)
    assert np.all(np.diff(out.scores, axis=1) >= 0)  # most probable (lowest score) first
    assert out.scores.min() >= 0 and out.scores.max() <= 6.0
    assert all(len(set(row)) == 8 for row in out.ids.tolist())
    no_rag = rag_steps.node_scores(model, None, [b"the lazy d"], RAGConfig(candidates=8, budget=32, passages=0))
    assert no_rag.retrieved.shape == (1, 0)


def _payload(cfg, node="1", bits=None, n=5, seed=1):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(256)[: cfg.candidates] for _ in range(n)])
    scores = np.sort(rng.uniform(0, cfg.s_max, size=ids.shape), axis=1).astype(np.float32)
    out = rag_steps.NodeScores(ids, scores, np.zeros((n, 0), np.int64))
    wire = rag_steps.encode_node_payload(out, bits=bits or cfg.bits_of(node), cfg=cfg, secret=SECRET, job="rag-x",
                                         rnd=3, node=node, dither_seed=99)
    return out, wire


def test_payload_round_trip_ids_exact_scores_within_a_step():
    cfg = RAGConfig(candidates=16, budget=64, s_max=8.0).validate()  # 4 bits per score
    out, wire = _payload(cfg)
    ids, scores, nbytes = rag_steps.decode_node_payload(wire, secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3,
                                                        node="1", n=5, cfg=cfg)
    np.testing.assert_array_equal(ids, out.ids)
    step = 8.0 / 15
    assert np.abs(scores - out.scores).max() <= step + 1e-5  # dithered: within one step
    assert nbytes == len(wire) < 5 * 16 * 2 + 1100  # 4 bits + 8 id bits per candidate, plus two headers
    raw = RAGConfig(candidates=16, budget=16 * 32).validate()
    out, wire = _payload(raw)
    _, scores, _ = rag_steps.decode_node_payload(wire, secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3,
                                                 node="1", n=5, cfg=raw)
    np.testing.assert_allclose(scores, out.scores, atol=1e-5)  # B = 32 bits per score: float32


@pytest.mark.parametrize("mangle, match", [
    (lambda w, cfg: _payload(cfg, bits=8)[1], "budget of node 1"),  # more bits than the budget allows
    (lambda w, cfg: w[: len(w) // 2], "msgpack"),
    (lambda w, cfg: w.replace(b"rag-x", b"rag-y"), "signature"),
])
def test_payload_off_protocol_is_rejected(mangle, match):
    cfg = RAGConfig(candidates=16, budget=64).validate()
    _, wire = _payload(cfg)
    with pytest.raises(PayloadError, match=match):
        rag_steps.decode_node_payload(mangle(wire, cfg), secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3,
                                      node="1", n=5, cfg=cfg)
    with pytest.raises(PayloadError, match="node"):  # node 1's payload is not node 2's
        rag_steps.decode_node_payload(wire, secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3, node="2", n=5,
                                      cfg=cfg)


def test_duplicate_candidates_are_rejected():
    cfg = RAGConfig(candidates=4, budget=16).validate()
    out = rag_steps.NodeScores(np.array([[1, 1, 2, 3]]), np.ones((1, 4), np.float32), np.zeros((1, 0), np.int64))
    wire = rag_steps.encode_node_payload(out, bits=4, cfg=cfg, secret=SECRET, job="j", rnd=0, node="0",
                                         dither_seed=None)
    with pytest.raises(PayloadError, match="twice"):
        rag_steps.decode_node_payload(wire, secret=SECRET, max_bytes=10**6, job="j", rnd=0, node="0", n=1, cfg=cfg)


def test_calibration_round_trip_and_subset_recalibration():
    cfg = RAGConfig(nodes=3, candidates=4, budget=16, node_budgets={"2": 8}).validate()
    rng = np.random.default_rng(0)
    n = 300
    ids = np.stack([[rng.permutation(8)[:4] for _ in range(3)] for _ in range(n)])
    scores = rng.uniform(0, 10, size=ids.shape)
    labels = rng.integers(0, 8, n)
    mask = np.array([True, True, False])  # node 2 missed the calibration round
    cal = rag_steps.calibrate(ids, scores, mask, labels, cfg, {"job": "j"})
    assert cal.node_mask.tolist() == [True, True, False] and cal.bits == [4, 4, 2]
    back = rag_steps.Calibration.from_bytes(cal.to_bytes())
    np.testing.assert_array_equal(back.label_scores, cal.label_scores)
    assert back.meta == {"job": "j"} and back.s_max == cal.s_max
    both, one = cal.bound(0.7, np.array([True, True, False])), cal.bound(0.7, np.array([True, False, False]))
    assert both["merged"] == 2 and one["merged"] == 1
    assert math.isfinite(one["qhat"]) and math.isfinite(both["qhat"]) and one["slack"]["f_max"] > 0
    # Delta_RAG / f_max = sqrt(sum v) / K: one merged node has sqrt(2) times the noise of two
    ratio = (one["slack"]["rag"] / one["slack"]["f_max"]) / (both["slack"]["rag"] / both["slack"]["f_max"])
    assert ratio == pytest.approx(math.sqrt(2))
    res = rag_steps.predict(ids[:10], scores[:10], np.array([True, True, True]), cal, [0.1, 0.5])
    assert res["used_nodes"] == [0, 1] and res["uncalibrated"] == [2]  # never merge an uncalibrated node
    q = res["queries"][0]
    assert [s for _, s in q["cands"]] == sorted(s for _, s in q["cands"])
    qhat = res["bounds"]["0.5"]["qhat"]
    assert q["sets"]["0.5"] == [y for y, s in q["cands"] if s <= qhat]


def test_config_is_strict():
    assert RAGConfig.from_dict(RAGConfig().to_dict()) == RAGConfig()
    with pytest.raises(RAGConfigError, match="unknown FC-RAG option"):
        RAGConfig.from_dict({"budgett": 3})
    with pytest.raises(RAGConfigError, match="must be int"):
        RAGConfig.from_dict({"budget": "128"})
    with pytest.raises(RAGConfigError, match="candidates \\(32\\) x b"):
        RAGConfig(budget=100).validate()
    with pytest.raises(RAGConfigError, match="unknown node"):
        RAGConfig(node_budgets={"7": 64}).validate()
    with pytest.raises(RAGConfigError, match="fault key"):
        RAGConfig(faults={"1@train": "slow:1"}).validate()
    cfg = RAGConfig(faults={"1@predict": "slow:3", "2": "raise:1"}).validate()
    assert cfg.fault_for("1", "predict") == "slow:3" and cfg.fault_for("1", "calibrate") is None
    assert cfg.fault_for("2", "calibrate") == "raise:1"
    assert math.isclose(RAGConfig(budget=32 * 32).validate().bits_of("0"), 32)


def test_node_index_persists_in_the_state_dir(tmp_path, monkeypatch):
    """Built once, then found on disk by a fresh worker process (memory cache cleared)."""
    from workers import base, rag

    data = tmp_path / "private.txt"
    data.write_bytes(b"Once upon a time there was a node with private text. " * 200)
    monkeypatch.setenv("LMTEAM_NODE_DATA", str(data))
    monkeypatch.setenv("LMTEAM_STATE_DIR", str(tmp_path / "state"))
    caches = (base.private_tokens, rag._data_sha)
    for c in caches:
        c.cache_clear()
    rag._INDEXES.clear()
    try:
        cfg = RAGConfig(passage_bytes=64, embed_dim=64).validate()
        _, first = rag.node_index(cfg)
        assert first["source"] == "built" and first["passages"] == len(data.read_bytes()) // 64
        assert (tmp_path / "state" / "rag" / f"index-{first['index']}" / "index.safetensors").exists()
        assert rag.node_index(cfg)[1]["source"] == "memory"
        rag._INDEXES.clear()  # a new worker process
        assert rag.node_index(cfg)[1]["source"] == "disk"
        other = rag.node_index(RAGConfig(passage_bytes=32, embed_dim=64).validate())[1]
        assert other["source"] == "built" and other["index"] != first["index"]
    finally:
        for c in caches:
            c.cache_clear()
        rag._INDEXES.clear()
