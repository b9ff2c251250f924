"""Human-readable summaries of job reports (the JSON report is the source of truth)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_fpld_summary(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    s, cfg, team = report["summary"], report["config"], report["team"]
    t = Table(title=f"FPLD {report['job']}: K={cfg['nodes']} T={cfg['rounds']} B={cfg['bits']} bits")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("student perplexity (held-out mixture)", f"{s['student_ppl']:.2f}")
    t.add_row("initial model perplexity", f"{s['initial_ppl']:.2f}")
    for node, ppl in sorted(s["local_ppl"].items()):
        t.add_row(f"local model node {node} perplexity", f"{ppl:.2f}")
    if s.get("teacher_kl") is not None:
        t.add_row("KL(full-precision teacher || B-bit teacher)", f"{s['teacher_kl']:.5f}")
    for node, b in sorted(s["bytes_per_node"].items()):
        t.add_row(f"bytes sent node {node}", f"{b:,}")
    for node, b in sorted((s.get("teacher_kl_bytes_per_node") or {}).items()):
        t.add_row(f"teacher-KL side channel node {node} (float32, not uplink)", f"{b:,}")
    t.add_row("float32 bytes per node per round", f"{s['float32_bytes_per_round']:,}")
    t.add_row("round time (s)", ", ".join(f"{x:.1f}" for x in s["round_s"]))
    groups = min(int(cfg.get("merge_groups") or 1), cfg["nodes"])
    t.add_row("merge", f"two-level: {groups} groups, then the root" if groups > 1 else "one aggregator")
    for key, label in (("dropped", "dropped (late)"), ("retried", "retried"), ("rejected", "rejected")):
        items = [f"r{r}: {','.join(v)}" for r, v in s[key].items() if v]
        t.add_row(label, "; ".join(items) or "none")
    if team:
        t.add_row("speedup over one worker / Amdahl bound",
                  f"{team['speedup']:.2f}x / {team['amdahl_bound']:.2f}x")
        t.add_row("straggler gap, mean (s)", f"{team['straggler_gap_s']['mean']:.2f}")
    console.print(t)
