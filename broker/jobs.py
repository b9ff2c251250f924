"""The job record: what a job is (its config), where it stands, and what happened on the way.

Kept in Redis next to the payloads, as JSON strings (never pickle), so `lmteam status` on any
machine of the fleet can read it and any run can be reproduced from its stored config.
Keys (broker/keys.py):
  keys.job(id)          hash: kind, status, config, settings, created_at, updated_at, error, report
  keys.job_events(id)   list of JSON events (ts, type, round, node, ...), the job's timeline
  keys.JOBS             sorted set of job ids by creation time
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import redis

from broker import keys


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class NodeStatus(str, Enum):
    """Final state of one node in one round, as the aggregator records it."""

    MERGED = "merged"
    LATE = "late"  # missed the deadline: dropped from the merge
    REJECTED = "rejected"  # payload failed decoding (signature, shape, size, truncation)
    FAILED = "failed"  # raised on every retry, or hit its time limit


class JobFailed(RuntimeError):
    """The job could not finish (quorum not met, a task failed for good, or the fleet stopped answering)."""


class UnknownJob(KeyError):
    def __str__(self) -> str:
        return f"no job {self.args[0]!r} in this Redis (lmteam status lists the jobs)"


def new_job_id(kind: str) -> str:
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


class JobRecord:
    """Read and write one job's record."""

    def __init__(self, client: redis.Redis, job_id: str, ttl: int = 7 * 86400) -> None:
        self.r = client
        self.id = job_id
        self.ttl = ttl
        self.key = keys.job(job_id)
        self.events_key = keys.job_events(job_id)

    @classmethod
    def create(cls, client: redis.Redis, job_id: str, kind: str, config: dict, settings: dict,
               ttl: int = 7 * 86400) -> JobRecord:
        rec = cls(client, job_id, ttl)
        now = time.time()
        client.hset(rec.key, mapping={
            "kind": kind, "status": JobStatus.QUEUED.value, "config": json.dumps(config),
            "settings": json.dumps(settings), "created_at": now, "updated_at": now,
        })
        client.expire(rec.key, ttl)
        client.zadd(keys.JOBS, {job_id: now})
        rec.event("created", kind=kind)
        return rec

    def exists(self) -> bool:
        return bool(self.r.exists(self.key))

    def config(self) -> dict:
        raw = self.r.hget(self.key, "config")
        if raw is None:
            raise UnknownJob(self.id)
        return json.loads(raw)

    def set(self, **fields: object) -> None:
        mapping = {k: (v.value if isinstance(v, Enum) else v if isinstance(v, (str, int, float)) else json.dumps(v))
                   for k, v in fields.items()}
        mapping["updated_at"] = time.time()
        self.r.hset(self.key, mapping=mapping)

    def set_status(self, status: JobStatus, error: str | None = None) -> None:
        fields: dict[str, object] = {"status": status}
        if error is not None:
            fields["error"] = error
        self.set(**fields)
        self.event("status", status=status.value, **({"error": error} if error else {}))

    @contextmanager
    def running(self, keep_s: int, blob_keep_s: int) -> Iterator[JobRecord]:
        """RUNNING inside the block; then SUCCEEDED, or FAILED with the error; then retire()."""
        self.set_status(JobStatus.RUNNING)
        try:
            yield self
        except BaseException as e:
            self.set_status(JobStatus.FAILED, error=str(e) or type(e).__name__)
            raise
        else:
            self.set_status(JobStatus.SUCCEEDED)
        finally:
            self.retire(keep_s, blob_keep_s)

    def retire(self, keep_s: int, blob_keep_s: int) -> int:
        """A job has ended: every key it made expires in `keep_s` seconds, its blobs and any payload
        left in `min(blob_keep_s, keep_s)` (0: now), so Redis holds finished jobs only as long as
        asked. Ids of records gone are dropped from the job list. Returns the keys touched."""
        blob_s = min(blob_keep_s, keep_s)
        pipe, n = self.r.pipeline(), 0
        for key in self.r.scan_iter(match=f"{keys.PREFIX}:*:{_glob_escape(self.id)}*", count=1000):
            _, kind, rest = key.decode().split(":", 2)
            if rest != self.id and not rest.startswith(self.id + ":"):  # job "a-1" is not job "a-10"
                continue
            ttl = blob_s if kind in ("blob", "payload", "staged", "chunk") else keep_s
            if ttl > 0:
                pipe.expire(key, ttl)
            else:
                pipe.delete(key)
            n += 1
        pipe.execute()
        old = [x.decode() for x in self.r.zrange(keys.JOBS, 0, 99)]
        gone = [j for j, alive in zip(old, self._exist([keys.job(j) for j in old]), strict=True) if not alive]
        if gone:
            self.r.zrem(keys.JOBS, *gone)
        return n

    def _exist(self, names: list[str]) -> list[bool]:
        pipe = self.r.pipeline()
        for name in names:
            pipe.exists(name)
        return [bool(x) for x in pipe.execute()]

    def event(self, type_: str, **fields: object) -> None:
        """Append to the job's timeline (the raw material of the team metrics)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.rpush(self.events_key, json.dumps({"ts": time.time(), "type": type_, **fields}))
        pipe.expire(self.events_key, self.ttl)
        pipe.execute()

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.r.lrange(self.events_key, 0, -1)]

    def get(self) -> dict:
        raw = self.r.hgetall(self.key)
        if not raw:
            raise UnknownJob(self.id)
        out: dict[str, object] = {}
        for k, v in raw.items():
            key, text = k.decode(), v.decode()
            if key in ("config", "settings", "report", "progress"):
                out[key] = json.loads(text)
            elif key in ("created_at", "updated_at"):
                out[key] = float(text)
            else:
                out[key] = text
        return out


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def list_jobs(client: redis.Redis, limit: int = 20) -> list[str]:
    return [x.decode() for x in client.zrevrange(keys.JOBS, 0, limit - 1)]
