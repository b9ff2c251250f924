"""The aggregator's side of a sealed round, shared by every job kind that merges node payloads.

Wait for every node (or the deadline, on Redis's clock), seal the round so that a late payload
can never be merged, then give each node one final status: merged (its payload decoded), rejected
(it did not), failed (the node said so) or late (nothing by the seal). The quorum is then a count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from broker import keys
from broker.jobs import NodeStatus
from broker.store import Store
from broker.waiting import wait_for
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


def wait_and_seal(st: Store, job_id: str, rnd: int, nodes: list[str], deadline: float) -> tuple[dict[str, dict], float]:
    """Block until every node has arrived or failed, or the deadline passes; then seal the round.

    A node's arrival or failure pushes to the round's wake-up list, so the wait ends at once.
    Returns the nodes' states as of the seal and the (local) time of sealing.
    """
    def all_in() -> bool | None:
        states = st.round_nodes(job_id, rnd, nodes)
        return True if all(s.get("status") in ("arrived", "failed") for s in states.values()) else None

    wait_for(all_in, lambda: deadline - st.now(), client=st.r, wake=keys.arrived(job_id, rnd), poll=0.5)
    st.close_round(job_id, rnd)
    return st.round_nodes(job_id, rnd, nodes), time.time()


def classify_nodes(st: Store, job_id: str, rnd: int, states: dict[str, dict],
                   decode: Decode) -> tuple[dict[str, object], dict[str, dict]]:
    """(decoded value per merged node, final record per node: status, bytes or reason, retries)."""
    decoded: dict[str, object] = {}
    final: dict[str, dict] = {}
    for node, state in states.items():
        status = state.get("status")
        if status == "arrived":
            try:
                decoded[node], nbytes = decode(node, st.get_payload(job_id, rnd, node) or b"")
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
