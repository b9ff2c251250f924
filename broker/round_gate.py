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


_ARRIVE = """
local spec, seen, ttl = KEYS[1], KEYS[2], tonumber(ARGV[2])
redis.call('SADD', seen, ARGV[1])
redis.call('EXPIRE', seen, ttl)
local expected = redis.call('HGET', spec, 'expected')
if (not expected) or redis.call('SCARD', seen) < tonumber(expected) then return false end
if redis.call('HSETNX', spec, 'triggered', '1') == 0 then return false end
return {redis.call('HGET', spec, 'task'), redis.call('HGET', spec, 'args')}
"""

_CLAIM = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return 1 end
return redis.call('GET', KEYS[1]) == ARGV[1] and 1 or 0
"""

MERGE_THREADS = min(4, os.cpu_count() or 1)  # payloads fetched and decoded at once by a merge
FINAL = ("arrived", "failed")  # a node in one of these has done its part of the round


def open_round(st: Store, job_id: str, rnd: int, nodes: list[str], merge_task: str, merge_args: list) -> None:
    """Before the node tasks go out: which nodes the round waits for, and the task that merges them."""
    key = keys.round_spec(job_id, rnd)
    st.r.hset(key, mapping={"expected": len(nodes), "task": merge_task, "args": json.dumps(merge_args),
                            "opened_at": f"{st.now():.6f}"})
    st.r.expire(key, st.ttl)


def arrive(st: Store, job_id: str, rnd: int, node: str) -> tuple[str, list] | None:
    """Count node's part of the round as over; the arrival that completes the set gets the merge
    task (name, args) to send, exactly once. None for every other arrival, or a round with no merge."""
    out = st.lua(_ARRIVE)(keys=[keys.round_spec(job_id, rnd), keys.arrived_set(job_id, rnd)],
                                        args=[node, st.ttl])
    if not out:
        return None
    task, args = (x.decode() if isinstance(x, bytes) else x for x in out)
    return task, json.loads(args)


def follow_round(st: Store, app: Celery, job_id: str, rnd: int, deadline: float, give_up_s: float,
                 on_poll: Callable[[], None] | None = None, poll: float = 0.25, shadow: str = "") -> dict | None:
    """The submitter's side of a round opened with open_round: the round's result, or None after
    give_up_s. At the deadline, if no arrival has sent the merge yet, send it: the nodes that are
    in get merged, the rest are late."""
    spec = keys.round_spec(job_id, rnd)
    sent = False

    def result() -> dict | None:
        nonlocal sent
        if on_poll is not None:
            on_poll()
        out = st.round_result(job_id, rnd)
        if out is None and not sent and st.now() >= deadline:
            sent = True
            if st.r.hsetnx(spec, "triggered", "deadline"):
                task, args = st.r.hget(spec, "task").decode(), json.loads(st.r.hget(spec, "args"))
                app.send_task(task, args=args, shadow=shadow)
        return out

    return wait_for(result, seconds_left(give_up_s), client=st.r, wake=keys.done(job_id, rnd), poll=poll)


@dataclass(frozen=True)
class Seal:
    """What seal_when_due decided: merge these states, come back in retry_in seconds, or neither."""

    states: dict[str, dict] | None = None
    sealed_at: float = 0.0
    open_s: float = 0.0  # how long the round was open, on Redis's clock
    retry_in: float = 0.0


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
    opened = st.r.hget(keys.round_spec(job_id, rnd), "opened_at")
    now = st.now()
    return Seal(st.round_nodes(job_id, rnd, nodes), time.time(), now - float(opened) if opened else 0.0)


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
