"""The team as a distributed system (arXiv 2603.12229, section 5): pure functions over timings.

Input is what the job record holds for each round: when the round was dispatched, each node's
start/finish times and the aggregator's merge time. Output is what a distributed-systems
engineer asks: busy/idle per node, critical path, speedup over one worker, Amdahl bound,
straggler gap, bytes per node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSpan:
    node: str
    start: float
    finish: float
    bytes: int = 0
    cpu: float = 0.0  # CPU seconds of the task; below `busy` when processes share cores

    @property
    def busy(self) -> float:
        return max(0.0, self.finish - self.start)


@dataclass(frozen=True)
class RoundTiming:
    dispatched: float
    nodes: Sequence[NodeSpan]
    merge_s: float  # aggregator's serial work after the seal
    ended: float


def amdahl(p: float, n: int) -> float:
    """Amdahl's bound S(N) = 1 / ((1 - p) + p / N)."""
    return 1.0 / ((1.0 - p) + p / max(n, 1))


def team_metrics(rounds: Sequence[RoundTiming], workers: int) -> dict[str, object]:
    """Summarise a job's rounds. `workers` is the number of node workers working in parallel."""
    if not rounds:
        return {}
    makespan = rounds[-1].ended - rounds[0].dispatched
    node_busy: dict[str, float] = {}
    node_bytes: dict[str, int] = {}
    node_cpu: dict[str, float] = {}
    gaps, critical, parallel_work, serial_work = [], 0.0, 0.0, 0.0
    for r in rounds:
        latencies = []
        for s in r.nodes:
            node_busy[s.node] = node_busy.get(s.node, 0.0) + s.busy
            node_bytes[s.node] = node_bytes.get(s.node, 0) + s.bytes
            node_cpu[s.node] = node_cpu.get(s.node, 0.0) + s.cpu
            latencies.append(s.finish - r.dispatched)
            parallel_work += s.busy
        if latencies:
            gaps.append(max(latencies) - sum(latencies) / len(latencies))
        # critical path of a round: dispatch -> slowest merged node -> merge
        critical += (max(latencies) if latencies else 0.0) + r.merge_s
        serial_work += r.merge_s
    total_work = parallel_work + serial_work
    p = parallel_work / total_work if total_work > 0 else 0.0
    speedup = total_work / makespan if makespan > 0 else 0.0
    bound = amdahl(p, workers)
    return {
        "makespan_s": makespan,
        "total_work_s": total_work,
        "critical_path_s": critical,
        "parallel_fraction": p,
        "speedup": speedup,
        "amdahl_bound": bound,
        "efficiency_vs_amdahl": speedup / bound if bound > 0 else 0.0,
        "straggler_gap_s": {"per_round": gaps, "mean": sum(gaps) / len(gaps) if gaps else 0.0},
        "per_node": {n: {"busy_s": b, "idle_s": max(0.0, makespan - b), "utilization": b / makespan if makespan else 0.0,
                         "cpu_s": node_cpu[n], "bytes": node_bytes[n]} for n, b in sorted(node_busy.items())},
    }
