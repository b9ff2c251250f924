"""SmallTalk LM's Celery tasks: routers, scoring shards and experts, thin over pipeline/smalltalk/steps.py.

Every task is idempotent: it first looks for its own output and returns at once if it is there;
outputs are written first-wins (put_blob_once, submit_payload). Expert training checkpoints its
full state (weights, AdamW moments, step) as safetensors into the store every
cfg.checkpoint_every steps: a redelivered task, on any expert worker, resumes there.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from broker import keys
from broker.app import app
from broker.jobs import JobRecord
from pipeline.smalltalk.config import DENSE, SmallTalkConfig
from workers.base import FleetTask, blob, device_for, secret, store

if TYPE_CHECKING:  # torch loads in the pool process at the first task, never in the supervising parent
    import torch

_SEQS: dict[str, torch.Tensor] = {}


@cache
def job_config(job_id: str) -> SmallTalkConfig:
    """A job's config never changes, so it is read once per worker process."""
    return SmallTalkConfig.from_dict(JobRecord(store().r, job_id).config())


def pool(job_id: str) -> torch.Tensor:
    """The job's training sequences, loaded once per worker process (one job kept)."""
    from pipeline.data import windows_from_bytes

    if job_id not in _SEQS:
        _SEQS.clear()
        _SEQS[job_id] = windows_from_bytes(blob(store(), job_id, "seqs"), job_config(job_id).block_size)
    return _SEQS[job_id]


def assignment(job_id: str, rnd: int) -> np.ndarray:
    from pipeline.smalltalk.data import assignment_from_bytes

    return assignment_from_bytes(blob(store(), job_id, f"assign/{rnd}"), len(pool(job_id)))


def _router_record(e: object) -> str:
    return f"router{e}"


def _score_record(shard: object) -> str:
    return f"score{shard}"


def _expert_record(name: object) -> str:
    return DENSE if name == DENSE else f"expert{name}"


def _mean_tail(losses: list[float]) -> float | None:
    return float(np.mean(losses[-10:])) if losses else None


@app.task(bind=True, base=FleetTask, name=keys.SMALLTALK_ROUTER_TASK,
          record_as=staticmethod(_router_record))
def smalltalk_train_router(self, job_id: str, rnd: int, e: int) -> dict:
    """EM round `rnd`, router e: continue from its previous round on the sequences assigned to it."""
    from pipeline.models.checkpoint import model_from_bytes, model_to_bytes
    from pipeline.smalltalk.steps import new_router, train_router

    run = self.begin(job_id, rnd, e, done=lambda st: st.has_blob(job_id, f"router/{rnd}/{e}"),
                     done_status="done")
    if run is None:
        return {"round": rnd, "status": "done", "skipped": True}
    cfg = job_config(job_id)
    router = model_from_bytes(run.blob(f"router/{rnd - 1}/{e}")) if rnd else new_router(cfg, e)
    rows = np.nonzero(assignment(job_id, rnd) == e)[0]
    losses = train_router(cfg, router, pool(job_id)[rows], rnd, e, progress=run.progress)
    run.st.put_blob_once(job_id, f"router/{rnd}/{e}", model_to_bytes(router))
    run.finish("done", sequences=len(rows), train_loss=_mean_tail(losses))
    return {"round": rnd, "status": "done"}


@app.task(bind=True, base=FleetTask, name=keys.SMALLTALK_SCORE_TASK,
          record_as=staticmethod(_score_record))
def smalltalk_score(self, job_id: str, rnd: int, shard: int) -> dict:
    """Score one shard of the next EM set with all routers of round `rnd`; send the losses as a payload."""
    from pipeline.models.checkpoint import model_from_bytes
    from pipeline.smalltalk.steps import encode_scores, score

    name = f"score{shard}"
    run = self.begin(job_id, rnd, shard, done=lambda st: st.get_payload(job_id, rnd, name) is not None,
                     done_status="done")
    if run is None:
        return {"round": rnd, "status": "done", "skipped": True}
    cfg = job_config(job_id)
    index = np.frombuffer(run.blob(f"score/{rnd}/index"), dtype="<i4")
    rows = index[shard * cfg.score_shard:(shard + 1) * cfg.score_shard].astype(np.int64)
    routers = [model_from_bytes(run.blob(f"router/{rnd}/{e}")) for e in range(cfg.experts)]
    losses = score(cfg, routers, pool(job_id)[rows])
    payload = encode_scores(losses, cfg, secret=secret(), job=job_id, rnd=rnd, shard=name)
    outcome = run.submit(payload)
    run.finish("done", sequences=len(rows), payload_bytes=len(payload), outcome=outcome)
    return {"round": rnd, "status": "done"}


@app.task(bind=True, base=FleetTask, name=keys.SMALLTALK_EXPERT_TASK,
          record_as=staticmethod(_expert_record))
def smalltalk_train_expert(self, job_id: str, rnd: int, name: str) -> dict:
    """Stage 2: train expert `name` (or the dense baseline) on its cluster, checkpointing to the store.

    `rnd` is the job's em_rounds: stage 2 is recorded, and its assignment stored, as the round
    after the last EM round.
    """
    from pipeline.models.lm import state_bytes
    from pipeline.models.train import Checkpointing
    from pipeline.models.train_state import state_from_bytes, state_to_bytes
    from pipeline.smalltalk.steps import expert_from_bytes, new_expert, train_expert

    run = self.begin(job_id, rnd, name, done=lambda st: st.has_blob(job_id, f"expert/{name}/model"),
                     done_status="done")
    if run is None:
        return {"round": rnd, "status": "done", "skipped": True}
    cfg = job_config(job_id)
    device = device_for(cfg.device)
    raw = run.st.get_blob(job_id, f"expert/{name}/ckpt")
    state = state_from_bytes(raw, lambda data: expert_from_bytes(cfg, data, device)) if raw else None
    model = state.model if state else new_expert(cfg, device)
    rows = np.arange(len(pool(job_id))) if name == DENSE else np.nonzero(assignment(job_id, rnd) == int(name))[0]
    run.record(resumed_from=state.step if state else 0, sequences=len(rows))

    def save(step: int, opt: torch.optim.Optimizer) -> None:
        run.st.put_blob(job_id, f"expert/{name}/ckpt", state_to_bytes(step, model, opt, state_bytes))
        run.record(checkpoint_step=step)

    ckpt = Checkpointing(every=cfg.checkpoint_every, save=save, resume_step=state.step if state else 0,
                         resume_optimizer=state.optimizer if state else None)
    losses = train_expert(cfg, name, model, pool(job_id)[rows], checkpointing=ckpt,
                          progress=run.progress)
    run.st.put_blob_once(job_id, f"expert/{name}/model", state_bytes(model))
    run.finish("done", train_loss=_mean_tail(losses))
    return {"round": rnd, "status": "done"}
