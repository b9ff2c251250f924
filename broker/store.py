"""The output store: payloads, checkpoints and public data in Redis, addressed by job/round/name.

Large things travel through here by reference (a task argument is just the job id and round):
the broker base64-inflates message bodies by a third and holds them in memory twice.

Deadline discipline lives in two Lua scripts, so it is atomic inside Redis:
- `submit` moves a node's payload (written beside it with a plain SET) into place only if its
  round is still open, else records it as late;
- `close` seals a round once. Whatever submitted before the seal is what gets merged; a result
  that arrives after it can never change the merged output.
Deadlines are measured on Redis's clock (TIME), the one clock every process of a fleet shares.

A value over `chunk_bytes` (a full-weight SmolLM2 state is 538 MB; Redis refuses strings over
512 MB) is written as chunks with plain SETs, and its key holds a small manifest naming them;
readers get the joined bytes back. The payload's own signature covers the whole, so a wrong or
missing chunk fails the payload's check like any corruption.
"""

from __future__ import annotations

import json
import uuid

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from broker import keys

CHUNK_BYTES = 256 * 2**20  # half of Redis's largest string (proto-max-bulk-len, 512 MB)
_CHUNKED = b"lmteam-chunked-v1\n"

_SUBMIT = """
local closed, payload, node, arrived, staged = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, ttl = ARGV[1], tonumber(ARGV[2])
redis.call('RPUSH', arrived, node)
redis.call('EXPIRE', arrived, ttl)
if redis.call('EXISTS', closed) == 1 then
  redis.call('DEL', staged)
  redis.call('HSET', node, 'status', 'late', 'late_at', now)
  redis.call('EXPIRE', node, ttl)
  return 'late'
end
if redis.call('EXISTS', payload) == 1 then
  redis.call('DEL', staged)
  return 'duplicate'
end
if redis.call('EXISTS', staged) == 0 then
  return 'missing'
end
redis.call('RENAME', staged, payload)
redis.call('HSET', node, 'status', 'arrived', 'arrived_at', now)
redis.call('EXPIRE', node, ttl)
return 'arrived'
"""

_SET_IF_OPEN = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[1]))
return 1
"""


def connect(url: str, outage_s: float = 30.0) -> redis.Redis:
    """A redis-py client for a Celery-style URL (redis+socket:// is redis-py's unix://).

    Commands are retried with backoff for about `outage_s` seconds, so a Redis restart (with
    append-only persistence) is a pause for the job, not a failure.
    """
    if url.startswith("redis+socket://"):
        url = "unix://" + url[len("redis+socket://"):]
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=int(outage_s))
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30,
                                retry=retry, retry_on_error=[redis.exceptions.ConnectionError,
                                                             redis.exceptions.TimeoutError])


class Store:
    """Blobs and per-round node state for all jobs, in one Redis."""

    def __init__(self, client: redis.Redis, ttl: int = 7 * 86400) -> None:
        self.r = client
        self.ttl = ttl
        self.chunk_bytes = CHUNK_BYTES
        self._scripts: dict[str, object] = {}
        self._submit = self.lua(_SUBMIT)
        self._set_if_open = self.lua(_SET_IF_OPEN)

    def lua(self, source: str):
        """A Lua script registered once per store (redis-py then sends EVALSHA, not the source)."""
        if source not in self._scripts:
            self._scripts[source] = self.r.register_script(source)
        return self._scripts[source]

    @classmethod
    def from_url(cls, url: str, ttl: int = 7 * 86400) -> Store:
        return cls(connect(url), ttl)

    # clock -----------------------------------------------------------------------------------
    def now(self) -> float:
        """Redis's clock in seconds: shared by every machine of the fleet."""
        sec, usec = self.r.time()
        return sec + usec / 1e6

    # values of any size ----------------------------------------------------------------------
    def _stage(self, job: str, data: bytes) -> bytes:
        """data itself or, past chunk_bytes, a manifest, once its chunks are written."""
        if len(data) <= self.chunk_bytes:
            return data
        base, view, names = keys.chunks(job, uuid.uuid4().hex), memoryview(data), []
        for i, at in enumerate(range(0, len(data), self.chunk_bytes)):
            names.append(f"{base}:{i}")
            self.r.set(names[-1], view[at:at + self.chunk_bytes], ex=self.ttl)
        return _CHUNKED + json.dumps({"bytes": len(data), "chunks": names}).encode()

    def _whole(self, value: bytes | None) -> bytes | None:
        if value is None or not value.startswith(_CHUNKED):
            return value
        manifest = json.loads(value[len(_CHUNKED):])
        parts = [self.r.get(name) for name in manifest["chunks"]]
        if any(p is None for p in parts) or sum(map(len, parts)) != manifest["bytes"]:
            raise RuntimeError(f"a chunked value lost chunks ({manifest['chunks'][0].rsplit(':', 1)[0]})")
        return b"".join(parts)

    def _chunk_names(self, values: list[bytes | None]) -> list[str]:
        return [n for v in values if v and v.startswith(_CHUNKED) for n in json.loads(v[len(_CHUNKED):])["chunks"]]

    def _drop_chunks(self, values: list[bytes | None]) -> None:
        names = self._chunk_names(values)
        if names:
            self.r.delete(*names)

    def _manifests(self, names: list[str]) -> list[bytes | None]:
        """The manifests among these keys' values, without reading any whole value."""
        pipe = self.r.pipeline()
        for name in names:
            pipe.getrange(name, 0, len(_CHUNKED) - 1)
        chunked = [name for name, head in zip(names, pipe.execute(), strict=True) if head == _CHUNKED]
        return self.r.mget(chunked) if chunked else []

    # blobs -----------------------------------------------------------------------------------
    def put_blob(self, job: str, name: str, data: bytes) -> int:
        self.r.set(keys.blob(job, name), self._stage(job, data), ex=self.ttl)
        return len(data)

    def put_blob_once(self, job: str, name: str, data: bytes) -> bool:
        """Write unless present: a redelivered task must not overwrite what it wrote before."""
        staged = self._stage(job, data)
        if self.r.set(keys.blob(job, name), staged, ex=self.ttl, nx=True):
            return True
        self._drop_chunks([staged])
        return False

    def get_blob(self, job: str, name: str) -> bytes | None:
        return self._whole(self.r.get(keys.blob(job, name)))

    def has_blob(self, job: str, name: str) -> bool:
        return bool(self.r.exists(keys.blob(job, name)))

    # rounds ----------------------------------------------------------------------------------
    def submit_payload(self, job: str, rnd: int, node: str, data: bytes) -> str:
        """'arrived' (will be merged if valid), 'late' (round already sealed) or 'duplicate'."""
        # The payload goes in with a plain SET under a staging key, and the gate script only moves it
        # (RENAME keeps its TTL): a 100 MB payload never becomes a Lua argument Redis copies.
        staged = keys.staged_payload(job, rnd, node, uuid.uuid4().hex)
        value = self._stage(job, data)
        self.r.set(staged, value, ex=self.ttl)
        names = [keys.closed(job, rnd), keys.payload(job, rnd, node), keys.node(job, rnd, node), keys.arrived(job, rnd),
                 staged]
        out = self._submit(keys=names, args=[f"{self.now():.6f}", self.ttl])
        out = out.decode() if isinstance(out, bytes) else str(out)
        if out == "missing":  # the staged copy expired or was evicted between the two calls
            raise RuntimeError(f"payload of {node} for {job} round {rnd} vanished before the gate took it")
        if out != "arrived":
            self._drop_chunks([value])
        return out

    def close_round(self, job: str, rnd: int) -> bool:
        """Seal a round; True for the caller that sealed it, False if it was already sealed."""
        return bool(self.r.set(keys.closed(job, rnd), f"{self.now():.6f}", nx=True, ex=self.ttl))

    def is_closed(self, job: str, rnd: int) -> bool:
        return bool(self.r.exists(keys.closed(job, rnd)))

    def get_payload(self, job: str, rnd: int, node: str) -> bytes | None:
        return self._whole(self.r.get(keys.payload(job, rnd, node)))

    def drop_payloads(self, job: str, rnd: int, nodes: list[str], blobs: tuple[str, ...] = (),
                      keep_s: int = 0) -> None:
        """Once a round is merged its payloads (and side blobs) have done their work: delete them,
        or keep them `keep_s` seconds for debugging, so Redis does not grow with every round."""
        names = [keys.payload(job, rnd, n) for n in nodes] + [keys.blob(job, b) for b in blobs]
        names += self._chunk_names(self._manifests(names))
        pipe = self.r.pipeline()
        for name in names:
            if keep_s > 0:
                pipe.expire(name, keep_s)
            else:
                pipe.delete(name)
        pipe.execute()

    def node_update(self, job: str, rnd: int, node: str, **fields: object) -> None:
        """Record facts about a node's work in a round (timings, bytes, status)."""
        key = keys.node(job, rnd, node)
        pipe = self.r.pipeline(transaction=False)  # one round trip: 64 nodes' records add up
        pipe.hset(key, mapping={k: _enc(v) for k, v in fields.items()})
        pipe.expire(key, self.ttl)
        pipe.execute()

    def node_update_if_open(self, job: str, rnd: int, node: str, **fields: object) -> bool:
        """As node_update, but only while the round is open (a failure after the seal changes nothing)."""
        args: list[object] = [self.ttl]
        for k, v in fields.items():
            args += [k, _enc(v)]
        return bool(self._set_if_open(keys=[keys.closed(job, rnd), keys.node(job, rnd, node)], args=args))

    def node_incr(self, job: str, rnd: int, node: str, field_name: str, by: int = 1) -> int:
        return int(self.r.hincrby(keys.node(job, rnd, node), field_name, by))

    def node_state(self, job: str, rnd: int, node: str) -> dict[str, object]:
        raw = self.r.hgetall(keys.node(job, rnd, node))
        return {k.decode(): _dec(v) for k, v in raw.items()}

    def round_nodes(self, job: str, rnd: int, nodes: list[str]) -> dict[str, dict[str, object]]:
        pipe = self.r.pipeline()
        for node in nodes:
            pipe.hgetall(keys.node(job, rnd, node))
        return {node: {k.decode(): _dec(v) for k, v in raw.items()} for node, raw in zip(nodes, pipe.execute(), strict=True)}

    def job_tasks(self, job: str) -> dict[int, list[str]]:
        """Every (round, node) a job's tasks have recorded, for `lmteam status` of any job kind."""
        prefix = keys.node_scan_prefix(job)
        found: dict[int, list[str]] = {}
        for key in self.r.scan_iter(match=prefix + "*", count=1000):
            rnd, _, node = key.decode()[len(prefix):].partition(":")
            if rnd.isdigit():
                found.setdefault(int(rnd), []).append(node)
        return {rnd: sorted(nodes, key=_natural) for rnd, nodes in sorted(found.items())}

    def put_round_result(self, job: str, rnd: int, result: dict[str, object]) -> bool:
        """The aggregator's summary of a round; written once (redelivery keeps the first)."""
        return bool(self.r.set(keys.round_result(job, rnd), json.dumps(result), nx=True, ex=self.ttl))

    def round_result(self, job: str, rnd: int) -> dict[str, object] | None:
        raw = self.r.get(keys.round_result(job, rnd))
        return json.loads(raw) if raw else None


def _natural(name: str) -> tuple:
    """router2 before router10; 'aggregator' and 'dense' after the numbered ones."""
    stem = name.rstrip("0123456789")
    digits = name[len(stem):]
    return (not digits, stem, int(digits) if digits else 0)


def _enc(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _dec(raw: bytes) -> object:
    text = raw.decode()
    try:
        return json.loads(text)
    except ValueError:
        return text
