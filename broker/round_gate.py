"""A round that merges node payloads, shared by every job kind that has one: no process waits in it.

    driver:     open_round(nodes, merge task) -> node tasks -> follow_round(): wait for the
                result, and at the deadline (Redis's clock) send the merge task if no node did
    each node:  arrive() when its part is over (arrived or failed); the arrival that completes
                the set gets the merge task back and sends it at once
    merge task: seal_when_due(): all in, or the deadline passed -> claim the merge (one owner:
                a redelivered copy keeps its task id), seal; not due: return. Then
                classify_nodes(): merged, rejected, failed or late; the quorum is a count.

No worker waits for nodes, and none holds a task with an eta (a message held unacknowledged
in a worker outlives neither a long visibility timeout nor, measured here, a broker restart).
Up to two merge tasks fire per round (the completing arrival, the deadline); exactly one merges.
A payload that arrives after the seal is recorded late and can never be merged.

Two-level rounds (open_round(groups=G)): the nodes are cut into G groups of consecutive ids. The
arrival that completes a group sends that group's merge task; a group merge folds its nodes'
payloads into partial sums, writes them, and the group that completes the set of groups sends
the root's merge, which adds G partial sums instead of K payloads. Groups merge while other
groups' nodes still compute. At the deadline the submitter sends every group merge not yet sent;
the first to run seals the whole round (no payload enters any group after that), and the root
merges whatever groups are written by the deadline plus a grace (open_round's `grace_s`, kept in
the round's spec so the submitter and the root agree), the nodes of a missing group
counted late.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from celery import Celery

from broker import keys
from broker.jobs import NodeStatus
from broker.store import Store
from broker.waiting import seconds_left, wait_for
from broker.wire.codec import PayloadError

Decode = Callable[[str, bytes], tuple[object, int]]
"""decode(node, payload) -> (value, bytes on the wire); raises PayloadError for a bad payload"""


class QuorumError(RuntimeError):
    """Too few nodes made it into the merge."""


def default_quorum(nodes: int) -> int:
    """Three quarters of the nodes, rounded up (3 of 4, 6 of 8)."""
    return max(1, math.ceil(0.75 * nodes))


def check_quorum(merged: int, nodes: int, quorum: int, detail: str = "") -> None:
    """Raise QuorumError with a readable message when fewer than `quorum` nodes merged."""
    if merged < quorum:
        msg = f"only {merged} of {nodes} nodes merged, quorum is {quorum}"
        raise QuorumError(f"{msg}: {detail}" if detail else msg)


# A two-level round's group sets are named from KEYS[2] here: one Redis, not a cluster.
_ARRIVE = """
local spec, seen, ttl = KEYS[1], KEYS[2], tonumber(ARGV[2])
redis.call('SADD', seen, ARGV[1])
redis.call('EXPIRE', seen, ttl)
local g = redis.call('HGET', spec, 'g:' .. ARGV[1])
if g then
  local gseen = seen .. ':g' .. g
  redis.call('SADD', gseen, ARGV[1])
  redis.call('EXPIRE', gseen, ttl)
  if redis.call('SCARD', gseen) < tonumber(redis.call('HGET', spec, 'gsize:' .. g)) then return false end
  if redis.call('HSETNX', spec, 'gtriggered:' .. g, '1') == 0 then return false end
  return {redis.call('HGET', spec, 'group_task'), redis.call('HGET', spec, 'args'), g}
end
local expected = redis.call('HGET', spec, 'expected')
if (not expected) or redis.call('SCARD', seen) < tonumber(expected) then return false end
if redis.call('HSETNX', spec, 'triggered', '1') == 0 then return false end
return {redis.call('HGET', spec, 'task'), redis.call('HGET', spec, 'args')}
"""

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return 1 end
return redis.call('GET', KEYS[1]) == ARGV[1] and 1 or 0
"""

_GROUP_DONE = """
local spec, done, ttl = KEYS[1], KEYS[2], tonumber(ARGV[2])
redis.call('SADD', done, ARGV[1])
redis.call('EXPIRE', done, ttl)
if redis.call('SCARD', done) < tonumber(redis.call('HGET', spec, 'groups')) then return false end
if redis.call('HSETNX', spec, 'triggered', '1') == 0 then return false end
return {redis.call('HGET', spec, 'task'), redis.call('HGET', spec, 'args')}
"""

MERGE_THREADS = min(4, os.cpu_count() or 1)  # payloads fetched and decoded at once by a merge
FINAL = ("arrived", "failed")  # a node in one of these has done its part of the round


def merge_groups(nodes: list[str], groups: int) -> list[list[str]]:
    """The nodes cut into `groups` runs of consecutive ids, sizes differing by at most one (nodes
    numbered by machine stay together, so a group's merge can run beside its nodes)."""
    g = max(1, min(groups, len(nodes)))
    return [nodes[i * len(nodes) // g:(i + 1) * len(nodes) // g] for i in range(g)]


def open_round(st: Store, job_id: str, rnd: int, nodes: list[str], merge_task: str, merge_args: list,
               groups: int = 1, group_task: str = "", grace_s: float = 120.0) -> None:
    """Before the node tasks go out: which nodes the round waits for, and the task that merges them.
    With groups > 1 (and group_task, called with merge_args + [group]), a two-level round whose root
    waits up to grace_s past the deadline for group merges still running."""
    key = keys.round_spec(job_id, rnd)
    spec: dict[str, object] = {"expected": len(nodes), "task": merge_task, "args": json.dumps(merge_args),
                               "opened_at": f"{st.now():.6f}"}
    parts = merge_groups(nodes, groups)
    if len(parts) > 1:
        if not group_task:
            raise ValueError("a round with merge groups needs the group merge task")
        spec.update(groups=len(parts), group_task=group_task, grace_s=grace_s)
        for g, part in enumerate(parts):
            spec[f"gsize:{g}"] = len(part)
            spec.update({f"g:{n}": g for n in part})
    st.r.hset(key, mapping=spec)
    st.r.expire(key, st.ttl)


def round_groups(st: Store, job_id: str, rnd: int) -> int:
    """How many merge groups a round was opened with (1: a single merge)."""
    return int(st.r.hget(keys.round_spec(job_id, rnd), "groups") or 1)


def arrive(st: Store, job_id: str, rnd: int, node: str) -> tuple[str, list] | None:
    """Count node's part of the round as over; the arrival that completes the set (or the node's
    group) gets the merge task (name, args) to send, exactly once. None for every other arrival,
    or a round with no merge."""
    out = st.lua(_ARRIVE)(keys=[keys.round_spec(job_id, rnd), keys.arrived_set(job_id, rnd)],
                                        args=[node, st.ttl])
    if not out:
        return None
    task, args, *group = (x.decode() if isinstance(x, bytes) else x for x in out)
    return task, json.loads(args) + [int(g) for g in group]


def group_done(st: Store, job_id: str, rnd: int, group: int) -> tuple[str, list] | None:
    """A group's merge is written; the group that completes the set gets the root's merge task to
    send, exactly once. Idempotent: a group merge redone after its worker died may call it again."""
    out = st.lua(_GROUP_DONE)(keys=[keys.round_spec(job_id, rnd), keys.groups_done(job_id, rnd)],
                              args=[group, st.ttl])
    if not out:
        return None
    task, args = (x.decode() if isinstance(x, bytes) else x for x in out)
    return task, json.loads(args)


def follow_round(st: Store, app: Celery, job_id: str, rnd: int, deadline: float, give_up_s: float,
                 on_poll: Callable[[], None] | None = None, poll: float = 0.25, shadow: str = "") -> dict | None:
    """The submitter's side of a round opened with open_round: the round's result, or None after
    give_up_s. At the deadline, send every merge no arrival has sent yet (the round's, or each
    group's): the nodes that are in get merged, the rest are late. A two-level round whose groups
    are not all written by the deadline plus its grace gets its root merge sent too."""
    spec = keys.round_spec(job_id, rnd)
    # what the deadline sends is fixed when the round opens: read it once, not at every poll
    task, args, group_task, groups, grace = st.r.hmget(spec, ["task", "args", "group_task", "groups", "grace_s"])
    merge = (task.decode(), json.loads(args)) if task else None
    groups, grace = int(groups or 1), float(grace or 0)
    sent: set[str] = set()

    def send(flag: str, task: str, args: list) -> None:
        sent.add(flag)
        if st.r.hsetnx(spec, flag, "deadline"):
            app.send_task(task, args=args, shadow=shadow)

    def result() -> dict | None:
        if on_poll is not None:
            on_poll()
        out = st.round_result(job_id, rnd)
        if out is not None or merge is None or "triggered" in sent or st.now() < deadline:
            return out
        if groups == 1:
            send("triggered", *merge)
        elif "gtriggered:0" not in sent:
            for g in range(groups):
                send(f"gtriggered:{g}", group_task.decode(), merge[1] + [g])
        elif st.now() >= deadline + grace:
            send("triggered", *merge)
        return out

    return wait_for(result, seconds_left(give_up_s), client=st.r, wake=keys.done(job_id, rnd), poll=poll)


@dataclass(frozen=True)
class Seal:
    """What seal_when_due decided: merge these states, come back in retry_in seconds, or neither."""

    states: dict[str, dict] | None = None
    sealed_at: float = 0.0
    open_s: float = 0.0  # how long the round was open, on Redis's clock
    retry_in: float = 0.0


def _sealed(st: Store, job_id: str, rnd: int, nodes: list[str]) -> Seal:
    """The states to merge, read once no payload can enter them any more, and how long the round was open."""
    opened = st.r.hget(keys.round_spec(job_id, rnd), "opened_at")
    now = st.now()
    return Seal(st.round_nodes(job_id, rnd, nodes), time.time(), now - float(opened) if opened else 0.0)


def seal_when_due(st: Store, job_id: str, rnd: int, nodes: list[str], deadline: float, owner: str) -> Seal:
    """Seal the round if every node is in or the deadline has passed, and it is `owner`'s to merge.

    Seal() (no states): the round is merged already, or another merge task owns it. Seal(retry_in=s):
    not due for another s seconds (nodes are missing). Never blocks.
    """
    if st.round_result(job_id, rnd) is not None:
        return Seal()
    states = st.round_nodes(job_id, rnd, nodes)
    left = deadline - st.now()
    if left > 0 and not all(s.get("status") in FINAL for s in states.values()):
        return Seal(retry_in=left)
    claimed = st.lua(_CLAIM)(keys=[keys.merge_owner(job_id, rnd)], args=[owner, st.ttl])
    if not claimed:
        return Seal()
    st.close_round(job_id, rnd)
    return _sealed(st, job_id, rnd, nodes)


def seal_group_when_due(st: Store, job_id: str, rnd: int, group: int, nodes: list[str], deadline: float,
                        owner: str) -> Seal:
    """seal_when_due for one group of a two-level round: due when the group's nodes are all in or
    the deadline has passed. A group merging at the deadline seals the whole round first, so no
    payload can enter any group after a group has read its states. Seal() also when the group is
    merged already (its caller still reports it done: the worker that wrote it may have died)."""
    if st.r.exists(keys.group_result(job_id, rnd, group)) or st.round_result(job_id, rnd) is not None:
        return Seal()  # merged already, or the root gave up on this group (its nodes were counted late)
    states = st.round_nodes(job_id, rnd, nodes)
    left = deadline - st.now()
    complete = all(s.get("status") in FINAL for s in states.values())
    if left > 0 and not complete:
        return Seal(retry_in=left)
    if not st.lua(_CLAIM)(keys=[keys.group_owner(job_id, rnd, group)], args=[owner, st.ttl]):
        return Seal()
    if not complete:
        st.close_round(job_id, rnd)
    return _sealed(st, job_id, rnd, nodes)


def seal_root_when_due(st: Store, job_id: str, rnd: int, nodes: list[str], deadline: float, owner: str) -> Seal:
    """The root of a two-level round: due when every group is written, or its grace after the
    deadline. Seals the round (nodes not in yet are late) and claims the merge, as seal_when_due."""
    if st.round_result(job_id, rnd) is not None:
        return Seal()
    groups, grace = st.r.hmget(keys.round_spec(job_id, rnd), ["groups", "grace_s"])
    left = deadline + float(grace or 0) - st.now()
    if left > 0 and st.r.scard(keys.groups_done(job_id, rnd)) < int(groups or 1):
        return Seal(retry_in=left)
    if not st.lua(_CLAIM)(keys=[keys.merge_owner(job_id, rnd)], args=[owner, st.ttl]):
        return Seal()
    st.close_round(job_id, rnd)
    return _sealed(st, job_id, rnd, nodes)


def group_results(st: Store, job_id: str, rnd: int, groups: int) -> dict[int, dict]:
    """The groups written so far: group -> its record ({"nodes": final per node, ...})."""
    raw = st.r.mget([keys.group_result(job_id, rnd, g) for g in range(groups)])
    return {g: json.loads(v) for g, v in enumerate(raw) if v is not None}


def put_group_result(st: Store, job_id: str, rnd: int, group: int, record: dict) -> None:
    st.r.set(keys.group_result(job_id, rnd, group), json.dumps(record), ex=st.ttl)


def classify_nodes(st: Store, job_id: str, rnd: int, states: dict[str, dict],
                   decode: Decode) -> tuple[dict[str, object], dict[str, dict]]:
    """(decoded value per merged node, final record per node: status, bytes or reason, retries)."""
    decoded: dict[str, object] = {}
    final: dict[str, dict] = {}

    def fetch_and_decode(node: str) -> tuple[object, int]:
        return decode(node, st.get_payload(job_id, rnd, node) or b"")

    # A few threads fetch and decode at once (hashing, dequantizing and Redis reads release the
    # GIL): at most MERGE_THREADS payloads are in memory, and `decode` must be thread-safe.
    arrived = [n for n, s in states.items() if s.get("status") == "arrived"]
    with ThreadPoolExecutor(max_workers=min(MERGE_THREADS, max(1, len(arrived)))) as pool:
        pending = {n: pool.submit(fetch_and_decode, n) for n in arrived}
    for node, state in states.items():
        status = state.get("status")
        if status == "arrived":
            try:
                decoded[node], nbytes = pending[node].result()
                final[node] = {"status": NodeStatus.MERGED.value, "bytes": nbytes}
            except PayloadError as e:
                final[node] = {"status": NodeStatus.REJECTED.value, "reason": str(e)}
        elif status == "failed":
            final[node] = {"status": NodeStatus.FAILED.value, "reason": state.get("error", "")}
        else:
            final[node] = {"status": NodeStatus.LATE.value, "reason": "missed the deadline"}
        final[node]["retries"] = int(state.get("retries", 0) or 0)
    return decoded, final


def quorum_error(rnd: int, final: dict[str, dict], nodes: int, quorum: int) -> str | None:
    """None when enough nodes merged, else the one-line reason naming every node that did not."""
    merged = sum(v["status"] == NodeStatus.MERGED.value for v in final.values())
    detail = ", ".join(f"node {n} {v['status']}" for n, v in final.items() if v["status"] != NodeStatus.MERGED.value)
    try:
        check_quorum(merged, nodes, quorum, detail)
    except QuorumError as e:
        return f"round {rnd}: {e}"
    return None
