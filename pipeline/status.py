"""`lmteam status`: the fleet's workers and jobs, and one job's progress, from the job record."""

from __future__ import annotations

import time

import redis
from rich.console import Console
from rich.table import Table

from broker.jobs import JobRecord
from broker.store import Store
from workers.registry import live_queues


def print_fleet(client: redis.Redis, job_ids: list[str], flower_url: str, console: Console | None = None) -> None:
    console = console or Console()
    workers = Table(title="workers")
    for col in ("name", "queue", "host", "pid", "up"):
        workers.add_column(col)
    for w in sorted(live_queues(client).values(), key=lambda w: w["name"]):
        workers.add_row(w["name"], w["queue"], w["host"], str(w["pid"]), _ago(w["started_at"]))
    console.print(workers)
    jobs = Table(title="jobs (newest first)")
    for col in ("job", "kind", "status", "updated", "error"):
        jobs.add_column(col)
    for job_id in job_ids:
        rec = JobRecord(client, job_id).get()
        jobs.add_row(job_id, rec["kind"], rec["status"], _ago(rec["updated_at"]), rec.get("error", ""))
    console.print(jobs)
    console.print(f"Flower: {flower_url}/tasks  (tasks are named '<kind> node <id> r<round> <job>')")


def print_job(client: redis.Redis, rec: dict, flower_url: str, console: Console | None = None) -> None:
    console = console or Console()
    cfg = rec["config"]
    nodes = [str(i) for i in range(int(cfg.get("nodes", 0)))]
    rounds = int(rec.get("round", 0)) + 1 if "round" in rec else 0
    console.print(f"[bold]{rec['id']}[/]  {rec['kind']}  {rec['status']}  updated {_ago(rec['updated_at'])}"
                  + (f"\nerror: {rec['error']}" if rec.get("error") else ""))
    store = Store(client)
    for rnd in range(rounds):
        table = Table(title=f"round {rnd}")
        for col in ("node", "status", "step", "loss", "bytes", "retries", "attempts", "resumed from"):
            table.add_column(col)
        for node, s in store.round_nodes(rec["id"], rnd, nodes + ["aggregator"]).items():
            table.add_row(node, str(s.get("final") or s.get("status", "queued")), str(s.get("step", "")),
                          str(s.get("loss", "")), f"{int(s.get('payload_bytes', 0) or 0):,}",
                          str(s.get("retries", "")), str(s.get("attempts", "")), str(s.get("resumed_from", "")))
        console.print(table)
    console.print(f"Flower: {flower_url}/tasks?search={rec['id']}")


def _ago(ts: float) -> str:
    s = max(0.0, time.time() - float(ts))
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"
