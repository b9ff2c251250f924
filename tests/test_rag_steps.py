"""FC-RAG node and hub steps without a fleet: option scoring, the signed payload, calibration, config."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from broker.wire.codec import PayloadError
from pipeline.rag import steps as rag_steps
from pipeline.rag.config import RAGConfig, RAGConfigError
from pipeline.rag.retrieval import PassageIndex, TfidfEmbedder

SECRET = b"test-secret"


@pytest.fixture(scope="module")
def index():
    text = np.frombuffer(b"Gretel pushed the witch into the oven. Hansel and Gretel went home. " * 30, dtype=np.uint8)
    return PassageIndex.build(text, 64, TfidfEmbedder(128), stride=32)


def test_queries_blob_round_trip():
    qs = [rag_steps.Query("Who?", ("a", "b", "c", "d"), "It was"), rag_steps.Query("Wo, bitte?", ("ä", "b", "c", "d"))]
    assert rag_steps.queries_from_blob(rag_steps.queries_to_blob(qs)) == qs
    with pytest.raises(ValueError, match="list of"):
        rag_steps.queries_from_blob(msgpack.packb([["text", "lead", "not a list"]]))


def test_node_scores_score_every_option_with_the_model(tiny_llama_dir, index):
    """Every option gets a clipped mean-NLL score; k=0 scores without passages."""
    from pipeline.models.lm import build_model, tokenizer_for

    cfg = RAGConfig(model=str(tiny_llama_dir), block_size=64, passage_bytes=64, s_max=6.0, budget=16).validate()
    model, tok = build_model(cfg.model_spec(), "cpu"), tokenizer_for(cfg.model_spec())
    qs = [rag_steps.Query("Who pushed the witch into the ____?", ("oven", "well", "river", "tower"), "Gretel pushed"),
          rag_steps.Query("Who went home?", ("Hansel", "Gretel", "the witch", "nobody"))]
    out = rag_steps.node_scores(model, tok, index, qs, cfg)
    assert out.scores.shape == (2, 4) and out.retrieved.shape == (2, 2)
    assert out.scores.min() >= 0 and out.scores.max() <= 6.0 and len(set(out.scores[0].tolist())) > 1
    bare = rag_steps.node_scores(model, tok, None, qs, RAGConfig(block_size=64, passages=0, s_max=6.0).validate())
    assert bare.retrieved.shape == (2, 0) and not np.allclose(bare.scores, out.scores)
    with pytest.raises(ValueError, match="options"):
        rag_steps.node_scores(model, tok, index, [rag_steps.Query("?", ("a", "b"))], cfg)


def _payload(cfg, node="1", bits=None, n=5, seed=1):
    rng = np.random.default_rng(seed)
    scores = rng.uniform(0, cfg.s_max, size=(n, cfg.options)).astype(np.float32)
    out = rag_steps.NodeScores(scores, np.zeros((n, 0), np.int64))
    wire = rag_steps.encode_node_payload(out, bits=bits or cfg.bits_of(node), cfg=cfg, secret=SECRET, job="rag-x",
                                         rnd=3, node=node, dither_seed=99)
    return out, wire


def test_payload_round_trip_scores_within_a_step():
    cfg = RAGConfig(budget=16, s_max=8.0).validate()  # 4 options x 4 bits per score
    out, wire = _payload(cfg)
    scores, nbytes = rag_steps.decode_node_payload(wire, secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3,
                                                   node="1", n=5, cfg=cfg)
    step = 8.0 / 15
    assert np.abs(scores - out.scores).max() <= step + 1e-5  # dithered: within one step
    assert nbytes == len(wire) < 5 * 4 // 2 + 600  # 4 bits per option plus one header
    raw = RAGConfig(budget=4 * 32).validate()
    out, wire = _payload(raw)
    scores, _ = rag_steps.decode_node_payload(wire, secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3,
                                              node="1", n=5, cfg=raw)
    np.testing.assert_allclose(scores, out.scores, atol=1e-5)  # B = 32 bits per score: float32


@pytest.mark.parametrize("mangle, match", [
    (lambda w, cfg: _payload(cfg, bits=8)[1], "budget of node 1"),  # more bits than the budget allows
    (lambda w, cfg: w[: len(w) // 2], None),
    (lambda w, cfg: w.replace(b"rag-x", b"rag-y"), "signature"),
])
def test_payload_off_protocol_is_rejected(mangle, match):
    cfg = RAGConfig(budget=16).validate()
    _, wire = _payload(cfg)
    with pytest.raises(PayloadError, match=match):
        rag_steps.decode_node_payload(mangle(wire, cfg), secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3,
                                      node="1", n=5, cfg=cfg)
    with pytest.raises(PayloadError, match="node"):  # node 1's payload is not node 2's
        rag_steps.decode_node_payload(wire, secret=SECRET, max_bytes=10**6, job="rag-x", rnd=3, node="2", n=5,
                                      cfg=cfg)


def test_calibration_round_trip_and_subset_recalibration():
    cfg = RAGConfig(nodes=3, budget=16, node_budgets={"2": 8}).validate()
    rng = np.random.default_rng(0)
    n = 300
    decoded = {str(i): rng.uniform(0, 10, size=(n, 4)) for i in range(3)}
    ids, scores, _ = rag_steps.stack_nodes(decoded, cfg.node_ids, n, 4)
    assert ids.shape == scores.shape == (n, 3, 4) and (ids[5, 2] == np.arange(4)).all()
    labels = rng.integers(0, 4, n)
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
    assert [s for _, s in q["cands"]] == sorted(s for _, s in q["cands"]) and len(q["cands"]) == 4
    qhat = res["bounds"]["0.5"]["qhat"]
    assert q["sets"]["0.5"] == [y for y, s in q["cands"] if s <= qhat]
    assert len(q["sets"]["0.1"]) >= len(q["sets"]["0.5"])


def test_config_is_strict():
    assert RAGConfig.from_dict(RAGConfig().to_dict()) == RAGConfig()
    with pytest.raises(RAGConfigError, match="unknown FC-RAG option"):
        RAGConfig.from_dict({"budgett": 3})
    with pytest.raises(RAGConfigError, match="must be int"):
        RAGConfig.from_dict({"budget": "128"})
    with pytest.raises(RAGConfigError, match="options \\(4\\) x b"):
        RAGConfig(budget=34).validate()
    with pytest.raises(RAGConfigError, match="unknown node"):
        RAGConfig(node_budgets={"7": 64}).validate()
    with pytest.raises(RAGConfigError, match="fault key"):
        RAGConfig(faults={"1@train": "slow:1"}).validate()
    cfg = RAGConfig(faults={"1@predict": "slow:3", "2": "raise:1"}).validate()
    assert cfg.fault_for("1", "predict") == "slow:3" and cfg.fault_for("1", "calibrate") is None
    assert cfg.fault_for("2", "calibrate") == "raise:1"
    assert math.isclose(RAGConfig(budget=4 * 32).validate().bits_of("0"), 32)
    assert [RAGConfig(budget=b).validate().bits_of("0") for b in (8, 16, 32, 128)] == [2, 4, 8, 32]


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
        assert first["source"] == "built" and first["passages"] == (len(data.read_bytes()) - 64) // 32 + 1  # half-overlapping
        assert (tmp_path / "state" / "rag" / f"index-{first['index']}" / "index.safetensors").exists()
        assert rag.node_index(cfg)[1]["source"] == "memory"
        rag._INDEXES.clear()  # a new worker process
        assert rag.node_index(cfg)[1]["source"] == "disk"
        other = rag.node_index(RAGConfig(passage_bytes=32, embed_dim=64).validate())[1]
        assert other["source"] == "built" and other["index"] != first["index"]
        # a job's questions exclude their windows: another index, with fewer passages
        index, fewer = rag.node_index(cfg, [(0, 2000)])
        assert fewer["source"] == "built" and fewer["index"] != first["index"]
        assert fewer["passages"] < first["passages"] and index.meta["excluded_spans"] == 1
    finally:
        for c in caches:
            c.cache_clear()
        rag._INDEXES.clear()
