"""A served expert's one Celery task: generate what is queued for this replica's expert, in batches.

A replica is `lmteam worker --role expert --serve RUN --expert I`: it consumes queue expert.<I>
(LMTEAM_SERVE_RUN, LMTEAM_SERVE_EXPERT) and loads its expert once per worker process, when the
process starts. The task is a doorbell (pipeline/smalltalk/serve_driver.py): it claims up to
LMTEAM_SERVE_BATCH queued requests, generates them in one forward, stores each answer once
(broker/serving.py), and goes on until nothing is queued.

Not a FleetTask: that base records attempts in a job's rounds, and a request belongs to no job.
Nothing here retries either: an error is stored as the request's answer, so the submitter
reports it at once instead of waiting; a replica that dies is the submitter's to fail over.
"""

from __future__ import annotations

import os
import time
from functools import cache

import numpy as np
from celery import signals
from celery.utils.log import get_task_logger

from broker import keys, serving
from broker.app import app, settings_of
from workers.base import device_for, one_line, store

log = get_task_logger(__name__)


@cache
def served() -> tuple:
    """(run, expert index, model, tokenizer) this replica serves, loaded once per worker process."""
    from pipeline.smalltalk.serve_driver import open_served

    run = open_served(os.environ["LMTEAM_SERVE_RUN"], store().r)
    expert = int(os.environ["LMTEAM_SERVE_EXPERT"])
    return run, expert, run.expert(expert, device_for(run.cfg.device)), run.tokenizer()


@signals.worker_process_init.connect
def _load_expert(**_: object) -> None:
    if os.environ.get("LMTEAM_SERVE_RUN"):
        try:
            served()  # the first request should not wait for the weights
        except Exception as e:  # the task stores the error as the answer, where the submitter sees it
            log.error("cannot load the served expert: %s", one_line(e))


@app.task(bind=True, name=keys.SERVE_TASK, acks_late=True, reject_on_worker_lost=True)
def serve_generate(self, expert: int, rid: str) -> dict:
    """Doorbell for request `rid` of `expert`: answer every request queued for the expert, batch by batch."""
    from pipeline.smalltalk.serve import Sampling, generate_batch

    r, host = store().r, self.request.hostname or "local"
    name = os.environ.get("LMTEAM_WORKER_NAME", host)
    limit = settings_of(app).serve_batch
    answered = 0
    while rids := serving.claim_batch(r, expert, host, limit):
        t0 = time.time()
        bodies = serving.get_requests(r, rids)
        base = {"expert": expert, "replica": name, "host": host}
        try:
            run, mine, model, tok = served()
            if mine != expert:
                raise RuntimeError(f"request for expert {expert} reached a replica of expert {mine}")
            wrong = [b["run"] for b in bodies.values() if b["run"] != run.run_id]
            if wrong:
                raise RuntimeError(f"this replica serves run {run.run_id}, the request is for run {wrong[0]}")
            order = list(bodies)
            prompts = [np.frombuffer(bodies[q]["ids"], dtype="<i4").astype(np.int64) for q in order]
            sampling = [Sampling(int(b["max_new"]), float(b["temperature"]), int(b["top_k"]) or None, int(b["seed"]))
                        for b in (bodies[q] for q in order)]
            new, sizes = generate_batch(model, prompts, sampling, limit)
        except Exception as e:  # every claimed request gets the error as its answer
            log.exception("serving expert %d failed", expert)
            for q, b in bodies.items():
                serving.put_answer(r, q, b["submission"], {**base, "error": one_line(e)})
            continue
        gen_ms = 1000 * (time.time() - t0)
        for q, ids, size in zip(order, new, sizes, strict=True):
            b = bodies[q]
            answered += serving.put_answer(r, q, b["submission"], {
                **base, "text": tok.decode(ids), "batch": size, "gen_ms": gen_ms,
                "queue_ms": 1000 * (t0 - float(b["sent_at"]))})
    return {"expert": expert, "answered": answered}
