"""The one Celery app of lmteam: Redis broker and result store, msgpack only, reliable by default.

Workers run `celery -A broker.app worker`; the app reads FleetSettings from the environment at
import. A submitting CLI that starts an embedded fleet calls `configure()` once the URL is known.

Reliability choices (see docs/ and the research notes):
- acks_late + reject_on_worker_lost: a task whose worker process dies is redelivered, not lost.
- running tasks are not cancelled when the broker connection drops (see the note below).
  Our tasks are idempotent (first payload written wins), which makes redelivery safe.
- prefetch 1: a worker holds only the task it runs, so a long training task never hides
  another task from an idle worker.
- soft/hard time limits need the prefork pool, which is what `lmteam worker` starts.
- visibility_timeout longer than any task, else Redis redelivers tasks that are still running.
"""

from __future__ import annotations

from celery import Celery

from broker.settings import FleetSettings

AGGREGATOR_QUEUE = "aggregator"
EXPERT_QUEUE = "experts"

# Task names are the protocol between submitters and workers: submitters send by name and never
# import the task code (nor torch) to do it.
FPLD_NODE_TASK = "lmteam.fpld.node_round"
FPLD_AGGREGATE_TASK = "lmteam.fpld.aggregate_round"


def node_queue(node_id: int | str) -> str:
    """A node's own queue: only the worker holding that node's private data consumes it."""
    return f"node.{node_id}"


def celery_config(settings: FleetSettings) -> dict[str, object]:
    # kombu's defaults scan for unacknowledged messages of dead workers only every ~100 s
    # (interval 10 s, throttle 10); scan every interval so redelivery follows the visibility timeout.
    transport = {"visibility_timeout": settings.visibility_timeout,
                 "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 3)),
                 "unacked_restore_throttle": 1}
    return dict(
        broker_url=settings.broker_url,
        result_backend=settings.backend_url,
        task_serializer="msgpack",
        result_serializer="msgpack",
        accept_content=["msgpack"],
        result_accept_content=["msgpack"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Measured here (tests/test_hardening.py): with True, a Redis restart terminates running
        # tasks and the terminated task is then *acked* on reconnect, i.e. lost. With False the
        # task finishes (its store client retries through the outage) and, if its ack cannot
        # be delivered, it is redelivered after the visibility timeout: at-least-once, and our
        # tasks are idempotent.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_soft_time_limit=settings.soft_time_limit,
        task_time_limit=settings.hard_time_limit,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=settings.blob_ttl,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        # Flower shows tasks only when workers send events.
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )


def configure(app: Celery, settings: FleetSettings) -> Celery:
    """Point the app at a broker (used after an embedded Redis has started)."""
    app.conf.update(celery_config(settings))
    app.conf.lmteam_settings = settings
    return app


def settings_of(app: Celery) -> FleetSettings:
    return app.conf.lmteam_settings


def client_app(settings: FleetSettings) -> Celery:
    """A fresh app for a submitter: Celery caches broker connections per app, so a process that
    talks to several fleets in turn (tests, benches) needs one app per fleet."""
    return configure(Celery("lmteam-client", set_as_current=False), settings)


app = Celery("lmteam", include=["workers.tasks", "workers.rag_tasks", "workers.smalltalk_tasks"])
configure(app, FleetSettings.from_env())
