"""`lmteam status`: the fleet's workers and jobs, and one job's progress, from the job record."""

from __future__ import annotations

import time

import redis
from rich.console import Console
from rich.table import Table

from broker.jobs import JobRecord
from broker.registry import workers as registered_workers
from broker.store import Store


def print_fleet(client: redis.Redis, job_ids: list[str], flower_url: str, console: Console | None = None) -> None:
    console = console or Console()
    workers = Table(title="workers")
    for col in ("name", "queue", "host", "pid", "up", "state"):
        workers.add_column(col)
    for w in sorted(registered_workers(client).values(), key=lambda w: w["name"]):
        state = f"lost (no heartbeat for {w['seen_s_ago']:.0f}s)" if w["lost"] else "live"
        workers.add_row(w["name"], w["queue"], w["host"], str(w["pid"]), _ago(w["started_at"]), state)
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
    """One table per round of any job kind: every task the job started, plus FPLD nodes not yet started."""
    console = console or Console()
    console.print(f"[bold]{rec['id']}[/]  {rec['kind']}  {rec['status']}  updated {_ago(rec['updated_at'])}"
                  + (f"\nerror: {rec['error']}" if rec.get("error") else ""))
    store = Store(client)
    lost = {host for host, w in registered_workers(client).items() if w["lost"]}
    tasks = store.job_tasks(rec["id"])
    for rnd, names in _expected(rec).items():
        tasks[rnd] = names + [n for n in tasks.get(rnd, []) if n not in names]
    for rnd in sorted(tasks):
        table = Table(title=_round_title(rec, rnd))
        for col in ("task" if rec["kind"] == "smalltalk" else "node", "status", "step", "loss", "bytes", "retries",
                    "attempts", "resumed from", "checkpoint"):
            table.add_column(col)
        for node, s in store.round_nodes(rec["id"], rnd, tasks[rnd]).items():
            table.add_row(node, _task_status(s, lost), str(s.get("step", "")),
                          str(s.get("loss", "")), f"{int(s.get('payload_bytes', 0) or 0):,}",
                          str(s.get("retries", "")), str(s.get("attempts", "")), str(s.get("resumed_from", "")),
                          str(s.get("checkpoint_step", "")))
        console.print(table)
    console.print(f"Flower: {flower_url}/tasks?search={rec['id']}")


def _task_status(s: dict, lost_workers: set[str]) -> str:
    """A task still `running` on a worker whose heartbeat stopped is lost until redelivered."""
    status = str(s.get("final") or s.get("status", "queued"))
    if status in ("running", "retrying") and s.get("worker") in lost_workers:
        return f"lost (worker {s['worker']})"
    return status


def _expected(rec: dict) -> dict[int, list[str]]:
    """FPLD rounds list every node from the start, so a node that never began shows as queued."""
    if rec["kind"] != "fpld" or "round" not in rec:
        return {}
    nodes = [str(i) for i in range(int(rec["config"].get("nodes", 0)))] + ["aggregator"]
    return {rnd: nodes for rnd in range(int(rec["round"]) + 1)}


def _round_title(rec: dict, rnd: int) -> str:
    if rec["kind"] != "smalltalk":
        return f"round {rnd}"
    em = int(rec["config"].get("em_rounds", 0))
    return f"EM round {rnd + 1}/{em}: routers, scoring" if rnd < em else "experts and the dense baseline"


def _ago(ts: float) -> str:
    s = max(0.0, time.time() - float(ts))
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago"
