"""The one Task base class of lmteam's workers, and what every task of every job kind shares.

A task body is load -> pure function (pipeline/) -> store. Everything around it lives here:

- Retries are Celery's own (`autoretry_for`, `retry_backoff`, `max_retries` from
  LMTEAM_MAX_RETRIES / LMTEAM_RETRY_BACKOFF): any exception but a soft time limit or a misrouted
  task is retried with exponential backoff, and each retry is recorded (`retrying`, the error,
  a `node_retry` event).
- After the last retry `on_failure` records the task `failed` in its per-round node hash, only
  while the round is open (a failure after the seal changes nothing), and wakes the waiter. A
  submitter or aggregator turns that record into a dropped node or a failed job.
- Every record (`begin`, `finish`, failure) lands in the store's node hash of (job, round, name),
  which is what `lmteam status`, the aggregator's round gate and the drivers read.
- Fault injection for drills (`--fault`) runs here, before the work and before the send, through
  broker/faults.py: task bodies never see it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
from celery import Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from broker import faults, keys, registry
from broker.app import app, settings_of
from broker.faults import Fault
from broker.jobs import JobRecord, NodeStatus
from broker.redelivery import restore_unacked
from broker.round_gate import (
    Seal,
    arrive,
    group_done,
    put_group_result,
    seal_group_when_due,
    seal_root_when_due,
    seal_when_due,
)
from broker.store import Store
from broker.waiting import notify

log = get_task_logger(__name__)


class MisroutedTask(RuntimeError):
    """A node's task reached another node's worker: retrying there cannot help."""


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


_IDS: dict[str, np.ndarray] = {}


def private_ids(spec) -> np.ndarray:
    """This worker's private text as token ids of the job's model (tokenized once per tokenizer)."""
    from pipeline.models.lm import tokenizer_for

    tok = tokenizer_for(spec)
    if tok.identity not in _IDS:
        _IDS[tok.identity] = tok.encode_bytes(private_tokens())
    return _IDS[tok.identity]


def device_for(job_device: str) -> str:
    """The device this worker trains on: its own --device (LMTEAM_DEVICE) wins over the job's."""
    from pipeline.models.lm import resolve_device

    return resolve_device(os.environ.get("LMTEAM_DEVICE") or job_device)


def state_dir() -> Path:
    """Node-local disk (LMTEAM_STATE_DIR): survives the worker process, unlike memory."""
    return Path(os.environ.get("LMTEAM_STATE_DIR") or Path("lmteam-state") / os.environ.get("LMTEAM_WORKER_NAME", "worker"))


def blob(st: Store, job_id: str, name: str) -> bytes:
    data = st.get_blob(job_id, name)
    if data is None:
        raise RuntimeError(f"missing {name} for job {job_id} in the store (expired or never written)")
    return data


def end_of_part(st: Store, job_id: str, rnd: int, name: str) -> None:
    """A task's part of its round is over: the arrival that completes a merging round sends the
    merge at once (broker/round_gate.py), and whoever waits on the round's tasks wakes."""
    merge = arrive(st, job_id, rnd, name)
    if merge is not None:
        task, args = merge
        app.send_task(task, args=args, shadow=f"{task.rsplit('.', 2)[-2]} aggregate r{rnd} {job_id}")
    notify(st.r, keys.arrived(job_id, rnd), st.ttl)


def one_line(e: BaseException) -> str:
    if isinstance(e, SoftTimeLimitExceeded):
        return "soft time limit exceeded"
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


class TaskRun:
    """One attempt of one task: where it records itself, what it reads, and how it sends."""

    def __init__(self, st: Store, job_id: str, rnd: int, name: str, fault: Fault | None) -> None:
        self.st, self.job_id, self.rnd, self.name, self.fault = st, job_id, rnd, name, fault
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        self.outcome: str | None = None  # what submit() got back, if it sent a payload

    def blob(self, name: str) -> bytes:
        return blob(self.st, self.job_id, name)

    def record(self, **fields: object) -> None:
        self.st.node_update(self.job_id, self.rnd, self.name, **fields)

    def progress(self, step: int, loss: float) -> None:
        self.record(step=step, loss=round(loss, 4))

    def submit(self, payload: bytes) -> str:
        """Send the payload into the round: 'arrived', 'late' (sealed already) or 'duplicate'."""
        payload = faults.before_send(self.fault, payload, secret())
        self.outcome = self.st.submit_payload(self.job_id, self.rnd, self.name, payload)
        return self.outcome

    def finish(self, status: str | None = None, **fields: object) -> None:
        """Record the outcome and wake whoever waits for this round's tasks."""
        if status is not None:
            fields["status"] = status
        # CPU seconds next to wall seconds: on an oversubscribed machine wall time overstates the work.
        fields.setdefault("cpu_s", time.process_time() - self._cpu0)
        self.record(finished_at=time.time(), t_task=time.perf_counter() - self._t0, **fields)
        JobRecord(self.st.r, self.job_id).event("node_finish", round=self.rnd, node=self.name,
                                                status=status or self.outcome)
        end_of_part(self.st, self.job_id, self.rnd, self.name)


class FleetTask(Task):
    """Base of every node, router, scorer and expert task: args are (job_id, round, what, ...).

    `record_as(what)` names the task's record in the round (default: str(what)); `node_task`
    tasks check they run on the worker of that node; `fault_of(job_id, rnd, name, *rest)` gives
    the drill fault of this attempt, if any. Pass both as staticmethod(...) to `app.task`: Celery
    makes its options class attributes.
    """

    autoretry_for = (Exception,)
    dont_autoretry_for = (SoftTimeLimitExceeded, MisroutedTask)
    max_retries = settings_of(app).max_retries
    retry_backoff = settings_of(app).retry_backoff
    retry_backoff_max = 600
    retry_jitter = False
    record_as: Callable[[object], str] = staticmethod(str)
    node_task = False
    fault_of: Callable[..., Fault | None] | None = None

    def store_for(self, args: tuple) -> Store:
        return store()

    def _where(self, args: tuple) -> tuple[Store, str, int, str]:
        return self.store_for(args), args[0], int(args[1]), self.record_as(args[2])

    def begin(self, *args: object, skip_if_sealed: bool = False, done: Callable[[Store], bool] | None = None,
              done_status: str | None = None) -> TaskRun | None:
        """Count the attempt and record `running`. None when there is nothing to do: `done(store)`
        says a redelivered task's output is already there (the record is left as it is, or set to
        `done_status`), or the round was sealed before we began (recorded late)."""
        st, job_id, rnd, name = self._where(args)
        if self.node_task and (mine := os.environ.get("LMTEAM_NODE_ID")) is not None and mine != name:
            raise MisroutedTask(f"task for node {name} reached the worker of node {mine}: check queue routing")
        if done is not None and done(st):
            # A redelivered copy (the visibility timeout passed while the first ran): the first's
            # output stands, and its record must not go back to `running`.
            if done_status is not None:
                st.node_update(job_id, rnd, name, status=done_status)
            end_of_part(st, job_id, rnd, name)
            return None
        if skip_if_sealed and st.is_closed(job_id, rnd):  # queued behind a slow task past the deadline
            st.node_update(job_id, rnd, name, status=NodeStatus.LATE.value, reason="started after the deadline")
            return None
        attempt = st.node_incr(job_id, rnd, name, "attempts")
        st.node_update(job_id, rnd, name, status="running", started_at=time.time(), worker=self.request.hostname,
                       retries=self.request.retries)
        JobRecord(st.r, job_id).event("node_start", round=rnd, node=name, attempt=attempt)
        fault = self.fault_of(*args) if self.fault_of else None
        faults.before_work(fault, attempt, self.request.retries)
        return TaskRun(st, job_id, rnd, name, fault)

    def on_retry(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: object) -> None:
        st, job_id, rnd, name = self._where(args)
        st.node_update(job_id, rnd, name, status="retrying", last_error=one_line(exc))
        JobRecord(st.r, job_id).event("node_retry", round=rnd, node=name, error=one_line(exc),
                                      retry=self.request.retries + 1)

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: object) -> None:
        st, job_id, rnd, name = self._where(args)
        error = one_line(exc)
        st.node_update_if_open(job_id, rnd, name, status=NodeStatus.FAILED.value, error=error,
                               finished_at=time.time())
        JobRecord(st.r, job_id).event("node_failed", round=rnd, node=name, error=error)
        end_of_part(st, job_id, rnd, name)
        log.warning("%s %s round %d failed: %s", self.name, name, rnd, error)


def merge_round(task: Task, st: Store, job_id: str, rnd: int, nodes: list[str], deadline: float,
                merge: Callable[[Seal], dict], side_blobs: tuple[str, ...] = (), root: bool = False) -> dict:
    """The body of every merge task: seal when due, merge once, record the result, wake the submitter.

    Never waits: a merge task that is not due (nodes missing before the deadline) returns, and
    the submitter sends the merge again at the deadline; one that finds the round merged, or
    owned by the other merge task, returns. An error ends the round `failed` with the reason
    instead of leaving it hanging. Only once the result is written are the round's payloads (and
    `side_blobs`) deleted: a merge redone after its worker died still finds them. `root`: the
    root of a two-level round, due when its groups are written (broker/round_gate.py).
    """
    seal_due = seal_root_when_due if root else seal_when_due
    seal = seal_due(st, job_id, rnd, nodes, deadline, owner=task.request.id or "local")
    if seal.retry_in > 0:
        return {"round": rnd, "status": "not due"}
    if seal.states is not None:
        with _claimed(task, st):
            try:
                result = merge(seal)
            except Exception as e:
                result = {"round": rnd, "status": "failed", "error": f"round {rnd}: aggregator error: {one_line(e)}"}
                log.exception("merge of round %d of %s failed", rnd, job_id)
            st.put_round_result(job_id, rnd, result)
            st.drop_payloads(job_id, rnd, nodes, blobs=side_blobs, keep_s=settings_of(app).payload_keep_s)
        notify(st.r, keys.done(job_id, rnd), st.ttl)
    return st.round_result(job_id, rnd) or {"round": rnd, "status": "merged elsewhere"}


def group_merge_round(task: Task, st: Store, job_id: str, rnd: int, group: int, nodes: list[str], deadline: float,
                      merge: Callable[[Seal], tuple[bytes, dict]]) -> dict:
    """The body of a group merge in a two-level round: seal the group when due, fold its nodes'
    payloads once into partial sums (`merge` returns them signed, and the group's record), write
    both, and report the group done; the last group sends the root's merge. An error marks the
    group's nodes failed, so the root still runs. Payloads stay until the root's result is written."""
    seal = seal_group_when_due(st, job_id, rnd, group, nodes, deadline, owner=task.request.id or "local")
    if seal.retry_in > 0:
        return {"round": rnd, "group": group, "status": "not due"}
    if seal.states is not None:
        with _claimed(task, st):
            try:
                partial, record = merge(seal)
                st.put_blob(job_id, f"partial/{rnd}/{group}", partial)
            except Exception as e:
                reason = f"group {group} merge error: {one_line(e)}"
                record = {"nodes": {n: {"status": NodeStatus.FAILED.value, "reason": reason, "retries": 0}
                                    for n in nodes}, "error": reason}
                log.exception("group %d merge of round %d of %s failed", group, rnd, job_id)
            put_group_result(st, job_id, rnd, group, record)
    elif not st.r.exists(keys.group_result(job_id, rnd, group)):
        return {"round": rnd, "group": group, "status": "merged elsewhere"}
    # also when the group was written already: its first writer may have died before this line
    root = group_done(st, job_id, rnd, group)
    if root is not None:
        name, args = root
        app.send_task(name, args=args, shadow=f"{name.rsplit('.', 2)[-2]} aggregate r{rnd} {job_id}")
    return {"round": rnd, "group": group, "status": "merged"}


@contextmanager
def _claimed(task: Task, st: Store) -> Iterator[None]:
    """While a merge runs, its task id is in its worker's claims: a restart takes it back."""
    claims = keys.worker_claims(task.request.hostname or "local")
    st.r.sadd(claims, task.request.id or "local")
    st.r.expire(claims, st.ttl)
    yield
    st.r.srem(claims, task.request.id or "local")


# --- worker lifecycle -------------------------------------------------------------------------

_STARTED = time.time()  # before this process took any message from the broker


@signals.worker_process_init.connect
def _limit_threads(**_: object) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("LMTEAM_THREADS", "1")))


@signals.worker_ready.connect
def _register(sender: object = None, **_: object) -> None:
    every = settings_of(app).heartbeat_s
    registry.register(store().r, sender.hostname, os.environ.get("LMTEAM_WORKER_NAME", sender.hostname),
                      os.environ.get("LMTEAM_ROLE", "?"), os.environ.get("LMTEAM_QUEUE", "?"),
                      os.environ.get("LMTEAM_NODE_ID"), heartbeat_s=every)
    # In the worker's main process: its beats stop when that process dies, however it dies.
    registry.start_heartbeat(store().r, sender.hostname, every)
    # What a killed predecessor of this worker held goes back to its queue now (broker/redelivery.py).
    role, queue = os.environ.get("LMTEAM_ROLE"), os.environ.get("LMTEAM_QUEUE", "")
    if role == "node":  # the only consumer of its queue
        n = restore_unacked(app, queue, started_before=_STARTED)
    elif role == "aggregator":  # a shared queue: only the merges this worker's name had claimed
        claims = {c.decode() for c in store().r.smembers(keys.worker_claims(sender.hostname))}
        n = restore_unacked(app, queue, started_before=_STARTED, ids=claims) if claims else 0
    else:
        n = 0
    if n:
        log.warning("restored %d unacknowledged task(s) of a previous %s worker", n, sender.hostname)


@signals.worker_shutdown.connect
def _unregister(sender: object = None, **_: object) -> None:
    try:
        registry.unregister(store().r, sender.hostname)
    except Exception:  # Redis may already be gone at teardown; nothing to clean then
        pass
