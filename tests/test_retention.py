"""Bounded Redis: a finished job's blobs go at once (or after LMTEAM_BLOB_KEEP_S), everything else
it made after LMTEAM_JOB_KEEP_S, so jobs back to back do not grow Redis."""

from __future__ import annotations

import pytest

from broker import keys
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.fpld.driver import drive, load_domains, local_fleet, prepare_data
from tests.fleet import tiny_config, tiny_corpus, wait_until

pytestmark = pytest.mark.integration

FLEET_WIDE = {keys.JOBS, keys.WORKERS, keys.WORKER_BEATS, keys.SECRET_FINGERPRINT}


def _job_keys(r, prefix: str) -> list[bytes]:
    return list(r.scan_iter(match=f"{keys.PREFIX}:*:{prefix}*", count=1000))


def test_thirty_jobs_back_to_back_leave_redis_where_it_started(tmp_path):
    cfg = tiny_config(tiny_corpus(tmp_path, domains=2, size=20_000), nodes=2, local_steps=1, distill_steps=1,
                      probe_seqs=4, eval_seqs=4, round_timeout=30.0)
    data = prepare_data(cfg, load_domains(cfg))
    with local_fleet(cfg, data, FleetSettings(job_keep_s=3, blob_keep_s=0)) as fleet:
        r = Store.from_url(fleet.settings.backend_url).r
        fleet.wait_ready(r)
        drive(cfg, fleet.settings, data, job_id="warmup")  # scripts loaded, queues bound, workers warm
        assert wait_until(lambda: not _job_keys(r, "warmup"), 30)
        start = int(r.info("memory")["used_memory"])
        for i in range(30):
            drive(cfg, fleet.settings, data, job_id=f"batch-{i}")
            assert not list(r.scan_iter(match=f"{keys.PREFIX}:blob:batch-{i}:*")), "blobs outlived their job"
        immortal = [k for k in r.scan_iter(match=f"{keys.PREFIX}:*") if r.ttl(k) == -1 and k.decode() not in FLEET_WIDE]
        assert not immortal, immortal[:5]
        assert wait_until(lambda: not _job_keys(r, "batch-"), 30)
        drive(cfg, fleet.settings, data, job_id="last")
        assert r.zcard(keys.JOBS) == 1  # a job's end drops the ids of records that have expired
        assert wait_until(lambda: not _job_keys(r, "last"), 30)
        end = int(r.info("memory")["used_memory"])
    assert abs(end - start) <= 0.10 * start, (start, end)
