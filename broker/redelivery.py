"""Give a restarted worker back, at once, the task its killed predecessor held.

kombu's Redis transport keeps every delivered, unacknowledged message in a hash (with its
delivery time in an index) and restores it to its queue only after the visibility timeout,
which must exceed the longest task (hours). Two cases are safe to restore sooner:
- a node queue has exactly one consumer, the worker of that node: when it starts, every message
  of its queue unacknowledged from before its start belongs to a predecessor that died;
- on a shared queue (the aggregator's), a merge task records its id under its worker's name when
  it claims a round: a worker restarted under that name restores exactly those messages.
"""

from __future__ import annotations

import json

from celery import Celery


def restore_unacked(app: Celery, queue: str, started_before: float, ids: set[str] | None = None) -> int:
    """Put back at the head of `queue` its messages delivered before `started_before` and never
    acknowledged (only those whose task id is in `ids`, when given); returns how many."""
    restored = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        qos = channel.qos
        client = channel.client
        for tag, raw in client.hgetall(channel.unacked_key).items():
            message, _, routing_key = json.loads(raw)
            delivered = client.zscore(channel.unacked_index_key, tag)
            task_id = (message.get("headers") or {}).get("id") if isinstance(message, dict) else None
            if (routing_key == queue and delivered is not None and delivered < started_before
                    and (ids is None or task_id in ids)):
                qos.restore_by_tag(tag.decode() if isinstance(tag, bytes) else tag, client, leftmost=True)
                restored += 1
    return restored
