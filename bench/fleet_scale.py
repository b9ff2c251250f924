"""Fleet overhead at many nodes: what a round costs beyond the nodes' own compute, against Flower.

K node workers on an embedded fleet (one machine, one torch thread each), each doing almost
nothing (one training step) and returning one of two payloads:

- dense-1MB: 4,096 probe positions x 256 logits of the built-in byte model at 8 bits (1 MB);
- sparse-49k: a real-vocabulary sparse payload: 128 probe positions of a model whose output is
  SmolLM2's 49,152 tokens wide (a 1-layer, 16-wide Llama made here), top-64 ids and 8-bit
  log-probs per position. 128, not 512 positions: at 512, 64 nodes each held ~450 MB more
  (probe logits and their workspace) and the 24 GB machine ran out of memory.

Per round: round_overhead_s = (dispatch -> merged result) - the slowest node's own compute
(training, probe logits, encoding, evaluation, as its task records them; fetching inputs and
storing the payload count as overhead), the median over the counted rounds (the first round,
which loads torch and the model in every worker, is not counted). On 2 cores, 64 nodes take turns:
nodes_cpu_bound_s (their summed CPU seconds over the cores) is then the floor of a round, and
overhead_beyond_cpu_bound_s = round - max(slowest node's compute, that floor) is what orchestration
adds to it. Each K runs with one aggregator (merge_groups 1) and, from 16 nodes, with a two-level
merge of round(sqrt(K)) groups on two aggregator workers (broker/round_gate.py);
aggregator_merge_s is then the root's fold of the groups' sums, group_merge_s the slowest group's
fold. aggregator_peak_rss_mb is the largest peak RSS (VmHWM) of the aggregator workers; redis_peak_mb the largest
used_memory sampled every 50 ms; node_worker_pss_mb the PSS of one node worker (its supervising
parent and its pool process) after the run, median and max over the K workers; fleet_pss_mb the
PSS of every worker and Redis together.

merge_cost rows: one payload's decode + fold into the running sum, timed in-process (median of
5), the figure the README uses to say at what K one aggregator saturates.

Flower rows (bench/flower_baseline.py, `pip install 'flwr[simulation]==1.42.0'`, bench-only):
K clients returning an array of the same shape with trivial compute, 10 rounds, in Flower's
simulation engine and its deployment engine on loopback.

    python bench/fleet_scale.py                                   # everything; writes bench/results/fleet_scale.json
    python bench/fleet_scale.py --nodes 4 --payloads dense-1MB --no-flower --out /tmp/x.json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.fleet_procs import peak_rss_mb, pss_mb  # noqa: E402
from broker.settings import FleetSettings  # noqa: E402
from broker.store import Store  # noqa: E402
from pipeline.data import default_corpus  # noqa: E402
from pipeline.fpld.config import FPLDConfig, auto_merge_groups  # noqa: E402
from pipeline.fpld.driver import drive, local_fleet, prepare_data  # noqa: E402

COMPUTE = ("t_train", "t_logits", "t_encode", "t_eval")  # a node's own work, as its task records it
CORES = len(os.sched_getaffinity(0))
BLOCK = 64
REAL_VOCAB = 49_152  # SmolLM2's
PAYLOADS = ("dense-1MB", "sparse-49k")
SHAPES = {"dense-1MB": (4096, 256), "sparse-49k": (128, REAL_VOCAB)}


def wide_vocab_model(folder: Path) -> Path:
    """A 1-layer, 16-wide Llama whose output is REAL_VOCAB tokens wide (its BPE tokenizer, trained
    on the built-in corpus, uses only the first ids; the shape is what matters here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.models.hf_init import init_tiny_model

    small = init_tiny_model(folder / "small", layers=1, width=16, heads=2, vocab=512, block_size=BLOCK)
    model = AutoModelForCausalLM.from_pretrained(small)
    model.resize_token_embeddings(REAL_VOCAB)
    out = folder / "wide"
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(small).save_pretrained(out)
    return out


def config(kind: str, k: int, rounds: int, model: Path | None, merge_groups: int = 0) -> FPLDConfig:
    rows = SHAPES[kind][0]
    common = dict(nodes=k, rounds=rounds, bits=8, local_steps=1, distill_steps=1, batch_size=1,
                  probe_seqs=rows // BLOCK, eval_seqs=1, block_size=BLOCK, round_timeout=600.0,
                  measure_teacher_kl=False, merge_groups=merge_groups)
    if kind == "dense-1MB":
        return FPLDConfig(n_layer=1, n_head=2, n_embd=32, **common).validate()
    return FPLDConfig(model=str(model), payload="sparse", topk=64, **common).validate()


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


def overheads(report: dict) -> dict[str, list[float]]:
    """Per counted round: the overhead as the issue defines it, the aggregator's merge (decode and
    fold every payload; in a two-level round the root's fold of the groups' sums, and the slowest
    group's fold apart), its own model compute (one distillation step, the student's eval and, for
    sparse payloads, the student's reference probe logits, none of which Flower's rows do), and the nodes' compute phases' wall times summed: they overlap
    when K nodes share 2 cores, so a sum far above the round time shows how much they took turns,
    and all but the slowest node's compute then counts as overhead. Hence also the round's CPU
    bound, the nodes' summed CPU seconds over the machine's cores, and the overhead beyond
    max(slowest node, CPU bound): what orchestration adds to a round this machine cannot run faster."""
    out: dict[str, list[float]] = {k: [] for k in ("over", "merge", "group_merge", "learn", "total", "cpu_bound",
                                                   "beyond_cpu")}
    for r in report["rounds"][1:]:
        merged = [n for n, s in r["nodes"].items() if s["status"] == "merged"]
        compute = [sum(float(r["node_metrics"][n].get(t, 0) or 0) for t in COMPUTE) for n in merged]
        cpu_bound = sum(float(r["node_metrics"][n].get("cpu_s", 0) or 0) for n in merged) / CORES
        out["over"].append(r["round_s"] - max(compute))
        out["merge"].append(float(r.get("t_merge", "nan")))
        out["group_merge"].append(max(r.get("t_group_merge") or [0.0]))
        out["learn"].append(float(r.get("t_learn", "nan")) + float(r.get("t_reference", 0.0)))
        out["total"].append(sum(compute))
        out["cpu_bound"].append(cpu_bound)
        out["beyond_cpu"].append(r["round_s"] - max(max(compute), cpu_bound))
    return out


def lmteam_rows(nodes: list[int], kinds: list[str], rounds: int, model: Path | None,
                groups: list[str], task_events: bool = False) -> list[dict]:
    domains = default_corpus(max_bytes_per_domain=400_000)  # 64 private shards of at least a few KB
    rows = []
    med = statistics.median
    for k in nodes:
        # "sqrt": a two-level merge of round(sqrt(K)) groups, from 16 nodes; "auto": what the product picks
        variants = sorted({1 if g == "1" else auto_merge_groups(k, 2) if g == "auto"
                           else (round(k ** 0.5) if k >= 16 else 1) if g == "sqrt" else min(int(g), k)
                           for g in groups})
        # the fleet's fork server preloads transformers when any of the runs uses the HF model;
        # it runs two aggregator workers when any run has merge groups
        base = config("sparse-49k" if "sparse-49k" in kinds else kinds[0], k, rounds, model,
                      merge_groups=max(variants))
        settings = FleetSettings(task_events=task_events)  # an embedded fleet's default is off
        with local_fleet(base, prepare_data(base, domains), settings) as fleet:
            st = Store.from_url(fleet.settings.backend_url)
            t_up = time.time()
            fleet.wait_ready(st.r, timeout=900)
            print(f"K={k}: fleet up in {time.time() - t_up:.0f}s", flush=True)
            for kind in kinds:
                for g in variants:
                    cfg = config(kind, k, rounds, model, merge_groups=g)
                    redis_peak = RedisPeak(st.r)
                    t0 = time.time()
                    rep = drive(cfg, fleet.settings, prepare_data(cfg, domains))
                    wall = time.time() - t0
                    redis_mb = redis_peak.stop()
                    o = overheads(rep)
                    node_pss = [pss_mb(fleet.procs[f"node{i}"].pid) for i in range(k)]
                    fleet_pss = sum(pss_mb(p.pid) for p in fleet.procs.values()) + pss_mb(fleet.redis.proc.pid)
                    aggregators = [p.pid for name, p in fleet.procs.items() if name.startswith("aggregator")]
                    last = rep["rounds"][-1]
                    row = {"system": "lmteam", "payload": kind, "nodes": k, "merge_groups": g,
                           "payload_values_per_node": int(np.prod(SHAPES[kind])),
                           "payload_bytes": int(next(iter(last["node_metrics"].values()))["payload_bytes"]),
                           "round_overhead_s": med(o["over"]), "round_overhead_s_all": o["over"],
                           "aggregator_merge_s": med(o["merge"]), "group_merge_s": med(o["group_merge"]),
                           "aggregator_learn_s": med(o["learn"]),
                           "overhead_less_learning_s": med(x - y for x, y in zip(o["over"], o["learn"], strict=True)),
                           "nodes_compute_sum_s": med(o["total"]), "nodes_cpu_bound_s": med(o["cpu_bound"]),
                           "overhead_beyond_cpu_bound_s": med(o["beyond_cpu"]),
                           "round_s_median": med(r["round_s"] for r in rep["rounds"][1:]),
                           "merged_per_round": [sum(s["status"] == "merged" for s in r["nodes"].values())
                                                for r in rep["rounds"]],
                           "aggregator_peak_rss_mb": max(peak_rss_mb(pid) for pid in aggregators),
                           "redis_peak_mb": redis_mb,
                           "node_worker_pss_mb": {"median": med(node_pss), "max": max(node_pss)},
                           "fleet_pss_mb": fleet_pss, "rounds_counted": len(o["over"]), "wall_s": wall}
                    rows.append(row)
                    print(f"K={k:3d} G={g:2d} {kind:10s} {row['payload_bytes']:>9,} B  overhead "
                          f"{row['round_overhead_s']:.3f}s (beyond CPU bound {row['overhead_beyond_cpu_bound_s']:.3f}s; "
                          f"merge {row['aggregator_merge_s']:.3f}s, groups {row['group_merge_s']:.3f}s, "
                          f"distill+eval {row['aggregator_learn_s']:.3f}s)  round {row['round_s_median']:.3f}s  "
                          f"CPU bound {row['nodes_cpu_bound_s']:.3f}s  aggregator peak {row['aggregator_peak_rss_mb']:.0f} MB  "
                          f"redis peak {redis_mb:.1f} MB  node PSS {med(node_pss):.0f}/{max(node_pss):.0f} MB  "
                          f"fleet PSS {fleet_pss / 1024:.2f} GB", flush=True)
    return rows


def merge_cost_rows(kinds: list[str]) -> list[dict]:
    """Decode + fold of one payload into the running sum, in-process: the aggregator's cost per node
    (pipeline/fpld/merge.py's path: RunningMean for dense logits, SparseLogprobMean for sparse)."""
    from broker.wire.codec import decode_logits, encode_logits
    from broker.wire.partial import decode_partial, encode_partial
    from broker.wire.sparse import decode_sparse_logits, encode_sparse_logits
    from broker.wire.sparse_rebuild import SparseLogprobMean
    from pipeline.aggregate import RunningMean

    rng, key, out = np.random.default_rng(0), b"k" * 32, []
    for kind in kinds:
        shape = SHAPES[kind]
        logits = rng.normal(0, 3, size=shape).astype(np.float32)
        if kind == "dense-1MB":  # as a node sends it: 8 bits, clip 10, dithered
            wire = encode_logits(logits, secret=key, job="j", round=0, node="0", bits=8, clip=10.0, dither_seed=1)
            acc = RunningMean()

            def fold(wire: bytes = wire, acc=acc) -> None:
                acc.add(decode_logits(wire, secret=key, max_bytes=1 << 30)[0])
        else:
            wire = encode_sparse_logits(logits, secret=key, job="j", round=0, node="0", k=64, bits=8, dither_seed=1)
            acc = SparseLogprobMean(logits + rng.normal(0, 1, size=shape).astype(np.float32))

            def fold(wire: bytes = wire, acc=acc) -> None:
                acc.add(decode_sparse_logits(wire, secret=key, max_bytes=1 << 30)[0])
        cost = _median_time(fold)
        # a two-level merge: a group of 8 nodes' sums, signed (the group's extra work), then
        # decoded and added by the root (the root's work per group)
        for _ in range(8 - acc.count):
            fold()
        partial = encode_partial({"teacher": acc.state()}, secret=key, job="j", round=0, group="g0")
        encode_s = _median_time(lambda acc=acc: encode_partial({"teacher": acc.state()}, secret=key, job="j",
                                                               round=0, group="g0"))
        root = RunningMean() if kind == "dense-1MB" else SparseLogprobMean(acc.ref)
        fold_partial_s = _median_time(lambda root=root, partial=partial: root.add_state(
            *decode_partial(partial, secret=key, max_bytes=1 << 40)["teacher"]))
        out.append({"payload": kind, "payload_bytes": len(wire), "payload_values_per_node": int(np.prod(shape)),
                    "decode_and_fold_s": cost, "payloads_per_s": 1 / cost,
                    "partial_of_8_bytes": len(partial), "partial_encode_s": encode_s,
                    "partial_decode_and_fold_s": fold_partial_s})
        print(f"merge cost {kind:10s} {len(wire):>9,} B: {cost * 1e3:.1f} ms per payload; a group's partial sum "
              f"{len(partial):,} B: {encode_s * 1e3:.1f} ms to sign, {fold_partial_s * 1e3:.1f} ms for the root to add",
              flush=True)
    return out


def _median_time(fn, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--payloads", nargs="+", choices=PAYLOADS, default=list(PAYLOADS))
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run; the first is not counted")
    ap.add_argument("--merge-groups", nargs="+", default=["1", "sqrt"],
                    help="lmteam's merges per K, a row each: 1 (one aggregator), sqrt (round(sqrt(K)) groups, from "
                         "16 nodes), auto (what the product picks with two aggregator workers) or a group count")
    ap.add_argument("--task-events", action="store_true",
                    help="workers send Celery task events, as for a watching Flower (off by default in an embedded fleet)")
    ap.add_argument("--no-flower", action="store_true", help="lmteam rows only")
    ap.add_argument("--no-deployment", action="store_true", help="Flower's simulation engine only")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet_scale.json")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        model = wide_vocab_model(Path(tmp)) if "sparse-49k" in args.payloads else None
        merge_cost = merge_cost_rows(args.payloads)
        rows = lmteam_rows(args.nodes, args.payloads, args.rounds, model, args.merge_groups, args.task_events)
    if not args.no_flower:
        from bench.flower_baseline import flower_rows

        # Flower's clients return the bytes our nodes send: the dense payload's 4,096 x 256 codes
        # as uint8; for the sparse one, an array of its size on the wire (ids, codes and row params).
        wire = {m["payload"]: m["payload_bytes"] for m in merge_cost}
        same = {p: ((4096, 256), "uint8") if p == "dense-1MB" else ((SHAPES[p][0], wire[p] // SHAPES[p][0]), "uint8")
                for p in args.payloads}
        rows += flower_rows(args.nodes, same, rounds=10, deployment=not args.no_deployment)
    out = {"rows": rows, "merge_cost": merge_cost, "machine": "shared 2-core CPU machine, 23 GB; fleets on loopback",
           "wall_s": time.time() - t0}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
