"""Celery tasks of SmallTalk LM: thin wrappers that load inputs from the store, call
pipeline.smalltalk_steps, and write outputs back.

Every task is idempotent: it first looks for its own output and returns at once if it is there;
outputs are written first-wins (put_blob_once, submit_payload). A task records its state in the
store's per-round node hash (status, step, loss, attempts, resumed_from), which is what the
submitter watches. After its last retry a task records `failed` and returns (the submitter turns
that into a failed job with the reason) instead of raising into Celery.

Expert training checkpoints its full state (weights, AdamW moments, step) as safetensors into the
store every cfg.checkpoint_every steps: a redelivered task, on any expert worker, resumes there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from celery.exceptions import Retry, SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from broker.app import app, settings_of
from broker.jobs import JobRecord
from broker.store import Store
from pipeline.smalltalk_config import EXPERT_TASK, ROUTER_TASK, SCORE_TASK, SmallTalkConfig
from workers.tasks import _one_line, secret, store

log = get_task_logger(__name__)
_SEQS: dict[str, torch.Tensor] = {}


@cache
def job_config(job_id: str) -> SmallTalkConfig:
    """A job's config never changes, so it is read once per worker process."""
    return SmallTalkConfig.from_dict(JobRecord(store().r, job_id).config())


def _blob(st: Store, job_id: str, name: str) -> bytes:
    data = st.get_blob(job_id, name)
    if data is None:
        raise RuntimeError(f"missing {name} for job {job_id} in the store (expired or never written)")
    return data


def pool(job_id: str) -> torch.Tensor:
    """The job's training sequences, loaded once per worker process (one job kept)."""
    from pipeline.data import windows_from_bytes

    if job_id not in _SEQS:
        _SEQS.clear()
        _SEQS[job_id] = windows_from_bytes(_blob(store(), job_id, "seqs"), job_config(job_id).block_size)
    return _SEQS[job_id]


def assignment(job_id: str, rnd: int) -> np.ndarray:
    from pipeline.smalltalk_data import assignment_from_bytes

    return assignment_from_bytes(_blob(store(), job_id, f"assign/{rnd}"), len(pool(job_id)))


def _run(task, job_id: str, rnd: int, name: str, done: Callable[[Store], bool],
         work: Callable[[Store], dict]) -> dict:
    """Common skeleton: skip if the output exists, count the attempt, run, record done / retry / failed."""
    st = store()
    if done(st):  # redelivered after its output was written: nothing to redo
        st.node_update(job_id, rnd, name, status="done")
        return {"name": name, "round": rnd, "status": "done", "skipped": True}
    attempt = st.node_incr(job_id, rnd, name, "attempts")
    st.node_update(job_id, rnd, name, status="running", started_at=time.time(), worker=task.request.hostname,
                   retries=task.request.retries)
    JobRecord(st.r, job_id).event("task_start", round=rnd, node=name, attempt=attempt)
    try:
        t0, cpu0 = time.perf_counter(), time.process_time()
        metrics = work(st)
        st.node_update(job_id, rnd, name, status="done", finished_at=time.time(), t_task=time.perf_counter() - t0,
                       cpu_s=time.process_time() - cpu0, **metrics)
        JobRecord(st.r, job_id).event("task_done", round=rnd, node=name)
        return {"name": name, "round": rnd, "status": "done"}
    except Retry:
        raise
    except SoftTimeLimitExceeded:
        return _failed(st, job_id, rnd, name, "soft time limit exceeded")
    except Exception as e:
        if task.request.retries < settings_of(app).max_retries:
            st.node_update(job_id, rnd, name, status="retrying", last_error=_one_line(e))
            raise task.retry(exc=e, countdown=settings_of(app).retry_backoff * 2 ** task.request.retries) from None
        return _failed(st, job_id, rnd, name, _one_line(e))


def _failed(st: Store, job_id: str, rnd: int, name: str, error: str) -> dict:
    st.node_update(job_id, rnd, name, status="failed", error=error, finished_at=time.time())
    JobRecord(st.r, job_id).event("task_failed", round=rnd, node=name, error=error)
    log.warning("smalltalk %s round %d failed: %s", name, rnd, error)
    return {"name": name, "round": rnd, "status": "failed", "error": error}


def _progress(st: Store, job_id: str, rnd: int, name: str):
    def progress(step: int, loss: float) -> None:
        st.node_update(job_id, rnd, name, step=step, loss=round(loss, 4))

    return progress


@app.task(bind=True, name=ROUTER_TASK, max_retries=None)
def smalltalk_train_router(self, job_id: str, rnd: int, e: int) -> dict:
    """EM round `rnd`, router e: continue from its previous round on the sequences assigned to it."""
    from pipeline.checkpoint import model_from_bytes, model_to_bytes
    from pipeline.smalltalk_steps import new_router, train_router

    def work(st: Store) -> dict:
        cfg = job_config(job_id)
        router = model_from_bytes(_blob(st, job_id, f"router/{rnd - 1}/{e}")) if rnd else new_router(cfg, e)
        rows = np.nonzero(assignment(job_id, rnd) == e)[0]
        losses = train_router(cfg, router, pool(job_id)[torch.from_numpy(rows)], rnd, e,
                              progress=_progress(st, job_id, rnd, f"router{e}"))
        st.put_blob_once(job_id, f"router/{rnd}/{e}", model_to_bytes(router))
        return {"sequences": len(rows), "train_loss": float(np.mean(losses[-10:])) if losses else None}

    return _run(self, job_id, rnd, f"router{e}", lambda st: st.has_blob(job_id, f"router/{rnd}/{e}"), work)


@app.task(bind=True, name=SCORE_TASK, max_retries=None)
def smalltalk_score(self, job_id: str, rnd: int, shard: int) -> dict:
    """Score one shard of the next EM set with all routers of round `rnd`; send the losses as a payload."""
    from pipeline.checkpoint import model_from_bytes
    from pipeline.smalltalk_steps import encode_scores, score

    name = f"score{shard}"

    def work(st: Store) -> dict:
        cfg = job_config(job_id)
        index = np.frombuffer(_blob(st, job_id, f"score/{rnd}/index"), dtype="<i4")
        rows = index[shard * cfg.score_shard:(shard + 1) * cfg.score_shard].astype(np.int64)
        routers = [model_from_bytes(_blob(st, job_id, f"router/{rnd}/{e}")) for e in range(cfg.experts)]
        losses = score(cfg, routers, pool(job_id)[torch.from_numpy(rows)])
        payload = encode_scores(losses, cfg, secret=secret(), job=job_id, rnd=rnd, shard=name)
        outcome = st.submit_payload(job_id, rnd, name, payload)
        return {"sequences": len(rows), "payload_bytes": len(payload), "outcome": outcome}

    return _run(self, job_id, rnd, name, lambda st: st.get_payload(job_id, rnd, name) is not None, work)


@app.task(bind=True, name=EXPERT_TASK, max_retries=None)
def smalltalk_train_expert(self, job_id: str, rnd: int, name: str) -> dict:
    """Stage 2: train expert `name` (or the dense baseline) on its cluster, checkpointing to the store.

    `rnd` is the job's em_rounds: stage 2 is recorded, and its assignment stored, as the round
    after the last EM round.
    """
    from pipeline.checkpoint import model_to_bytes
    from pipeline.smalltalk_config import DENSE
    from pipeline.smalltalk_steps import new_expert, train_expert
    from pipeline.train import Checkpointing
    from pipeline.train_state import state_from_bytes, state_to_bytes

    node = f"expert{name}" if name != DENSE else DENSE

    def work(st: Store) -> dict:
        cfg = job_config(job_id)
        raw = st.get_blob(job_id, f"expert/{name}/ckpt")
        state = state_from_bytes(raw) if raw else None
        model = state.model if state else new_expert(cfg)
        rows = (np.arange(len(pool(job_id))) if name == DENSE
                else np.nonzero(assignment(job_id, rnd) == int(name))[0])
        st.node_update(job_id, rnd, node, resumed_from=state.step if state else 0, sequences=len(rows))

        def save(step: int, opt: torch.optim.Optimizer) -> None:
            st.put_blob(job_id, f"expert/{name}/ckpt", state_to_bytes(step, model, opt))
            st.node_update(job_id, rnd, node, checkpoint_step=step)

        ckpt = Checkpointing(every=cfg.checkpoint_every, save=save, resume_step=state.step if state else 0,
                             resume_optimizer=state.optimizer if state else None)
        losses = train_expert(cfg, name, model, pool(job_id)[torch.from_numpy(rows)], checkpointing=ckpt,
                              progress=_progress(st, job_id, rnd, node))
        st.put_blob_once(job_id, f"expert/{name}/model", model_to_bytes(model))
        return {"train_loss": float(np.mean(losses[-10:])) if losses else None}

    return _run(self, job_id, rnd, node, lambda st: st.has_blob(job_id, f"expert/{name}/model"), work)
