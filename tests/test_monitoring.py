"""Watching a fleet: Flower names tasks by job/round/node, `lmteam status` shows each node's state."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from broker.embedded import free_port
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.fpld.driver import drive, load_domains, local_fleet, prepare_data
from tests.fleet import tiny_config, tiny_corpus

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _get(url: str, auth: str):
    req = urllib.request.Request(url, headers={"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_flower_and_status_show_the_job(tmp_path):
    """Flower lists each node's task under a readable name with the job id; status shows the rounds."""
    corpus = tiny_corpus(tmp_path)
    cfg = tiny_config(corpus, round_timeout=60.0)
    data = prepare_data(cfg, load_domains(cfg))
    with local_fleet(cfg, data, FleetSettings(task_events=True)) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        fleet.wait_ready(store.r)
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LMTEAM_BROKER_URL": fleet.settings.broker_url}
        flower = subprocess.Popen([sys.executable, "-m", "cli", "flower", "--port", str(port), "--basic-auth", "u:p"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            for _ in range(150):  # Flower must know every worker before the job so it sees every event
                try:
                    if len(_get(f"http://127.0.0.1:{port}/api/workers?refresh=1", "u:p")) >= 5:
                        break
                except OSError:
                    pass
                time.sleep(0.2)
            time.sleep(1.0)
            report = drive(cfg, fleet.settings, data)
            job = report["job"]
            # Flower shows the readable name ('fpld node 2 r0 JOB', set as the task's shadow name) or,
            # depending on which event it saw first, the task's own name with the job id in its args.
            seen: dict[str, str] = {}
            for _ in range(75):
                for t in _get(f"http://127.0.0.1:{port}/api/tasks", "u:p").values():
                    if job in t["name"] or job in str(t.get("args")):
                        seen[str(t.get("worker", "")).split("@")[0]] = t["name"]
                if len(seen) >= 5:
                    break
                time.sleep(0.2)
            assert set(seen) == {"node0", "node1", "node2", "node3", "aggregator"}
            assert all(name.startswith(("fpld ", "lmteam.fpld.")) for name in seen.values())
            with pytest.raises(urllib.error.HTTPError):
                _get(f"http://127.0.0.1:{port}/api/tasks", "u:wrong")
        finally:
            flower.terminate()
            flower.wait(10)

        res = subprocess.run([sys.executable, "-m", "cli", "status", job, "--flower-url", "http://fl:5555"],
                             env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "succeeded" in res.stdout and res.stdout.count("merged") >= 5
        assert f"http://fl:5555/tasks?search={job}" in res.stdout
        res = subprocess.run([sys.executable, "-m", "cli", "status"], env={**env, "COLUMNS": "200"},
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and job in res.stdout and "node.3" in res.stdout
