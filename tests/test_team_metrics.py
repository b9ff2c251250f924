"""Team metrics on hand-made timelines."""

from __future__ import annotations

import pytest

from pipeline.report.team_metrics import NodeSpan, RoundTiming, amdahl, team_metrics


def test_amdahl_bound():
    """p = 0.95 gives at most 20x; p = 0.5 at most 2x."""
    assert amdahl(0.95, 10**9) == pytest.approx(20.0, rel=1e-6)
    assert amdahl(0.5, 10**9) == pytest.approx(2.0, rel=1e-6)
    assert amdahl(1.0, 4) == pytest.approx(4.0)


def test_team_metrics_one_round():
    """Two nodes of 4 s and 2 s in parallel, then 1 s merge: makespan 5, work 7."""
    r = RoundTiming(dispatched=0.0, nodes=[NodeSpan("0", 0.0, 4.0, 100), NodeSpan("1", 0.0, 2.0, 50)],
                    merge_s=1.0, ended=5.0)
    m = team_metrics([r], workers=2)
    assert m["makespan_s"] == 5.0 and m["total_work_s"] == 7.0
    assert m["critical_path_s"] == 5.0
    assert m["speedup"] == pytest.approx(7 / 5)
    assert m["parallel_fraction"] == pytest.approx(6 / 7)
    assert m["straggler_gap_s"]["mean"] == pytest.approx(1.0)  # 4 - mean(4, 2)
    assert m["per_node"]["1"]["idle_s"] == 3.0 and m["per_node"]["0"]["bytes"] == 100
