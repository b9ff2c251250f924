"""Which workers are up and which queue each consumes, kept in Redis by the workers themselves.

A worker registers on `worker_ready`, beats every `heartbeat_s` seconds while its main process
lives, and removes itself on `worker_shutdown`. A worker that was SIGKILLed or lost its machine
cannot remove itself: its beats stop, and after LOST_AFTER beats missed it reads as `lost`.
The embedded fleet waits on this registry for readiness; a submitter warns about a queue no
live worker consumes; `lmteam status` shows lost workers, and their running tasks as lost.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import redis

from broker import keys

REGISTRY_KEY = keys.WORKERS
LOST_AFTER = 3  # missed beats


def _redis_now(client: redis.Redis) -> float:
    sec, usec = client.time()  # one clock for every machine of the fleet
    return sec + usec / 1e6


def register(client: redis.Redis, hostname: str, name: str, role: str, queue: str, node_id: str | None,
             heartbeat_s: float = 5.0) -> None:
    info = {"name": name, "role": role, "queue": queue, "node_id": node_id, "pid": os.getpid(),
            "host": socket.gethostname(), "started_at": time.time(), "heartbeat_s": heartbeat_s}
    client.hset(REGISTRY_KEY, hostname, json.dumps(info))
    beat(client, hostname)


def beat(client: redis.Redis, hostname: str) -> None:
    client.hset(keys.WORKER_BEATS, hostname, f"{_redis_now(client):.3f}")


def start_heartbeat(client: redis.Redis, hostname: str, every_s: float) -> threading.Event:
    """Beat from a daemon thread of this process until the returned event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                beat(client, hostname)
            except redis.exceptions.RedisError:  # an outage: the next beat tries again
                pass

    threading.Thread(target=loop, name="lmteam-heartbeat", daemon=True).start()
    return stop


def unregister(client: redis.Redis, hostname: str) -> None:
    client.hdel(REGISTRY_KEY, hostname)
    client.hdel(keys.WORKER_BEATS, hostname)


def workers(client: redis.Redis) -> dict[str, dict]:
    """hostname -> {name, role, queue, node_id, pid, host, started_at, heartbeat_s, seen_s_ago, lost}."""
    now = _redis_now(client)
    beats = {k.decode(): float(v) for k, v in client.hgetall(keys.WORKER_BEATS).items()}
    out = {}
    for k, v in client.hgetall(REGISTRY_KEY).items():
        host, info = k.decode(), json.loads(v)
        ago = now - beats.get(host, 0.0)
        out[host] = {**info, "seen_s_ago": ago, "lost": ago > LOST_AFTER * float(info.get("heartbeat_s", 5.0))}
    return out


def live_queues(client: redis.Redis) -> dict[str, dict]:
    """The workers that are not lost: hostname -> registry entry."""
    return {h: w for h, w in workers(client).items() if not w["lost"]}
