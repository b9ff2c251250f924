"""Fleet overhead at many nodes: what a round costs beyond the nodes' own compute.

K node workers on an embedded fleet (one machine), each doing almost nothing (one training step
of a 1-layer 32-wide model) and returning a rows x 256 logit payload at 8 bits (rows = 512: 128 KB;
rows = 4096: 1 MB). Per round: round_overhead_s = (dispatch -> merged result) - the slowest
node's task time, the median over the counted rounds (the first round, which loads the student,
is not counted); a node's compute is its training, probe logits, encoding and evaluation, as it
records them (fetching inputs and storing the payload count as overhead). aggregator_peak_rss_mb is the peak RSS (VmHWM) of the aggregator's pool process,
where the merge runs; redis_peak_mb the largest used_memory sampled every 50 ms during the runs.

    python bench/fleet_scale.py                       # K = 4, 16; rows 512, 4096; writes bench/results/fleet_scale.json
    python bench/fleet_scale.py --tree ../old-checkout --out /tmp/before.json   # the same bench on another checkout

Not here yet (issue 13): K = 64 (64 prefork workers with torch in both processes do not fit in
24 GB), the real-vocabulary sparse payload, and the Flower rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMPUTE = ("t_train", "t_logits", "t_encode", "t_eval")  # a node's own work, as its task records it


def load(tree: Path):
    """(FPLDConfig, FleetSettings, Store, default_corpus, prepare_data, local_fleet, drive) of a checkout,
    before or after the layered layout."""
    sys.path.insert(0, str(tree))
    from broker.settings import FleetSettings
    from broker.store import Store
    from pipeline.data import default_corpus

    try:
        from pipeline.fpld.config import FPLDConfig
        from pipeline.fpld.driver import drive, local_fleet, prepare_data
    except ImportError:  # a checkout from before the layered layout
        from pipeline.fpld_config import FPLDConfig

        from pipeline.fpld import drive, local_fleet, prepare_data
    return FPLDConfig, FleetSettings, Store, default_corpus, prepare_data, local_fleet, drive


def vm_hwm_mb(pid: int) -> float:
    """Peak RSS of a process and of its children (the prefork pool), the largest of them, in MB."""
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    peak = 0.0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return peak


class RedisPeak:
    """The largest used_memory seen, sampled from a thread."""

    def __init__(self, client) -> None:
        self.client, self.peak, self._stop = client, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, int(self.client.info("memory")["used_memory"]))

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 4096], help="payload rows (x 256 values)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run; the first is not counted")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet_scale.json")
    args = ap.parse_args()
    FPLDConfig, FleetSettings, Store, default_corpus, prepare_data, local_fleet, drive = load(args.tree.resolve())

    block = 64
    domains = default_corpus(max_bytes_per_domain=60_000)
    rows_out, t0 = [], time.time()
    for k in args.nodes:
        def cfg_for(rows: int, k: int = k):
            return FPLDConfig(nodes=k, rounds=args.rounds, bits=8, local_steps=1, distill_steps=1, batch_size=1,
                              probe_seqs=rows // block, eval_seqs=1, block_size=block, n_layer=1, n_head=2,
                              n_embd=32, round_timeout=120.0, measure_teacher_kl=False).validate()

        base = cfg_for(args.rows[0])
        data = prepare_data(base, domains)
        with local_fleet(base, data, FleetSettings()) as fleet:
            st = Store.from_url(fleet.settings.backend_url)
            t_up = time.time()
            fleet.wait_ready(st.r, timeout=600)
            print(f"K={k}: fleet up in {time.time() - t_up:.0f}s", flush=True)
            for rows in args.rows:
                cfg = cfg_for(rows)
                run_data = prepare_data(cfg, domains)
                redis_peak = RedisPeak(st.r)
                rep = drive(cfg, fleet.settings, run_data)
                peak_mb = redis_peak.stop()
                overheads = []
                for r in rep["rounds"][1:]:
                    slowest = max(sum(float(s.get(t, 0) or 0) for t in COMPUTE) for n, s in r["node_metrics"].items()
                                  if r["nodes"][n]["status"] == "merged")
                    overheads.append(r["round_s"] - slowest)
                payload = int(next(iter(rep["rounds"][-1]["node_metrics"].values()))["payload_bytes"])
                row = {"system": "lmteam", "tree": str(args.tree), "nodes": k, "payload_values_per_node": rows * 256,
                       "payload_bytes": payload, "round_overhead_s": statistics.median(overheads),
                       "round_overhead_s_all": overheads, "round_s_median": statistics.median(r["round_s"] for r in rep["rounds"][1:]),
                       "aggregator_peak_rss_mb": vm_hwm_mb(fleet.procs["aggregator"].pid), "redis_peak_mb": peak_mb,
                       "rounds_counted": len(overheads)}
                rows_out.append(row)
                print(f"K={k:3d} payload {payload:>9,} B  overhead {row['round_overhead_s']:.3f}s  "
                      f"round {row['round_s_median']:.3f}s  aggregator peak {row['aggregator_peak_rss_mb']:.0f} MB  "
                      f"redis peak {peak_mb:.1f} MB", flush=True)
    out = {"rows": rows_out, "machine": "shared 2-core CPU machine, embedded fleet on loopback",
           "wall_s": time.time() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
