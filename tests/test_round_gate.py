"""The round gate (arrive, seal when due, one merge owner, classify, quorum) against a real private Redis."""

from __future__ import annotations

import threading
import time

from broker.round_gate import arrive, classify_nodes, open_round, quorum_error, seal_when_due
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
    assert seal_when_due(st, "j", 0, ["0", "1", "2", "3"], deadline=st.now() + 30, owner="a").retry_in > 25
    seal = seal_when_due(st, "j", 0, ["0", "1", "2", "3"], deadline=st.now(), owner="a")  # deadline: node 3 out
    decoded, final = classify_nodes(st, "j", 0, seal.states, _decode)
    assert decoded == {"0": "good"}
    assert final["0"] == {"status": "merged", "bytes": 4, "retries": 0}
    assert final["1"]["status"] == "rejected" and "bad signature" in final["1"]["reason"]
    assert final["2"] == {"status": "failed", "reason": "RuntimeError: boom", "retries": 2}
    assert final["3"]["status"] == "late"
    assert st.submit_payload("j", 0, "3", b"good") == "late"  # sealed: node 3 can no longer arrive
    assert quorum_error(0, final, nodes=4, quorum=1) is None
    error = quorum_error(0, final, nodes=4, quorum=2)
    assert error.startswith("round 0: only 1 of 4") and "node 1 rejected" in error and "node 3 late" in error


def test_the_arrival_that_completes_the_round_sends_the_merge_exactly_once(redis_client):
    st = Store(redis_client)
    open_round(st, "j", 1, ["0", "1", "2"], "lmteam.fpld.aggregate_round", ["j", 1, 123.0])
    assert arrive(st, "j", 1, "0") is None
    assert arrive(st, "j", 1, "0") is None  # a redelivered node counts once
    assert arrive(st, "j", 1, "2") is None
    assert arrive(st, "j", 1, "1") == ("lmteam.fpld.aggregate_round", ["j", 1, 123.0])
    assert arrive(st, "j", 1, "1") is None and arrive(st, "j", 1, "0") is None  # sent once only
    assert arrive(st, "j", 2, "0") is None  # a round with no merge (indexing, SmallTalk) triggers nothing


def test_one_merge_owner_even_when_both_merge_tasks_fire(redis_client):
    """The completing arrival's merge and the deadline's merge race; a redelivered copy keeps its id."""
    st = Store(redis_client)
    nodes = ["0", "1"]
    for n in nodes:
        st.submit_payload("j", 3, n, b"good")
    results: list = []

    def fire(owner: str) -> None:
        results.append((owner, seal_when_due(st, "j", 3, nodes, deadline=st.now() + 30, owner=owner)))

    threads = [threading.Thread(target=fire, args=(o,)) for o in ("arrival", "deadline")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merging = [o for o, seal in results if seal.states is not None]
    assert len(merging) == 1 and st.is_closed("j", 3)
    assert seal_when_due(st, "j", 3, nodes, st.now(), owner=merging[0]).states is not None  # redelivered: still its own
    other = "deadline" if merging[0] == "arrival" else "arrival"
    assert seal_when_due(st, "j", 3, nodes, st.now(), owner=other).states is None
    st.put_round_result("j", 3, {"status": "ok"})
    assert seal_when_due(st, "j", 3, nodes, st.now(), owner=merging[0]).states is None  # merged: nothing to redo


def test_a_node_arriving_wakes_a_waiter_before_the_deadline(redis_client):
    """Drivers that wait for a round's tasks block on its wake-up list, not on a poll interval."""
    from broker import keys
    from broker.waiting import seconds_left, wait_for

    st = Store(redis_client)
    st.submit_payload("j", 1, "0", b"good")

    def late_arrival() -> None:
        time.sleep(0.3)
        st.submit_payload("j", 1, "1", b"good")  # pushes to the round's wake-up list

    threading.Thread(target=late_arrival).start()
    t0 = time.monotonic()
    def both_in() -> dict | None:
        states = st.round_nodes("j", 1, ["0", "1"])
        return states if all(x.get("status") == "arrived" for x in states.values()) else None

    states = wait_for(both_in, seconds_left(30), client=st.r, wake=keys.arrived("j", 1), poll=10)
    assert time.monotonic() - t0 < 5  # woken by the push, long before the 10 s poll
    assert {n: s["status"] for n, s in states.items()} == {"0": "arrived", "1": "arrived"}


def test_merge_groups_are_runs_of_consecutive_nodes():
    from broker.round_gate import merge_groups

    nodes = [str(i) for i in range(10)]
    assert merge_groups(nodes, 3) == [["0", "1", "2"], ["3", "4", "5"], ["6", "7", "8", "9"]]
    assert merge_groups(nodes, 1) == [nodes]
    assert merge_groups(["0", "1"], 5) == [["0"], ["1"]]  # never an empty group


def test_two_level_round_sends_each_group_merge_and_then_the_root_exactly_once(redis_client):
    from broker.round_gate import group_done, round_groups

    st = Store(redis_client)
    nodes = [str(i) for i in range(5)]
    open_round(st, "j2", 0, nodes, "root.task", ["j2", 0, 9.0], groups=2, group_task="group.task")
    assert round_groups(st, "j2", 0) == 2
    assert arrive(st, "j2", 0, "0") is None
    assert arrive(st, "j2", 0, "3") is None
    assert arrive(st, "j2", 0, "1") == ("group.task", ["j2", 0, 9.0, 0])  # group 0 is nodes 0, 1
    assert arrive(st, "j2", 0, "1") is None  # a redelivered node counts once
    assert arrive(st, "j2", 0, "4") is None
    assert arrive(st, "j2", 0, "2") == ("group.task", ["j2", 0, 9.0, 1])  # group 1 is nodes 2, 3, 4
    assert group_done(st, "j2", 0, 1) is None
    assert group_done(st, "j2", 0, 1) is None  # a redone group counts once
    assert group_done(st, "j2", 0, 0) == ("root.task", ["j2", 0, 9.0])
    assert group_done(st, "j2", 0, 0) is None


def test_a_group_merges_early_only_when_complete_and_at_the_deadline_seals_the_round(redis_client):
    from broker.round_gate import seal_group_when_due, seal_root_when_due

    st = Store(redis_client)
    nodes = ["0", "1", "2", "3"]
    open_round(st, "j3", 0, nodes, "root.task", [], groups=2, group_task="group.task")
    for n in ("0", "1", "2"):
        st.submit_payload("j3", 0, n, b"good")
    soon = st.now() + 30
    early = seal_group_when_due(st, "j3", 0, 0, ["0", "1"], deadline=soon, owner="a")
    assert set(early.states) == {"0", "1"} and not st.is_closed("j3", 0)  # complete: merged, round open
    assert seal_group_when_due(st, "j3", 0, 0, ["0", "1"], deadline=soon, owner="b").states is None  # one owner
    assert seal_group_when_due(st, "j3", 0, 1, ["2", "3"], deadline=soon, owner="a").retry_in > 25  # node 3 missing
    assert seal_root_when_due(st, "j3", 0, nodes, deadline=soon, owner="r").retry_in > 25  # groups not written
    late = seal_group_when_due(st, "j3", 0, 1, ["2", "3"], deadline=st.now(), owner="a")
    assert late.states["2"]["status"] == "arrived" and late.states["3"].get("status") is None
    assert st.is_closed("j3", 0) and st.submit_payload("j3", 0, "3", b"good") == "late"
    # past deadline + grace the root merges whatever groups are written
    root = seal_root_when_due(st, "j3", 0, nodes, deadline=st.now() - 1000, owner="r")
    assert set(root.states) == set(nodes)
    assert seal_root_when_due(st, "j3", 0, nodes, deadline=st.now() - 1000, owner="other").states is None


def test_a_group_merge_after_the_root_gave_up_on_it_does_nothing(redis_client):
    from broker.round_gate import seal_group_when_due

    st = Store(redis_client)
    open_round(st, "j4", 0, ["0", "1"], "root.task", [], groups=2, group_task="group.task")
    st.put_round_result("j4", 0, {"status": "ok"})  # the root merged past the grace, without group 1
    late = seal_group_when_due(st, "j4", 0, 1, ["1"], deadline=st.now() - 1000, owner="a")
    assert late.states is None and late.retry_in == 0


def test_the_submitter_sends_missing_group_merges_at_the_deadline_and_the_root_after_the_grace(
        redis_server, redis_client):
    """Group 0 merged; group 1's nodes never arrive and nobody merges it. At the deadline the
    submitter sends group 1's merge only; when the grace has passed with group 1 still unwritten,
    it sends the root's, which is then due and merges without it."""
    import json as json_

    from broker import keys
    from broker.app import client_app
    from broker.round_gate import follow_round, group_done, seal_root_when_due
    from broker.settings import FleetSettings

    st = Store(redis_client)
    nodes = ["0", "1", "2", "3"]
    open_round(st, "j5", 0, nodes, keys.FPLD_AGGREGATE_TASK, ["j5", 0, 1.0], groups=2,
               group_task=keys.FPLD_GROUP_MERGE_TASK, grace_s=0.5)
    assert arrive(st, "j5", 0, "0") is None
    assert arrive(st, "j5", 0, "1") == (keys.FPLD_GROUP_MERGE_TASK, ["j5", 0, 1.0, 0])  # sent by that node
    assert group_done(st, "j5", 0, 0) is None
    app = client_app(FleetSettings(broker_url=redis_server.url, task_events=False))
    deadline = st.now()
    assert seal_root_when_due(st, "j5", 0, nodes, deadline, owner="r").retry_in > 0  # within the grace
    assert follow_round(st, app, "j5", 0, deadline, give_up_s=2.0, poll=0.05) is None  # no worker here
    sent = [json_.loads(m)["headers"] for m in redis_client.lrange(keys.AGGREGATOR_QUEUE, 0, -1)]
    assert sorted((h["task"], h["argsrepr"]) for h in sent) == [
        (keys.FPLD_AGGREGATE_TASK, "['j5', 0, 1.0]"), (keys.FPLD_GROUP_MERGE_TASK, "['j5', 0, 1.0, 1]")]
    root = seal_root_when_due(st, "j5", 0, nodes, deadline, owner="r")  # past the grace: due
    assert set(root.states) == set(nodes) and st.is_closed("j5", 0)
