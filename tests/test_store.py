"""The store and job record against a real private Redis."""

from __future__ import annotations

import pytest

from broker.jobs import JobRecord, JobStatus, UnknownJob, list_jobs
from broker.store import Store


def test_submit_payload_arrives_once(redis_client):
    """First write wins; a redelivered task's second write is a duplicate and changes nothing."""
    st = Store(redis_client)
    assert st.submit_payload("j", 0, "1", b"first") == "arrived"
    assert st.submit_payload("j", 0, "1", b"second") == "duplicate"
    assert st.get_payload("j", 0, "1") == b"first"
    assert st.node_state("j", 0, "1")["status"] == "arrived"


def test_submit_after_close_is_late_and_not_stored(redis_client):
    """A payload that arrives after the seal is recorded late and never becomes mergeable."""
    st = Store(redis_client)
    assert st.submit_payload("j", 0, "0", b"on time") == "arrived"
    assert st.close_round("j", 0) is True
    assert st.close_round("j", 0) is False
    assert st.submit_payload("j", 0, "1", b"too late") == "late"
    assert st.get_payload("j", 0, "1") is None
    assert st.node_state("j", 0, "1")["status"] == "late"
    assert st.get_payload("j", 0, "0") == b"on time"


def test_payloads_are_staged_with_set_and_leave_no_staging_key(redis_client):
    """A payload is never a Lua argument: it is SET beside the round, then moved (or dropped) by
    the gate; whatever the outcome, no staged copy is left behind, and the payload keeps a TTL."""
    from broker import keys

    st = Store(redis_client, ttl=600)
    big = b"x" * (8 << 20)
    assert st.submit_payload("j", 0, "0", big) == "arrived"
    assert st.submit_payload("j", 0, "0", b"again") == "duplicate"
    st.close_round("j", 0)
    assert st.submit_payload("j", 0, "1", big) == "late"
    assert list(redis_client.scan_iter(keys.staged_payload("*", "*", "*", "*"))) == []
    assert st.get_payload("j", 0, "0") == big
    assert 0 < redis_client.ttl(keys.payload("j", 0, "0")) <= 600


def test_node_update_if_open_respects_seal(redis_client):
    """A failure recorded after the seal does not overwrite the aggregator's verdict."""
    st = Store(redis_client)
    assert st.node_update_if_open("j", 0, "2", status="failed") is True
    st.close_round("j", 0)
    st.node_update("j", 0, "3", status="late")
    assert st.node_update_if_open("j", 0, "3", status="failed") is False
    assert st.node_state("j", 0, "3")["status"] == "late"


def test_round_result_written_once(redis_client):
    """A redelivered aggregator cannot replace the first merged result."""
    st = Store(redis_client)
    assert st.put_round_result("j", 0, {"merged": 3}) is True
    assert st.put_round_result("j", 0, {"merged": 4}) is False
    assert st.round_result("j", 0) == {"merged": 3}


def test_store_clock_is_redis_time(redis_client):
    """Deadlines use Redis's clock, which moves forward."""
    st = Store(redis_client)
    a = st.now()
    assert st.now() >= a > 1e9


def test_job_record_roundtrip(redis_client):
    """Config, status and events survive as JSON; unknown jobs give a readable error."""
    rec = JobRecord.create(redis_client, "fpld-x", "fpld", {"nodes": 4}, {"broker_url": "redis://:***@h"})
    rec.set_status(JobStatus.RUNNING)
    got = rec.get()
    assert got["config"] == {"nodes": 4} and got["status"] == "running"
    assert [e["type"] for e in rec.events()] == ["created", "status"]
    assert list_jobs(redis_client) == ["fpld-x"]
    with pytest.raises(UnknownJob, match="no job 'nope'"):
        JobRecord(redis_client, "nope").get()


def test_job_tasks_lists_every_recorded_round_and_task_of_one_job(redis_client):
    st = Store(redis_client)
    for rnd, node in [(0, "router10"), (0, "router2"), (0, "score0"), (2, "dense"), (2, "expert1"), (1, "aggregator"),
                      (1, "3")]:
        st.node_update("job-a", rnd, node, status="running")
    st.node_update("job-ab", 0, "router0", status="running")  # a job id that extends another's is not mixed in
    assert st.job_tasks("job-a") == {0: ["router2", "router10", "score0"], 1: ["3", "aggregator"],
                                     2: ["expert1", "dense"]}
    assert st.job_tasks("job-none") == {}


def test_drop_payloads_deletes_or_keeps_for_a_while(redis_client):
    st = Store(redis_client)
    for node in "01":
        st.submit_payload("j", 0, node, b"x" * 10)
    st.put_blob("j", "diag/0/0", b"side")
    st.drop_payloads("j", 0, ["0"], blobs=("diag/0/0",))
    assert st.get_payload("j", 0, "0") is None and st.get_blob("j", "diag/0/0") is None
    assert st.get_payload("j", 0, "1") == b"x" * 10  # not named: untouched
    st.drop_payloads("j", 0, ["1"], keep_s=60)
    assert st.get_payload("j", 0, "1") == b"x" * 10
    assert 0 < redis_client.ttl("lmteam:payload:j:0:1") <= 60


def _chunk_keys(r) -> list[bytes]:
    return list(r.scan_iter(match="lmteam:chunk:*"))


def test_values_over_the_chunk_size_travel_as_chunks(redis_client):
    """Past chunk_bytes a blob or payload is written as chunks (no single Redis string holds it) and
    read back whole; losing the seal race, dropping the payload or expiring a chunk leaves nothing
    behind or fails loudly, never with truncated bytes."""
    st = Store(redis_client, ttl=600)
    st.chunk_bytes = 1000
    data = bytes(range(256)) * 10  # 2,560 bytes: 3 chunks
    st.put_blob("j", "student/0", data)
    assert max(len(redis_client.get(k)) for k in _chunk_keys(redis_client)) <= 1000
    assert redis_client.get("lmteam:blob:j:student/0").startswith(b"lmteam-chunked")  # only a manifest
    assert st.get_blob("j", "student/0") == data
    assert st.put_blob_once("j", "student/0", data[::-1]) is False and len(_chunk_keys(redis_client)) == 3

    assert st.submit_payload("j", 0, "0", data) == "arrived"
    assert st.get_payload("j", 0, "0") == data
    assert st.submit_payload("j", 0, "0", data) == "duplicate"
    st.close_round("j", 0)
    assert st.submit_payload("j", 0, "1", data) == "late"
    assert len(_chunk_keys(redis_client)) == 6  # the blob's and the arrived payload's, no more
    st.drop_payloads("j", 0, ["0", "1"])
    assert len(_chunk_keys(redis_client)) == 3 and st.get_payload("j", 0, "0") is None

    redis_client.delete(_chunk_keys(redis_client)[0])
    with pytest.raises(RuntimeError, match="lost chunks"):
        st.get_blob("j", "student/0")


def test_a_finished_job_keeps_its_record_and_drops_its_blobs(redis_client):
    """retire(): blobs, payloads and chunks go at once with blob_keep_s = 0; the record and the
    per-round facts get the job's retention as TTL; ids of expired records leave the job list."""
    st = Store(redis_client, ttl=600)
    st.chunk_bytes = 10
    job = JobRecord.create(redis_client, "j1", "fpld", {}, {}, ttl=600)
    st.put_blob("j1", "probe", b"p" * 25)
    st.node_update("j1", 0, "0", status="merged")
    redis_client.zadd("lmteam:jobs", {"gone": 0})  # a record that has expired already
    st.put_blob("j10", "probe", b"other")  # a job whose id starts with j1's (5 bytes: one key)
    with job.running(keep_s=60, blob_keep_s=0):
        pass
    assert st.get_blob("j10", "probe") == b"other" and redis_client.ttl("lmteam:blob:j10:probe") > 60
    assert job.get()["status"] == JobStatus.SUCCEEDED.value
    assert st.get_blob("j1", "probe") is None and not _chunk_keys(redis_client)
    assert 0 < redis_client.ttl("lmteam:job:j1") <= 60
    assert 0 < redis_client.ttl("lmteam:node:j1:0:0") <= 60
    assert list_jobs(redis_client) == ["j1"]
