"""Drawing a job report: the per-node timeline and the job's curves, as matplotlib figures.

The plots answer what a distributed-systems engineer asks of a team (arXiv 2603.12229, section 5):
where each node spent each round (busy, waiting on the slowest node, idle while the aggregator
merges), what it sent, and what the job bought with it. Every key beyond `rounds` is optional so
older reports render. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.report.team_metrics import NodeSpan, RoundTiming, team_metrics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STATUS = {"merged": "#4C72B0", "late": "#DD8452", "rejected": "#C44E52", "failed": "#8172B3"}
WAIT, MERGE, QUEUED, OTHER = "#B0B0B0", "#55A868", "#E8E8E8", "#999999"
Panel = Callable[["Axes"], None]


# --- reading the report: tolerant of missing keys -------------------------------------------------

def num(x: Any) -> float | None:
    """A float or None: older reports hold None or nothing for what they did not measure."""
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def node_key(n: str) -> tuple[int, int, str]:
    return (0, int(n), "") if str(n).isdigit() else (1, 0, str(n))  # node 10 after node 9


def _node_ids(rnd: dict) -> list[str]:
    return sorted(set(rnd.get("nodes") or {}) | set(rnd.get("node_metrics") or {}), key=node_key)


def dispatched(rnd: dict) -> float | None:
    """When the round was sent out; older reports lack it, and the earliest node start is closest."""
    if (d := num(rnd.get("dispatched_at"))) is not None:
        return d
    metrics = (rnd.get("node_metrics") or {}).values()
    starts = [s for m in metrics if (s := num(m.get("started_at"))) is not None]
    return min(starts) if starts else None


def round_end(rnd: dict) -> float | None:
    return num(rnd.get("finished_at")) or num(rnd.get("sealed_at"))


def node_rows(rnd: dict) -> list[dict]:
    """Per node in one round: busy, idle, waiting on the slowest node (finish to seal), messages, bytes."""
    sealed, d, end = num(rnd.get("sealed_at")), dispatched(rnd), round_end(rnd)
    round_s = num(rnd.get("round_s")) or (end - d if end is not None and d is not None else None)
    rows = []
    for n in _node_ids(rnd):
        m, v = (rnd.get("node_metrics") or {}).get(n) or {}, (rnd.get("nodes") or {}).get(n) or {}
        start, finish = num(m.get("started_at")), num(m.get("finished_at")) or num(m.get("arrived_at"))
        busy = finish - start if start is not None and finish is not None else None
        rows.append({
            "node": n, "status": str(v.get("status") or m.get("final") or m.get("status") or "unknown"),
            "start": start, "finish": finish, "busy": busy,
            "wait": max(0.0, sealed - finish) if sealed is not None and finish is not None else None,
            "idle": max(0.0, round_s - busy) if busy is not None and round_s else None,  # queued+wait+merge
            "util": busy / round_s if busy is not None and round_s else None,
            "messages": int(m.get("attempts") or (1 if start is not None else 0)),
            "bytes": int(m.get("payload_bytes") or v.get("bytes") or 0),  # sent, merged or not
            "float32": int(m.get("float32_bytes") or 0),
            "retries": int(v.get("retries") or m.get("retries") or 0),
            "reason": str(v.get("reason") or m.get("error") or ""),
        })
    return rows


def node_totals(report: dict) -> dict[str, dict]:
    """Per node over the job: messages, bytes sent, float32 equivalent, retries, outcome counts."""
    f32_round = int((report.get("summary") or {}).get("float32_bytes_per_round") or 0)
    out: dict[str, dict] = {}
    for r in report.get("rounds") or []:
        for x in node_rows(r):
            t = out.setdefault(x["node"], dict.fromkeys(("messages", "bytes", "float32", "retries"), 0))
            t.setdefault("outcomes", {})
            for k in ("messages", "bytes", "retries"):
                t[k] += x[k]
            t["float32"] += x["float32"] or (f32_round if x["bytes"] else 0)
            t["outcomes"][x["status"]] = t["outcomes"].get(x["status"], 0) + 1
    return dict(sorted(out.items(), key=lambda kv: node_key(kv[0])))


def team(report: dict) -> dict:
    """The report's team metrics, or (older reports) the same metrics recomputed from the rounds."""
    if report.get("team"):
        return report["team"]
    timings = []
    for r in report.get("rounds") or []:
        d, end, sealed = dispatched(r), round_end(r), num(r.get("sealed_at"))
        if d is not None and end is not None:
            spans = [NodeSpan(x["node"], x["start"], x["finish"], x["bytes"]) for x in node_rows(r)
                     if x["status"] == "merged" and x["busy"] is not None]
            timings.append(RoundTiming(d, spans, end - sealed if sealed is not None else 0.0, end))
    workers = int((report.get("config") or {}).get("nodes") or 0) or len(node_totals(report))
    return team_metrics(timings, workers=workers) if timings else {}


def job_name(report: dict) -> str:
    job, kind = str(report.get("job", "")), str(report.get("kind", "job"))
    return job if job.startswith(kind) else f"{kind} {job}".strip()


# --- plots ----------------------------------------------------------------------------------------

def draw_timeline(ax: Axes, report: dict) -> None:
    """Gantt: per node and round, queued, busy (coloured by outcome), waiting on the slowest node."""
    rounds = report.get("rounds") or []
    starts = [d for d in map(dispatched, rounds) if d is not None]
    nodes = sorted({n for r in rounds for n in _node_ids(r)}, key=node_key)
    if not starts or not nodes:
        ax.text(0.5, 0.5, "no node timings in this report", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    t0, ys = min(starts), {n: i for i, n in enumerate(nodes)}
    agg, seen = len(ys), set()  # the aggregator's row goes below the nodes
    hatched = {"color": WAIT, "height": 0.6, "hatch": "///", "edgecolor": "white"}
    for r in rounds:
        d, sealed, end, xs = dispatched(r), num(r.get("sealed_at")), round_end(r), node_rows(r)
        slowest = max((x["finish"] for x in xs if x["status"] == "merged" and x["finish"]), default=None)
        for x in xs:
            y, colour = ys[x["node"]], STATUS.get(x["status"], OTHER)
            seen.add(x["status"])
            if x["start"] is None:  # never started: only its outcome is known, at the seal
                ax.plot([(sealed or d or t0) - t0], [y], "X", color=colour, ms=10)
                ax.text((sealed or d or t0) - t0, y, f"  {x['status']}, never started", va="center",
                        fontsize=8, color=colour, fontweight="bold")
                continue
            if d is not None and x["start"] > d:
                ax.barh(y, x["start"] - d, left=d - t0, color=QUEUED, height=0.5)
            stop = x["finish"] if x["finish"] is not None else (end or x["start"])
            edge = {"edgecolor": "black", "linewidth": 1.5} if x["finish"] == slowest else {}  # critical path
            ax.barh(y, stop - x["start"], left=x["start"] - t0, color=colour, height=0.6, **edge)
            if x["wait"]:
                ax.barh(y, x["wait"], left=stop - t0, **hatched)
            if x["status"] != "merged":
                ax.text(stop - t0, y, f" {x['status']}" + ("" if x["finish"] else " (unfinished)"),
                        va="center", fontsize=8, color=colour, fontweight="bold")
        if d is not None and sealed is not None:  # the aggregator, too, waits on the slowest node
            ax.barh(agg, sealed - d, left=d - t0, **hatched)
        if sealed is not None and end is not None:
            ax.barh(agg, end - sealed, left=sealed - t0, color=MERGE, height=0.6)
            ax.axvline(sealed - t0, color="black", lw=0.7, ls="--", alpha=0.4)
        if d is not None and end is not None:
            ax.text((d + end) / 2 - t0, -0.75, f"round {r.get('round', '?')}  {end - d:.1f} s", ha="center",
                    va="bottom", fontsize=9)
    _timeline_axes(ax, report, ys, agg, seen)


def _timeline_axes(ax: Axes, report: dict, ys: dict[str, int], agg: int, seen: set[str]) -> None:
    from matplotlib.patches import Patch

    ax.set_yticks([*ys.values(), agg], [f"node {n}" for n in ys] + ["aggregator"])
    ax.set_ylim(agg + 0.6, -1.0)  # node 0 on top, a line of headroom for the round labels
    ax.set_xlabel("seconds since the job's first dispatch")
    ax.grid(axis="x", alpha=0.3)
    legend = [Patch(color=c, label=f"busy: {s}") for s, c in STATUS.items() if s in seen | {"merged"}]
    legend += [Patch(facecolor=STATUS["merged"], edgecolor="black", lw=1.5, label="slowest (critical path)"),
               Patch(facecolor=WAIT, hatch="///", edgecolor="white", label="waiting on the slowest node"),
               Patch(color=QUEUED, label="queued (dispatch to start)"),
               Patch(facecolor="white", edgecolor=OTHER, label="idle (between rounds)"),
               Patch(color=MERGE, label="aggregator: decode, merge, distill")]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False,
              ncol=len(legend) if len(legend) <= 7 else math.ceil(len(legend) / 2))
    if t := team(report):
        ax.set_title(f"{job_name(report)}: makespan {t['makespan_s']:.1f} s, critical path "
                     f"{t['critical_path_s']:.1f} s, speedup {t['speedup']:.2f}x over one worker "
                     f"(Amdahl bound {t['amdahl_bound']:.2f}x), straggler gap "
                     f"{t['straggler_gap_s']['mean']:.2f} s", fontsize=10)


def _legend(ax: Axes, twin: Axes | None, loc: str) -> None:
    """One legend for an axis and its twin, drawn on the twin so the twin's lines do not cover it."""
    axes = [ax] if twin is None else [ax, twin]
    axes[-1].legend(handles=[h for a in axes for h in a.get_legend_handles_labels()[0]], loc=loc, fontsize=8)


def _xy(pts: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    return [p[0] for p in pts], [p[1] for p in pts]


def draw_bytes(ax: Axes, report: dict) -> None:
    """Bytes each node sent over the whole job next to what float32 logits would have cost."""
    tot = node_totals(report)
    names, xs = list(tot), range(len(tot))
    mb = {k: [tot[n][k] / 1e6 for n in names] for k in ("bytes", "float32")}
    ax.bar([i - 0.2 for i in xs], mb["bytes"], 0.4, label="sent", color=STATUS["merged"])
    if any(mb["float32"]):  # older reports did not record the float32 size
        ax.bar([i + 0.2 for i in xs], mb["float32"], 0.4, label="float32 equivalent", color=WAIT)
    for i, t in enumerate(tot.values()):
        if t["bytes"] and t["float32"]:
            ax.text(i - 0.2, t["bytes"] / 1e6, f"{t['float32'] / t['bytes']:.1f}x\nsmaller", ha="center",
                    va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [f"node {n}\n{tot[n]['messages']} msgs" for n in names], fontsize=8)
    ax.set_ylabel("MB over the job")
    ax.set_title("bytes sent per node", fontsize=10)
    ax.legend(fontsize=8)


def draw_curves(ax: Axes, report: dict) -> None:
    """Student perplexity per round (round 0 = the initial model) and the nodes' mean training loss."""
    rounds = report.get("rounds") or []
    pts = [(i + 1, p) for i, r in enumerate(rounds) if (p := num(r.get("student_ppl"))) is not None]
    if (p0 := num((report.get("summary") or {}).get("initial_ppl"))) is not None:
        pts.insert(0, (0, p0))
    ax.plot(*_xy(pts), "o-", color=STATUS["merged"], label="student perplexity")
    ax.set_yscale("log")
    ax.set(xlabel="round (0 = initial model)", ylabel="held-out perplexity")
    ax.xaxis.get_major_locator().set_params(integer=True)
    losses, tw = [], None
    for i, r in enumerate(rounds):
        metrics = (r.get("node_metrics") or {}).values()
        vals = [v for m in metrics if (v := num(m.get("train_loss"))) is not None]
        if vals:
            losses.append((i + 1, sum(vals) / len(vals)))
    if losses:
        tw = ax.twinx()
        tw.plot(*_xy(losses), "s--", color=STATUS["late"], label="mean node train loss")
        tw.set_ylabel("train loss (nats)")
    _legend(ax, tw, "upper right")
    ax.set_title("learning curves", fontsize=10)


def draw_kl(ax: Axes, report: dict) -> None:
    """What quantization costs (teacher KL) next to how far distillation got (distill KL)."""
    for key, label, c in (("teacher_kl", "KL(float32 teacher || B-bit teacher)", STATUS["rejected"]),
                          ("distill_kl", "distill KL (student to teacher)", MERGE)):
        pts = [(i + 1, v) for i, r in enumerate(report.get("rounds") or []) if (v := num(r.get(key)))]
        if pts:
            ax.plot(*_xy(pts), "o-", color=c, label=label)
    ax.set_yscale("log")  # zero KL (32 bits) has no place on it and is skipped above
    ax.set(xlabel="round", ylabel="KL (nats)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_title("KL per round", fontsize=10)
    ax.legend(fontsize=8)


def draw_bits(ax: Axes, rows: list[dict], bits: float | None) -> None:
    """The sweep across jobs: bits per logit against student perplexity and teacher KL."""
    rows = sorted((r for r in rows if num(r.get("bits"))), key=lambda r: float(r["bits"]))
    ppl = [(float(r["bits"]), v) for r in rows if (v := num(r.get("student_ppl")))]
    kl = [(float(r["bits"]), v) for r in rows if (v := num(r.get("teacher_kl")))]
    ax.plot(*_xy(ppl), "o-", color=STATUS["merged"], label="student perplexity")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="bits per logit (sweep across jobs)", ylabel="student perplexity")
    if bits:
        ax.axvline(bits, color="black", ls=":", lw=1, label=f"this job: B = {bits:g}")
    tw = ax.twinx() if kl else None
    if tw is not None:
        tw.plot(*_xy(kl), "s--", color=STATUS["rejected"], label="teacher KL")
        tw.set_yscale("log")
        tw.set_ylabel("teacher KL (nats)")
    ticks = sorted({float(r["bits"]) for r in rows})
    ax.set_xticks(ticks, [f"{b:g}" for b in ticks])
    _legend(ax, tw, "upper right")
    ax.set_title("bits vs accuracy", fontsize=10)


def draw_coverage(ax: Axes, rows: list[dict]) -> None:
    """Conformal coverage against the per-node budget, one line per alpha, with its 1 - alpha target."""
    from matplotlib import colormaps

    for i, a in enumerate(sorted({num(r["alpha"]) for r in rows})):
        c = colormaps["tab10"](i % 10)
        ax.plot(*_xy(sorted((num(r["budget"]), num(r["coverage"])) for r in rows if num(r["alpha"]) == a)),
                "o-", color=c, label=f"alpha {a:g}")
        ax.axhline(1 - a, color=c, ls="--", lw=0.8)
    ax.set(xlabel="budget per node (bits per query)", ylabel="coverage (dashed: 1 - alpha)")
    ax.set_title("coverage vs budget", fontsize=10)
    ax.legend(fontsize=8)


def panels(report: dict, sweep: dict | None) -> list[Panel]:
    """The smaller plots this report has data for; absent data means no panel, never an error."""
    rounds, cfg, out = report.get("rounds") or [], report.get("config") or {}, []
    if any(t["bytes"] for t in node_totals(report).values()):
        out.append(partial(draw_bytes, report=report))
    if any(num(r.get("student_ppl")) for r in rounds):
        out.append(partial(draw_curves, report=report))
    if any(num(r.get(k)) for r in rounds for k in ("teacher_kl", "distill_kl")):
        out.append(partial(draw_kl, report=report))
    rows = [*((sweep or {}).get("rows") or []), *(report.get("rows") or [])]
    rows = [r for r in rows if isinstance(r, dict)]
    if report.get("kind") == "rag":  # one rag job: its own alphas at its one budget
        alphas = ((report.get("summary") or {}).get("alphas") or {}).values()
        rows += [{**a, "budget": cfg.get("budget")} for a in alphas if isinstance(a, dict)]
    if any(num(r.get("bits")) and num(r.get("student_ppl")) for r in rows):
        out.append(partial(draw_bits, rows=rows, bits=num(cfg.get("bits"))))
    if cov := [r for r in rows if all(num(r.get(k)) is not None for k in ("alpha", "budget", "coverage"))]:
        out.append(partial(draw_coverage, rows=cov))
    return out


def timeline_figure(report: dict) -> Figure:
    from matplotlib.figure import Figure

    timed = any(dispatched(r) is not None for r in report.get("rounds") or [])
    height = 1.8 + 0.45 * (len(node_totals(report)) + 1) if timed else 0.5  # a one-line note otherwise
    fig = Figure(figsize=(13, height), layout="constrained", dpi=110)
    draw_timeline(fig.subplots(), report)
    return fig


def panels_figure(report: dict, sweep: dict | None) -> Figure | None:
    """The smaller plots in a grid as wide as the timeline, so the two stack into one page."""
    from matplotlib.figure import Figure

    if not (todo := panels(report, sweep)):
        return None
    cols = 2 if len(todo) in (2, 4) else min(3, len(todo))
    n_rows = math.ceil(len(todo) / cols)
    fig = Figure(figsize=(13, 4.0 * n_rows), layout="constrained", dpi=110)
    fig.get_layout_engine().set(wspace=0.08)  # room between a twin axis label and the next panel
    axes = fig.subplots(n_rows, cols, squeeze=False).ravel()
    for ax, draw in zip(axes, todo, strict=False):
        draw(ax)
    for ax in axes[len(todo):]:
        ax.set_axis_off()
    return fig


def stack_pngs(paths: list[Path], out: Path) -> None:
    """One PNG of the whole report, stacked from the rendered figures (cheaper than drawing it again)."""
    import numpy as np
    from matplotlib import image

    imgs = [image.imread(p)[..., :3] for p in paths]
    width = max(i.shape[1] for i in imgs)
    image.imsave(out, np.vstack([np.pad(i, ((0, 0), (0, width - i.shape[1]), (0, 0)), constant_values=1.0)
                                 for i in imgs]))


# --- HTML -----------------------------------------------------------------------------------------
