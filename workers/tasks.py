"""Celery tasks: thin wrappers that load inputs from the store, call pipeline code, write outputs.

Node tasks never raise out of the task: a chord-style "one failure fails all" would sink the
round, so a node records its status (arrived, late, failed) and the aggregator applies the
deadline and quorum itself. Retries happen inside the task via `self.retry` with backoff.
"""

from __future__ import annotations

import os
import time
from functools import cache
from pathlib import Path

import numpy as np
from celery import signals
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from broker.app import FPLD_AGGREGATE_TASK, FPLD_NODE_TASK, app, settings_of
from broker.codec import decode_logits, encode_logits
from broker.jobs import JobRecord, NodeStatus
from broker.store import Store
from pipeline.faults import PAYLOAD_KINDS, Fault, mangle, parse_faults
from pipeline.fpld_config import FPLDConfig
from workers import registry
from workers.round_gate import classify_nodes, quorum_error, wait_and_seal

log = get_task_logger(__name__)


@cache
def store() -> Store:
    s = settings_of(app)
    return Store.from_url(s.backend_url, ttl=s.blob_ttl)


def secret() -> bytes:
    return settings_of(app).secret.encode()


@cache
def private_tokens() -> np.ndarray:
    """This worker's private text (LMTEAM_NODE_DATA), loaded once per process."""
    from pipeline.data import load_corpus

    paths = [p for p in os.environ.get("LMTEAM_NODE_DATA", "").split(os.pathsep) if p]
    if not paths:
        raise RuntimeError("this worker holds no private data: start it with `lmteam worker --role node --data PATH`")
    return np.concatenate([d.tokens for d in load_corpus(paths)])


def state_dir() -> Path:
    """Node-local disk (LMTEAM_STATE_DIR): survives the worker process, unlike memory."""
    return Path(os.environ.get("LMTEAM_STATE_DIR") or Path("lmteam-state") / os.environ.get("LMTEAM_WORKER_NAME", "worker"))


def job_config(job_id: str) -> FPLDConfig:
    return FPLDConfig.from_dict(JobRecord(store().r, job_id).config())


# --- worker lifecycle -------------------------------------------------------------------------

@signals.worker_process_init.connect
def _limit_threads(**_: object) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("LMTEAM_THREADS", "1")))


@signals.worker_ready.connect
def _register(sender: object = None, **_: object) -> None:
    registry.register(store().r, sender.hostname, os.environ.get("LMTEAM_WORKER_NAME", sender.hostname),
                      os.environ.get("LMTEAM_ROLE", "?"), os.environ.get("LMTEAM_QUEUE", "?"),
                      os.environ.get("LMTEAM_NODE_ID"))


@signals.worker_shutdown.connect
def _unregister(sender: object = None, **_: object) -> None:
    try:
        registry.unregister(store().r, sender.hostname)
    except Exception:  # Redis may already be gone at teardown; nothing to clean then
        pass


# --- FPLD -------------------------------------------------------------------------------------

@app.task(bind=True, name=FPLD_NODE_TASK, max_retries=None)
def fpld_node_round(self, job_id: str, rnd: int, node: str) -> dict:
    """Fine-tune on private data, send quantized probe logits. Returns a small receipt."""
    from pipeline.data import windows_from_bytes
    from pipeline.fpld_steps import node_round

    st = store()
    job = JobRecord(st.r, job_id)
    if st.is_closed(job_id, rnd):  # queued behind a slow task until after the deadline: skip the work
        st.node_update(job_id, rnd, node, status=NodeStatus.LATE.value, reason="started after the deadline")
        return {"node": node, "round": rnd, "status": "late"}
    attempt = st.node_incr(job_id, rnd, node, "attempts")
    st.node_update(job_id, rnd, node, status="running", started_at=time.time(), worker=self.request.hostname,
                   retries=self.request.retries)
    job.event("node_start", round=rnd, node=node, attempt=attempt)
    try:
        cfg = job_config(job_id)
        mine = os.environ.get("LMTEAM_NODE_ID")
        if mine is not None and mine != node:
            raise RuntimeError(f"task for node {node} reached the worker of node {mine}: check queue routing")
        fault = _fault_for(cfg, node, rnd)
        _inject_before_work(fault, attempt, self.request.retries)

        def progress(step: int, loss: float) -> None:
            st.node_update(job_id, rnd, node, step=step, loss=round(loss, 4))

        ckpt_path = state_dir() / "checkpoints" / f"{job_id}-r{rnd}-n{node}.safetensors"

        out = node_round(cfg, job=job_id, rnd=rnd, node=node, student=_blob(st, job_id, f"student/{rnd}"),
                         private=private_tokens(),
                         probe=windows_from_bytes(_blob(st, job_id, "probe"), cfg.block_size),
                         eval_windows=windows_from_bytes(_blob(st, job_id, "eval"), cfg.block_size),
                         secret=secret(), progress=progress, checkpoint=ckpt_path)
        ckpt_path.unlink(missing_ok=True)
        payload = _inject_before_send(fault, out.payload)
        if out.full_logits is not None:
            st.put_blob(job_id, f"diag/{rnd}/{node}",
                        encode_logits(out.full_logits, secret=secret(), job=job_id, round=rnd, node=node, bits=32))
        outcome = st.submit_payload(job_id, rnd, node, payload)
        st.node_update(job_id, rnd, node, finished_at=time.time(), **out.metrics)
        job.event("node_finish", round=rnd, node=node, outcome=outcome, bytes=len(payload))
        return {"node": node, "round": rnd, "status": outcome, "bytes": len(payload)}
    except Retry:
        raise
    except SoftTimeLimitExceeded:
        return _node_failed(job, st, rnd, node, "soft time limit exceeded")
    except Exception as e:
        limit = settings_of(app).max_retries
        if self.request.retries < limit:
            st.node_update(job_id, rnd, node, status="retrying", last_error=_one_line(e))
            job.event("node_retry", round=rnd, node=node, error=_one_line(e), retry=self.request.retries + 1)
            raise self.retry(exc=e, countdown=settings_of(app).retry_backoff * 2 ** self.request.retries) from None
        return _node_failed(job, st, rnd, node, _one_line(e))


def _fault_for(cfg: FPLDConfig, node: str, rnd: int) -> Fault | None:
    fault = parse_faults(cfg.faults).get(node)
    return fault if fault and fault.fires(rnd) else None


def _inject_before_work(fault: Fault | None, attempt: int, retries: int) -> None:
    if fault and fault.kind == "crash" and attempt == 1:
        os._exit(1)  # the worker process dies mid-task; acks_late + reject_on_worker_lost redeliver it
    if fault and fault.kind == "raise" and retries < fault.arg:
        raise RuntimeError(f"injected fault: raise on attempt {retries + 1}")


def _inject_before_send(fault: Fault | None, payload: bytes) -> bytes:
    if fault and fault.kind == "slow":
        time.sleep(fault.arg)
    if fault and fault.kind in PAYLOAD_KINDS:
        return mangle(payload, fault, secret())
    return payload


def _node_failed(job: JobRecord, st: Store, rnd: int, node: str, error: str) -> dict:
    st.node_update_if_open(job.id, rnd, node, status=NodeStatus.FAILED.value, error=error, finished_at=time.time())
    job.event("node_failed", round=rnd, node=node, error=error)
    log.warning("node %s round %d failed: %s", node, rnd, error)
    return {"node": node, "round": rnd, "status": "failed", "error": error}


@app.task(bind=True, name=FPLD_AGGREGATE_TASK, max_retries=None)
def fpld_aggregate_round(self, job_id: str, rnd: int, deadline: float) -> dict:
    """Wait for the nodes until the deadline, seal the round, merge what arrived, distill."""
    st = store()
    done = st.round_result(job_id, rnd)
    if done is not None:  # redelivered after it already finished
        return done
    try:
        return _aggregate(st, job_id, rnd, deadline)
    except Exception as e:
        # The submitter waits on the round result: an error must end the round, not leave it hanging.
        result = {"round": rnd, "status": "failed", "error": f"round {rnd}: aggregator error: {_one_line(e)}"}
        st.put_round_result(job_id, rnd, result)
        log.exception("aggregate round %d of %s failed", rnd, job_id)
        return result


def _aggregate(st: Store, job_id: str, rnd: int, deadline: float) -> dict:
    from pipeline.data import windows_from_bytes
    from pipeline.fpld_steps import merge_and_distill

    job = JobRecord(st.r, job_id)
    cfg = job_config(job_id)
    nodes = cfg.node_ids
    t_start = time.time()
    st.node_update(job_id, rnd, "aggregator", status="waiting for nodes")
    states, t_sealed = wait_and_seal(st, job_id, rnd, nodes, deadline)

    def decode(node: str, payload: bytes) -> tuple[tuple[np.ndarray, np.ndarray | None], int]:
        x, meta = decode_logits(payload, secret=secret(), max_bytes=settings_of(app).max_payload_bytes,
                                expect_shape=(cfg.probe_seqs * cfg.block_size, 256),
                                expect_job=job_id, expect_round=rnd, expect_node=node)
        diag = st.get_blob(job_id, f"diag/{rnd}/{node}")
        return (x, decode_logits(diag, secret=secret())[0] if diag is not None else None), meta.nbytes

    decoded, final = classify_nodes(st, job_id, rnd, states, decode)
    logits = [x for x, _ in decoded.values()]
    full = [d for _, d in decoded.values() if d is not None]
    for node, v in final.items():
        st.node_update(job_id, rnd, node, final=v["status"])
    result: dict = {"round": rnd, "nodes": final, "merged": len(logits), "waited_s": t_sealed - t_start,
                    "sealed_at": t_sealed}
    error = quorum_error(rnd, final, cfg.nodes, cfg.effective_quorum)
    if error is not None:
        result.update(status="failed", error=error)
        st.put_round_result(job_id, rnd, result)
        job.event("round_failed", round=rnd, error=error)
        return result
    if len(full) != len(logits):
        full = []  # teacher KL only compares like with like

    def progress(step: int, loss: float) -> None:
        st.node_update(job_id, rnd, "aggregator", step=step, loss=round(loss, 4))

    st.node_update(job_id, rnd, "aggregator", status=f"distilling from {len(logits)} nodes")

    student, metrics = merge_and_distill(
        cfg, job=job_id, rnd=rnd, student=_blob(st, job_id, f"student/{rnd}"), node_logits=logits,
        probe=windows_from_bytes(_blob(st, job_id, "probe"), cfg.block_size),
        eval_windows=windows_from_bytes(_blob(st, job_id, "eval"), cfg.block_size), full_logits=full,
        progress=progress)
    st.put_blob_once(job_id, f"student/{rnd + 1}", student)
    st.node_update(job_id, rnd, "aggregator", status="done", final="merged")
    result.update(status="ok", finished_at=time.time(), **metrics)
    st.put_round_result(job_id, rnd, result)
    job.event("round_merged", round=rnd, merged=len(logits))
    return st.round_result(job_id, rnd) or result


def _blob(st: Store, job_id: str, name: str) -> bytes:
    data = st.get_blob(job_id, name)
    if data is None:
        raise RuntimeError(f"missing {name} for job {job_id} in the store (expired or never written)")
    return data


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
