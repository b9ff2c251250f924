"""The one Celery app of lmteam: Redis broker, msgpack only, declared queues, reliable by default.

Workers run `celery -A broker.app worker`; the app reads FleetSettings from the environment at
import. A submitting CLI that starts an embedded fleet calls `configure()` once the URL is known.

Reliability choices (see the README's table and the research notes):
- acks_late + reject_on_worker_lost: a task whose worker process dies is redelivered, not lost.
- running tasks are not cancelled when the broker connection drops (see the note below).
  Our tasks are idempotent (first payload written wins), which makes redelivery safe.
- prefetch 1: a worker holds only the task it runs, so a long training task never hides
  another task from an idle worker.
- soft/hard time limits need the prefork pool, which is what `lmteam worker` starts.
- visibility_timeout longer than any task, else Redis redelivers tasks that are still running.
- queues are declared and tasks routed by name here (broker/keys.py), and a queue that is not
  declared is an error: a typo cannot silently create a queue nobody consumes.
- no task results are stored: submitters read the store's round records, never a result.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from broker import keys
from broker.settings import FleetSettings

# The task modules, named as strings: nothing imports workers/ but Celery itself.
TASK_MODULES = ["workers.fpld", "workers.rag", "workers.smalltalk", "workers.serve"]


def declared_queues(extra: tuple[str, ...] = ()) -> tuple[Queue, ...]:
    """The role queues, plus the node or expert queues a process consumes (`lmteam worker --role node`,
    `--role expert --serve RUN --expert I`)."""
    return tuple(Queue(name) for name in (keys.AGGREGATOR_QUEUE, keys.EXPERT_QUEUE, *extra))


def route(name: str, args: tuple, kwargs: dict, options: dict, task: object = None, **_: object) -> dict | None:
    """Node tasks go to the queue of the node in their third argument, serving tasks to the queue of
    the expert in their first; the rest by name."""
    if name in keys.NODE_TASKS:
        # A node queue is made from its id, not looked up: nodes are as many as a job asks for.
        return {"queue": Queue(keys.node_queue(args[2]))}
    if name in keys.EXPERT_TASKS:  # served experts, like nodes, are as many as the run has
        return {"queue": Queue(keys.expert_queue(args[0]))}
    if name in keys.STATIC_ROUTES:
        return {"queue": keys.STATIC_ROUTES[name]}
    return None  # unrouted: send_task fails on the undeclared default queue


def celery_config(settings: FleetSettings, queues: tuple[str, ...] = ()) -> dict[str, object]:
    # kombu's defaults scan for unacknowledged messages of dead workers only every ~100 s
    # (interval 10 s, throttle 10); scan every interval so redelivery follows the visibility timeout.
    transport = {"visibility_timeout": settings.visibility_timeout,
                 "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 3)),
                 "unacked_restore_throttle": 1}
    return dict(
        broker_url=settings.broker_url,
        task_serializer="msgpack",
        accept_content=["msgpack"],
        task_ignore_result=True,
        task_queues=declared_queues(queues),
        task_routes=(route,),
        task_create_missing_queues=False,
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
        broker_connection_retry_on_startup=True,
        # Flower shows tasks only when workers send events (broker/settings.py: task_events).
        worker_send_task_events=settings.task_events is not False,
        task_send_sent_event=settings.task_events is not False,
        worker_hijack_root_logger=False,
    )


def configure(app: Celery, settings: FleetSettings, queues: tuple[str, ...] = ()) -> Celery:
    """Point the app at a broker (used after an embedded Redis has started); `queues` adds node or
    expert queues."""
    app.conf.update(celery_config(settings, queues))
    app.conf.lmteam_settings = settings
    return app


def settings_of(app: Celery) -> FleetSettings:
    return app.conf.lmteam_settings


def client_app(settings: FleetSettings) -> Celery:
    """A fresh app for a submitter: Celery caches broker connections per app, so a process that
    talks to several fleets in turn (tests, benches) needs one app per fleet."""
    return configure(Celery("lmteam-client", set_as_current=False), settings)


app = Celery("lmteam", include=TASK_MODULES)
configure(app, FleetSettings.from_env())
