"""`lmteam report`: one job report as a self-contained HTML page (tables + embedded PNG figures).

The JSON report stays the source of truth; pipeline/report/plots.py draws it, this module lays
out the page and the team-metrics tables.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from pipeline.report.plots import (
    STATUS,
    dispatched,
    job_name,
    node_key,
    node_rows,
    node_totals,
    num,
    panels_figure,
    round_end,
    stack_pngs,
    team,
    timeline_figure,
)

CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:3px 9px}
td,th{text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%}.merged{color:#4C72B0}.late{color:#DD8452}.rejected,.failed{color:#C44E52}
small{color:#666}"""


def _fmt(x: Any) -> str:
    if x is None or x == "":
        return "–"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.2f}" if abs(x) >= 0.01 or x == 0 else f"{x:.2e}"


def _pct(x: Any) -> str | None:
    return f"{100 * x:.0f}%" if isinstance(x, int | float) else None


def _table(head: list[str], rows: list[list[Any]]) -> str:
    def cell(c: Any) -> str:
        return f'<td{f" class={c}" if c in STATUS else ""}>{html.escape(_fmt(c))}</td>'

    body = "".join("<tr>" + "".join(map(cell, row)) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + f"</tr>{body}</table>"


def team_table(report: dict) -> str:
    t, s = team(report), report.get("summary") or {}
    gap = t.get("straggler_gap_s") or {}
    rows = [["makespan (s)", t.get("makespan_s")],
            ["critical path (s): per round, dispatch to slowest merged node, plus the merge",
             t.get("critical_path_s")],
            ["total work (s): node busy time plus aggregator merge time", t.get("total_work_s")],
            ["speedup over one worker (total work / makespan)", t.get("speedup")],
            ["parallel fraction p", t.get("parallel_fraction")],
            ["Amdahl bound 1 / ((1 - p) + p / N)", t.get("amdahl_bound")],
            ["efficiency against Amdahl's bound (speedup / bound)", t.get("efficiency_vs_amdahl")],
            ["straggler gap, mean (s): slowest minus mean node latency", gap.get("mean")],
            ["straggler gap per round (s)", ", ".join(map(_fmt, gap.get("per_round") or [])) or None]]
    rows = rows if t else [["team metrics", "no node timings in this report"]]
    rows += [[label, s[k]] for k, label in (("student_ppl", "student perplexity"), ("initial_ppl", "initial "
             "perplexity"), ("teacher_kl", "teacher KL, last round"), ("wall_s", "wall time (s)"))
             if isinstance(s.get(k), int | float)]
    return _table(["team metric", "value"], rows)


def nodes_table(report: dict) -> str:
    per, tot = team(report).get("per_node") or {}, node_totals(report)
    rows = []
    for n in sorted(set(per) | set(tot), key=node_key):
        p, t = per.get(n, {}), tot.get(n, {})
        outcomes = ", ".join(f"{k} {v}" for k, v in (t.get("outcomes") or {}).items())
        rows.append([n, p.get("busy_s"), p.get("idle_s"), _pct(p.get("utilization")), p.get("cpu_s"),
                     t.get("messages"), t.get("bytes"), t.get("retries"), outcomes])
    return _table(["node", "busy s", "idle s", "utilization", "cpu s", "messages", "bytes sent", "retries",
                   "outcomes (rounds)"], rows)


def rounds_tables(report: dict) -> str:
    summary, detail = [], []
    for i, r in enumerate(report.get("rounds") or []):
        end, sealed, d, xs = round_end(r), num(r.get("sealed_at")), dispatched(r), node_rows(r)
        # latency as team_metrics counts it: dispatch to finish, merged nodes only
        lat = [x["finish"] - d for x in xs if x["status"] == "merged" and x["finish"] and d]
        gap = max(lat) - sum(lat) / len(lat) if lat else None
        merge = end - sealed if end and sealed else None
        summary.append([r.get("round", i), num(r.get("round_s")), f"{len(lat)}/{len(xs)}", gap, merge,
                        num(r.get("student_ppl")), num(r.get("teacher_kl"))])
        detail += [[r.get("round", i), x["node"], x["status"], x["busy"], x["idle"], x["wait"],
                    _pct(x["util"]), x["messages"], x["bytes"], x["retries"], x["reason"]] for x in xs]
    return (_table(["round", "round s", "merged", "straggler gap s", "merge s", "student ppl", "teacher KL"],
                   summary)
            + _table(["round", "node", "status", "busy s", "idle s", "of which waiting on slowest s",
                      "utilization", "messages", "bytes sent", "retries", "reason"], detail))


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def render_report(report: dict, out: Path, sweep: dict | None = None) -> list[Path]:
    """Write report.html (self-contained), timeline.png, panels.png and report.png (both stacked)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on fleet machines or in CI
    out.mkdir(parents=True, exist_ok=True)
    pngs = []
    figures = {"timeline.png": timeline_figure(report), "panels.png": panels_figure(report, sweep)}
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / name)
            pngs.append(out / name)
    stack_pngs(pngs, out / "report.png")
    cfg = report.get("config") or {}
    facts = ", ".join(f"{k} {cfg[k]}" for k in ("nodes", "rounds", "bits", "budget", "quorum")
                      if cfg.get(k) is not None)
    if report.get("domains"):
        facts += "; domains " + ", ".join(map(str, report["domains"]))
    old = any(r.get("dispatched_at") is None for r in report.get("rounds") or [])
    note = "<p><small>no dispatch times in this report: a round starts at its first node start</small></p>"
    title = html.escape(job_name(report))
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>lmteam report {title}</title>"
            f"<style>{CSS}</style></head><body><h1>lmteam report: {title}</h1><p>{html.escape(facts)}</p>"
            + (note if old else "")
            + "".join(f'<p><img alt="{p.stem}" src="{_data_uri(p)}"></p>' for p in pngs)
            + f"<h2>Team</h2>{team_table(report)}<h2>Nodes over the job</h2>{nodes_table(report)}"
            f"<h2>Rounds</h2>{rounds_tables(report)}</body></html>")
    (out / "report.html").write_text(page, encoding="utf-8")
    return [out / "report.html", *pngs, out / "report.png"]
