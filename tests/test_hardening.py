"""Faults against a real fleet: SIGKILLed workers, a Redis restart, a crashing task process."""

from __future__ import annotations

import pytest

from broker.embedded import WorkerSpec
from broker.jobs import JobRecord
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.fpld.driver import drive, load_domains, local_fleet, prepare_data
from tests.fleet import in_thread, tiny_config, tiny_corpus, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    corpus = tiny_corpus(tmp_path_factory.mktemp("corpus"))
    cfg = tiny_config(corpus)
    return corpus, prepare_data(cfg, load_domains(cfg))




def _merges_per_round(store: Store, job_id: str) -> dict[int, int]:
    counts: dict[int, int] = {}
    for e in JobRecord(store.r, job_id).events():
        if e["type"] == "round_merged":
            counts[e["round"]] = counts.get(e["round"], 0) + 1
    return counts


def test_sigkilled_node_worker_is_redelivered_after_restart(setup):
    """SIGKILL a node worker mid-training, restart it: it gets its task back at once (not after the
    visibility timeout, two hours here), resumes from its checkpoint, and merges within the round."""
    corpus, data = setup
    cfg = tiny_config(corpus, local_steps=600, checkpoint_every=50, quorum=4, round_timeout=90.0)
    settings = FleetSettings(visibility_timeout=7200)
    with local_fleet(cfg, data, settings) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(store.r)
        t, box = in_thread(lambda: drive(cfg, fleet.settings, data, job_id="fpld-sigkill"))
        # kill once the first checkpoint (step 50) is on disk
        assert wait_until(lambda: int(store.node_state("fpld-sigkill", 0, "1").get("step", 0)) >= 60, 60)
        fleet.kill_worker("node1")
        fleet.start_worker(WorkerSpec("node", 1, fleet.specs[1].data))  # what a restart policy does
        t.join(180)
        assert "error" not in box, box.get("error")
        report = box["report"]
        assert report["rounds"][0]["nodes"]["1"]["status"] == "merged"
        metrics = report["rounds"][0]["node_metrics"]["1"]
        assert int(metrics["attempts"]) == 2
        assert int(metrics["resumed_from"]) >= 50  # training resumed from its checkpoint, not step 0
        assert _merges_per_round(store, "fpld-sigkill") == {0: 1}


def test_crashing_task_process_is_redelivered(setup):
    """A task whose process dies (os._exit) is re-queued at once and the round merges all nodes."""
    corpus, data = setup
    cfg = tiny_config(corpus, faults={"2": "crash"}, quorum=4, round_timeout=60.0)
    with local_fleet(cfg, data, FleetSettings()) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(store.r)
        report = drive(cfg, fleet.settings, data)
        assert report["rounds"][0]["merged"] == 4
        assert int(report["rounds"][0]["node_metrics"]["2"]["attempts"]) == 2


def test_redis_restart_mid_job_loses_and_duplicates_nothing(setup):
    """Restart Redis (append-only on) while nodes train: the job completes, one merge per round."""
    corpus, data = setup
    cfg = tiny_config(corpus, rounds=2, local_steps=300, quorum=4, round_timeout=120.0)
    settings = FleetSettings(visibility_timeout=20)
    with local_fleet(cfg, data, settings, appendonly=True) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(store.r)
        t, box = in_thread(lambda: drive(cfg, fleet.settings, data, job_id="fpld-restart"))
        assert wait_until(lambda: store.node_state("fpld-restart", 0, "0").get("status") == "running", 60)
        fleet.redis.restart(down_s=1.0)
        t.join(300)
        assert "error" not in box, box.get("error")
        report = box["report"]
        assert [r["merged"] for r in report["rounds"]] == [4, 4]
        assert _merges_per_round(store, "fpld-restart") == {0: 1, 1: 1}
        assert JobRecord(store.r, "fpld-restart").get()["status"] == "succeeded"


def test_fleet_over_tls(setup):
    """rediss:// end to end: broker, result store, job record and payloads all over TLS."""
    corpus, data = setup
    cfg = tiny_config(corpus, nodes=4, round_timeout=60.0)
    with local_fleet(cfg, data, FleetSettings(), tls=True) as fleet:
        assert fleet.settings.broker_url.startswith("rediss://")
        store = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(store.r)
        report = drive(cfg, fleet.settings, data)
        assert report["rounds"][0]["merged"] == 4
        assert report["settings"]["broker_url"].startswith("rediss://:***@")


def test_aggregator_killed_mid_distillation_merges_once_after_restart(setup):
    """SIGKILL the aggregator while it distills, restart it under its name: it takes the merge it
    had claimed back at once (the visibility timeout is two hours here), and the round merges once."""
    corpus, data = setup
    cfg = tiny_config(corpus, distill_steps=4000, quorum=4, round_timeout=60.0)
    with local_fleet(cfg, data, FleetSettings(visibility_timeout=7200)) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(store.r)
        t, box = in_thread(lambda: drive(cfg, fleet.settings, data, job_id="fpld-aggkill"))
        assert wait_until(lambda: int(store.node_state("fpld-aggkill", 0, "aggregator").get("step", 0)) >= 100, 90)
        fleet.kill_worker("aggregator")
        killed_at = int(store.node_state("fpld-aggkill", 0, "aggregator")["step"])
        assert killed_at < cfg.distill_steps - 1  # it died mid-distillation
        fleet.start_worker(WorkerSpec("aggregator"))
        t.join(180)
        assert not t.is_alive(), "the merge was not taken back (it would wait out the visibility timeout)"
        assert "error" not in box, box.get("error")
        assert box["report"]["rounds"][0]["merged"] == 4
        assert _merges_per_round(store, "fpld-aggkill") == {0: 1}


def test_two_level_root_killed_mid_distillation_merges_once_after_restart(setup):
    """A two-level round (2 groups, two aggregator workers): SIGKILL whichever aggregator distills as
    the root; restarted under its name it takes the root merge back, finds the groups' partial sums
    still there, and the round merges once, every node in."""
    import socket

    from broker import keys

    corpus, data = setup
    cfg = tiny_config(corpus, distill_steps=4000, quorum=4, round_timeout=60.0, merge_groups=2)
    with local_fleet(cfg, data, FleetSettings(visibility_timeout=7200)) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(store.r)
        assert {"aggregator", "aggregator1"} <= set(fleet.procs)
        t, box = in_thread(lambda: drive(cfg, fleet.settings, data, job_id="fpld-rootkill"))
        assert wait_until(lambda: int(store.node_state("fpld-rootkill", 0, "aggregator").get("step", 0)) >= 100, 90)
        host = socket.gethostname()
        root = [n for n in ("aggregator", "aggregator1") if store.r.scard(keys.worker_claims(f"{n}@{host}"))]
        assert len(root) == 1, root  # the root's merge is claimed by exactly one worker
        fleet.kill_worker(root[0])
        assert int(store.node_state("fpld-rootkill", 0, "aggregator")["step"]) < cfg.distill_steps - 1
        assert store.get_blob("fpld-rootkill", "partial/0/0") is not None  # kept until the result is written
        fleet.start_worker(WorkerSpec("aggregator", worker_name=None if root[0] == "aggregator" else root[0]))
        t.join(180)
        assert not t.is_alive(), "the root merge was not taken back"
        assert "error" not in box, box.get("error")
        assert box["report"]["rounds"][0]["merged"] == 4
        assert len(box["report"]["rounds"][0]["t_group_merge"]) == 2
        assert _merges_per_round(store, "fpld-rootkill") == {0: 1}
        assert store.get_blob("fpld-rootkill", "partial/0/0") is None
