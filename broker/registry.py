"""Which workers are up and which queue each consumes, kept in Redis by the workers themselves.

A worker registers on `worker_ready` and removes itself on `worker_shutdown`, so the embedded
fleet can wait for readiness and a submitting CLI can warn about a node queue nobody consumes.
"""

from __future__ import annotations

import json
import os
import socket
import time

import redis

from broker import keys

REGISTRY_KEY = keys.WORKERS


def register(client: redis.Redis, hostname: str, name: str, role: str, queue: str, node_id: str | None) -> None:
    info = {"name": name, "role": role, "queue": queue, "node_id": node_id, "pid": os.getpid(),
            "host": socket.gethostname(), "started_at": time.time()}
    client.hset(REGISTRY_KEY, hostname, json.dumps(info))


def unregister(client: redis.Redis, hostname: str) -> None:
    client.hdel(REGISTRY_KEY, hostname)


def live_queues(client: redis.Redis) -> dict[str, dict]:
    """hostname -> {name, role, queue, node_id, pid, host, started_at}."""
    return {k.decode(): json.loads(v) for k, v in client.hgetall(REGISTRY_KEY).items()}
