"""`lmteam report`: synthetic job reports drawn to HTML and PNG, and the CLI's one-line refusal."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.report.cli import report as report_cmd
from pipeline.report.html import node_rows, render_report, team
from pipeline.report.team_metrics import NodeSpan, RoundTiming, team_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T0 = 1_800_000_000.0
F32 = 4 * 64 * 256 * 4
NO_BROKER = {"LMTEAM_BROKER_URL": None}  # a fleet URL in the caller's environment must not leak in
# round plan: dispatch, seal, end and per node (start, finish, status, retries), seconds after T0.
# Round 0: node 2 is late (still running at the seal). Round 1: node 1's payload is rejected.
PLAN = [
    (0.0, 10.0, 12.0, {"0": (0.2, 8.0, "merged", 0), "1": (0.3, 9.5, "merged", 1),
                       "2": (0.4, None, "late", 0)}),
    (12.5, 21.0, 23.0, {"0": (12.6, 20.0, "merged", 0), "1": (12.7, 18.0, "rejected", 0),
                        "2": (13.0, 21.0, "merged", 0)}),
]


@contextlib.contextmanager
def _chdir(path: Path):
    """Run a CLI call from `path` (the report command looks up runs/<job> relative to the cwd)."""
    old = os.getcwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def _node(start: float, finish: float | None, status: str, retries: int) -> tuple[dict, dict]:
    """What the aggregator records (final) and what the node itself recorded (metrics)."""
    metrics = {"attempts": 1 + retries, "started_at": T0 + start, "retries": retries, "payload_bytes": 16_600,
               "float32_bytes": F32, "train_loss": 2.5 - start / 100, "local_ppl": 30.0}
    if finish is not None:
        metrics |= {"finished_at": T0 + finish, "arrived_at": T0 + finish}
    final: dict = {"status": status, "retries": retries}
    if status == "merged":
        final["bytes"] = 16_600
    else:
        final["reason"] = "bad signature" if status == "rejected" else "missed the deadline"
    return final, metrics


def fake_fpld_report() -> dict:
    """2 rounds x 3 nodes in the shape build_report writes, team metrics included."""
    rounds, timings = [], []
    for i, (d, sealed, end, nodes) in enumerate(PLAN):
        pairs = {n: _node(*spec) for n, spec in nodes.items()}
        finals, metrics = {n: f for n, (f, _) in pairs.items()}, {n: m for n, (_, m) in pairs.items()}
        rounds.append({
            "round": i, "dispatched_at": T0 + d, "sealed_at": T0 + sealed, "finished_at": T0 + end,
            "round_s": end - d, "status": "ok",
            "merged": sum(f["status"] == "merged" for f in finals.values()),
            "nodes": finals, "node_metrics": metrics,
            "student_ppl": 40.0 - 10 * i, "teacher_kl": 2e-4, "distill_kl": 0.05 / (i + 1), "t_distill": 1.5,
        })
        spans = [NodeSpan(n, T0 + s, T0 + f, 16_600) for n, (s, f, st, _) in nodes.items() if st == "merged"]
        timings.append(RoundTiming(T0 + d, spans, end - sealed, T0 + end))
    return {"job": "fpld-test-1", "kind": "fpld", "config": {"nodes": 3, "rounds": 2, "bits": 1},
            "domains": ["a", "b", "c"], "rounds": rounds, "team": team_metrics(timings, workers=3),
            "summary": {"student_ppl": 30.0, "initial_ppl": 200.0, "teacher_kl": 2e-4,
                        "float32_bytes_per_round": F32}}


def older_report() -> dict:
    """Before dispatched_at, team metrics, float32_bytes and the summary existed."""
    old = copy.deepcopy(fake_fpld_report())
    del old["team"], old["summary"]
    for r in old["rounds"]:
        del r["dispatched_at"], r["teacher_kl"]
        for m in r["node_metrics"].values():
            del m["float32_bytes"]
    return old


SWEEP = {"rows": [{"bits": b, "student_ppl": 30.0 / b + 10, "teacher_kl": 8.0 / 4**b} for b in (1, 2, 4, 8)]}


def _rendered(paths: list[Path], out: Path) -> str:
    assert out / "report.html" in paths
    for name in ("timeline.png", "report.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 1
    assert 'src="timeline.png"' not in page  # self-contained: embedded, never linked
    return page


def test_render_fpld_report(tmp_path):
    rep = fake_fpld_report()
    page = _rendered(render_report(rep, tmp_path, sweep=SWEEP), tmp_path)
    assert page.count("data:image/png;base64,") == 2  # the timeline and the panels
    t = rep["team"]
    for value in (t["speedup"], t["critical_path_s"], t["amdahl_bound"], t["straggler_gap_s"]["mean"]):
        assert f"{value:.2f}" in page
    assert "late" in page and "rejected" in page and "bad signature" in page


def test_waiting_on_the_slowest_node_is_finish_to_seal():
    rows = {x["node"]: x for x in node_rows(fake_fpld_report()["rounds"][0])}
    assert rows["0"]["wait"] == pytest.approx(2.0) and rows["1"]["wait"] == pytest.approx(0.5)
    assert rows["2"]["busy"] is None and rows["2"]["status"] == "late"
    assert rows["1"]["messages"] == 2 and rows["1"]["retries"] == 1


def test_older_report_renders_and_recomputes_team_metrics(tmp_path):
    old = older_report()
    t = team(old)
    assert t["makespan_s"] == pytest.approx(23.0 - 0.2)  # round 0 starts at its first node start
    page = _rendered(render_report(old, tmp_path), tmp_path)
    assert f"{t['speedup']:.2f}" in page and "no dispatch times" in page


def test_rag_report_without_timings_plots_coverage(tmp_path):
    rag = {"job": "rag-1", "kind": "rag", "config": {"budget": 64}, "rows": [
        {"alpha": a, "budget": b, "coverage": 1 - a + 0.01, "mean_set_size": 5.0}
        for a in (0.1, 0.2) for b in (32, 64)]}
    page = _rendered(render_report(rag, tmp_path), tmp_path)
    assert "no node timings" in page and (tmp_path / "panels.png").is_file()


def test_cli_renders_a_job_id_and_a_path(tmp_path):
    with _chdir(tmp_path) as cwd:
        run = Path(cwd) / "runs" / "fpld-test-1"
        run.mkdir(parents=True)
        (run / "report.json").write_text(json.dumps(fake_fpld_report()))
        res = CliRunner().invoke(report_cmd, ["fpld-test-1"], env=NO_BROKER)
        assert res.exit_code == 0, res.output
        assert Path(res.output.strip()) == (run / "report.html").resolve()
        res = CliRunner().invoke(report_cmd, [str(run / "report.json"), "--out", "elsewhere"], env=NO_BROKER)
        assert res.exit_code == 0, res.output
        assert (Path(cwd) / "elsewhere" / "report.html").is_file()


def test_cli_unknown_job_fails_in_one_line(tmp_path):
    with _chdir(tmp_path):
        res = CliRunner().invoke(report_cmd, ["no-such-job"], env=NO_BROKER)
    assert res.exit_code == 1
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert "no report for job no-such-job: looked in runs/no-such-job/report.json" in res.output


def test_cli_reads_the_report_from_the_fleet_redis(tmp_path, redis_server, redis_client):
    from broker.jobs import JobRecord

    rep = fake_fpld_report()
    JobRecord.create(redis_client, rep["job"], "fpld", rep["config"], {}).set(report=rep)
    with _chdir(tmp_path) as cwd:
        res = CliRunner().invoke(report_cmd, [rep["job"], "--broker", redis_server.url])
        assert res.exit_code == 0, res.output
        assert (Path(cwd) / "runs" / rep["job"] / "report.html").is_file()
        res = CliRunner().invoke(report_cmd, ["fpld-elsewhere", "--broker", redis_server.url])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1
    assert "looked in runs/fpld-elsewhere/report.json and the fleet's Redis" in res.output
