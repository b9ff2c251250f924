"""Requests and answers of a served mixture, in Redis: the plumbing between submitters and replicas.

    submitter:  put_requests   body under the request id, id appended to the expert's pending list,
                               then one Celery doorbell per request on queue expert.<I>
    replica:    claim_batch    (Lua, atomic) pop up to B pending ids, skip the answered ones, record
                               this replica's hostname as the claim of the rest: one forward for all
                put_answer     (Lua) SET NX the answer: only the first replica to finish a request
                               stores it, so a request generated twice (failover) is delivered once
    submitter:  answers/claims read back; a claim held by a lost worker (broker/registry.py) is
                               resent: back on the pending list, one more doorbell

The doorbell carries no prompt: whatever replica takes one drains the pending list, so prompts
queued behind a busy replica are batched by the next free one. Bodies are msgpack, never pickle.
"""

from __future__ import annotations

import msgpack
import redis

from broker import keys
from broker.registry import workers

REQUEST_TTL_S = 3600  # requests, claims and answers: an answer nobody read within an hour is garbage

_CLAIM = """
local pending, host, n, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local answer_prefix, claim_prefix = ARGV[4], ARGV[5]
local out = {}
while #out < n do
  local rid = redis.call('LPOP', pending)
  if not rid then break end
  if redis.call('EXISTS', answer_prefix .. rid) == 0 then
    redis.call('SET', claim_prefix .. rid, host, 'EX', ttl)
    out[#out + 1] = rid
  end
end
return out
"""

_ANSWER = """
local answer, delivered, wake, runs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local rid, data, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('INCR', runs)
redis.call('EXPIRE', runs, ttl)
if not redis.call('SET', answer, data, 'NX', 'EX', ttl) then return 0 end
redis.call('RPUSH', delivered, rid)
redis.call('EXPIRE', delivered, ttl)
redis.call('RPUSH', wake, 1)
redis.call('EXPIRE', wake, ttl)
return 1
"""


def pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def put_requests(client: redis.Redis, requests: dict[str, dict]) -> None:
    """Store each request (rid -> body with its `expert`) and queue its id for that expert, in order."""
    pipe = client.pipeline()
    for rid, body in requests.items():
        pipe.set(keys.serve_request(rid), pack(body), ex=REQUEST_TTL_S)
        pipe.rpush(keys.serve_pending(body["expert"]), rid)
    pipe.execute()


def requeue(client: redis.Redis, rid: str, expert: int, was: int | None = None) -> None:
    """Put a request back for `expert` (its replica was lost), or move it there from expert `was`'s
    pending list (a fallback)."""
    pipe = client.pipeline()
    if was is not None:
        pipe.lrem(keys.serve_pending(was), 0, rid)
    pipe.delete(keys.serve_claim(rid))
    pipe.rpush(keys.serve_pending(expert), rid)
    pipe.execute()


def claim_batch(client: redis.Redis, expert: int, host: str, n: int) -> list[str]:
    """Up to n pending, unanswered request ids of `expert`, now claimed by `host` (atomic in Redis)."""
    script = client.register_script(_CLAIM)
    out = script(keys=[keys.serve_pending(expert)],
                 args=[host, n, REQUEST_TTL_S, keys.serve_answer(""), keys.serve_claim("")])
    return [r.decode() if isinstance(r, bytes) else r for r in out]


def get_requests(client: redis.Redis, rids: list[str]) -> dict[str, dict]:
    """The bodies of these requests (expired ones are left out)."""
    raw = client.mget([keys.serve_request(r) for r in rids]) if rids else []
    return {rid: unpack(v) for rid, v in zip(rids, raw, strict=True) if v is not None}


def put_answer(client: redis.Redis, rid: str, submission: str, answer: dict) -> bool:
    """Store the answer unless one is there already; True if this one is the answer delivered."""
    script = client.register_script(_ANSWER)
    ok = script(keys=[keys.serve_answer(rid), keys.serve_delivered(submission), keys.serve_wake(submission),
                      keys.serve_runs(rid)], args=[rid, pack(answer), REQUEST_TTL_S])
    return bool(ok)


def answers(client: redis.Redis, rids: list[str]) -> dict[str, dict]:
    """rid -> answer, for those of `rids` that have one."""
    raw = client.mget([keys.serve_answer(r) for r in rids]) if rids else []
    return {rid: unpack(v) for rid, v in zip(rids, raw, strict=True) if v is not None}


def claims(client: redis.Redis, rids: list[str]) -> dict[str, str]:
    """rid -> hostname of the replica that claimed it, for the claimed ones."""
    raw = client.mget([keys.serve_claim(r) for r in rids]) if rids else []
    return {rid: v.decode() for rid, v in zip(rids, raw, strict=True) if v is not None}


def generations(client: redis.Redis, rids: list[str]) -> dict[str, int]:
    """rid -> how many times a replica generated it (2 after a failover that redid it)."""
    raw = client.mget([keys.serve_runs(r) for r in rids]) if rids else []
    return {rid: int(v or 0) for rid, v in zip(rids, raw, strict=True)}


def delivered(client: redis.Redis, submission: str) -> list[str]:
    """Every request id whose answer was stored for this submission, once per stored answer."""
    return [r.decode() for r in client.lrange(keys.serve_delivered(submission), 0, -1)]


def replicas(client: redis.Redis) -> dict[int, dict[str, dict]]:
    """expert -> {hostname: registry entry} of the live workers consuming its serving queue; lost
    ones (heartbeats stopped) are left out."""
    out: dict[int, dict[str, dict]] = {}
    for host, w in workers(client).items():
        queue = str(w.get("queue", ""))
        if queue.startswith(keys.SERVE_QUEUE_PREFIX) and not w["lost"]:
            out.setdefault(int(queue[len(keys.SERVE_QUEUE_PREFIX):]), {})[host] = w
    return out
