"""A worker that dies without saying so (SIGKILL) is shown lost once its heartbeats stop."""

from __future__ import annotations

import pytest
from rich.console import Console

from broker.embedded import EmbeddedFleet, WorkerSpec
from broker.jobs import JobRecord
from broker.registry import live_queues, workers
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.report.status import print_fleet, print_job
from tests.fleet import wait_until

pytestmark = pytest.mark.integration


def test_a_sigkilled_worker_and_its_running_task_are_shown_lost():
    with EmbeddedFleet([WorkerSpec("aggregator"), WorkerSpec("expert")], FleetSettings(heartbeat_s=0.3)) as fleet:
        st = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(st.r)
        host = next(h for h, w in workers(st.r).items() if w["name"] == "aggregator")
        assert wait_until(lambda: workers(st.r)[host]["seen_s_ago"] < 0.3 * 2, 5)  # beating
        JobRecord.create(st.r, "j", "fpld", {"nodes": 0}, {})
        st.node_update("j", 0, "aggregator", status="running", worker=host, step=7)

        fleet.kill_worker("aggregator")
        assert wait_until(lambda: workers(st.r)[host]["lost"], 10)
        assert host not in live_queues(st.r)  # submitters no longer count it
        assert not next(w for w in workers(st.r).values() if w["name"] == "expert")["lost"]

        console = Console(record=True, width=200)
        print_fleet(st.r, [], "http://fl", console)
        row = next(line for line in console.export_text().splitlines() if "aggregator" in line)
        assert "lost (no heartbeat" in row
        console = Console(record=True, width=200)
        print_job(st.r, JobRecord(st.r, "j").get() | {"id": "j"}, "http://fl", console)
        row = next(line for line in console.export_text().splitlines() if line.strip().startswith("│ aggregator"))
        assert f"lost (worker {host})" in row
