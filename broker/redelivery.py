"""Give a restarted node worker back, at once, the task its killed predecessor held.

kombu's Redis transport keeps every delivered, unacknowledged message in a hash (with its
delivery time in an index) and restores it to its queue only after the visibility timeout,
which must exceed the longest task (hours). A node queue has exactly one consumer: the worker
of that node. So when that worker starts, every message of its queue still unacknowledged from
before its start belongs to a predecessor that died, and can go back to the queue's head now.
"""

from __future__ import annotations

import json

from celery import Celery


def restore_unacked(app: Celery, queue: str, started_before: float) -> int:
    """Put back at the head of `queue` its messages delivered before `started_before` and never
    acknowledged; returns how many. Only for a queue this process alone consumes."""
    restored = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        qos = channel.qos
        client = channel.client
        for tag, raw in client.hgetall(channel.unacked_key).items():
            _, _, routing_key = json.loads(raw)
            delivered = client.zscore(channel.unacked_index_key, tag)
            if routing_key == queue and delivered is not None and delivered < started_before:
                qos.restore_by_tag(tag.decode() if isinstance(tag, bytes) else tag, client, leftmost=True)
                restored += 1
    return restored
