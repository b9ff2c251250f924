"""The aggregator's round gate (wait, seal, classify, quorum) against a real private Redis."""

from __future__ import annotations

import threading
import time

from broker.round_gate import classify_nodes, quorum_error, wait_and_seal
from broker.store import Store
from broker.wire.codec import PayloadError


def _decode(node: str, payload: bytes) -> tuple[object, int]:
    if payload.startswith(b"bad"):
        raise PayloadError(f"node {node}: bad signature")
    return payload.decode(), len(payload)


def test_every_node_gets_one_final_status(redis_client):
    st = Store(redis_client)
    st.submit_payload("j", 0, "0", b"good")
    st.submit_payload("j", 0, "1", b"bad payload")
    st.node_update("j", 0, "2", status="failed", error="RuntimeError: boom", retries=2)
    states, _ = wait_and_seal(st, "j", 0, ["0", "1", "2", "3"], deadline=st.now() + 0.3)
    decoded, final = classify_nodes(st, "j", 0, states, _decode)
    assert decoded == {"0": "good"}
    assert final["0"] == {"status": "merged", "bytes": 4, "retries": 0}
    assert final["1"]["status"] == "rejected" and "bad signature" in final["1"]["reason"]
    assert final["2"] == {"status": "failed", "reason": "RuntimeError: boom", "retries": 2}
    assert final["3"]["status"] == "late"
    assert st.submit_payload("j", 0, "3", b"good") == "late"  # sealed: node 3 can no longer arrive
    assert quorum_error(0, final, nodes=4, quorum=1) is None
    error = quorum_error(0, final, nodes=4, quorum=2)
    assert error.startswith("round 0: only 1 of 4") and "node 1 rejected" in error and "node 3 late" in error


def test_a_node_arriving_wakes_the_wait_before_the_deadline(redis_client):
    st = Store(redis_client)
    st.submit_payload("j", 1, "0", b"good")

    def late_arrival() -> None:
        time.sleep(0.3)
        st.submit_payload("j", 1, "1", b"good")  # pushes to the round's wake-up list

    threading.Thread(target=late_arrival).start()
    t0 = time.monotonic()
    states, _ = wait_and_seal(st, "j", 1, ["0", "1"], deadline=st.now() + 30)
    assert time.monotonic() - t0 < 5
    assert {n: s["status"] for n, s in states.items()} == {"0": "arrived", "1": "arrived"}
