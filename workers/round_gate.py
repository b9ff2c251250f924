"""The aggregator's side of a sealed round, shared by FPLD and FC-RAG.

Wait for every node (or the deadline, on Redis's clock), seal the round so that a late payload
can never be merged, then give each node one final status: merged (its payload decoded), rejected
(it did not), failed (the node said so) or late (nothing by the seal). The quorum is then a count.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from broker.codec import PayloadError
from broker.jobs import NodeStatus
from broker.store import Store
from pipeline.aggregate import QuorumError, check_quorum

Decode = Callable[[str, bytes], tuple[object, int]]
"""decode(node, payload) -> (value, bytes on the wire); raises PayloadError for a bad payload"""


def wait_and_seal(st: Store, job_id: str, rnd: int, nodes: list[str], deadline: float,
                  wake_key: str | None = None) -> tuple[dict[str, dict], float]:
    """Block until every node has arrived or failed, or the deadline passes; then seal the round.

    With wake_key, a node pushing to that list wakes the wait at once instead of at the next poll.
    Returns the nodes' states as of the seal and the (local) time of sealing.
    """
    while True:
        states = st.round_nodes(job_id, rnd, nodes)
        if all(s.get("status") in ("arrived", "failed") for s in states.values()):
            break
        left = deadline - st.now()
        if left <= 0:
            break
        if wake_key is None:
            time.sleep(min(left, 0.1))
        else:
            st.r.blpop([wake_key], timeout=min(left, 0.5))
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
