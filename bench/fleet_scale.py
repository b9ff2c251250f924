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
which loads torch and the model in every worker, is not counted). aggregator_peak_rss_mb is the
peak RSS (VmHWM) of the aggregator's pool process, where the merge runs; redis_peak_mb the largest
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
from pipeline.fpld.config import FPLDConfig  # noqa: E402
from pipeline.fpld.driver import drive, local_fleet, prepare_data  # noqa: E402

COMPUTE = ("t_train", "t_logits", "t_encode", "t_eval")  # a node's own work, as its task records it
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


def config(kind: str, k: int, rounds: int, model: Path | None) -> FPLDConfig:
    rows = SHAPES[kind][0]
    common = dict(nodes=k, rounds=rounds, bits=8, local_steps=1, distill_steps=1, batch_size=1,
                  probe_seqs=rows // BLOCK, eval_seqs=1, block_size=BLOCK, round_timeout=600.0,
                  measure_teacher_kl=False)
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


def overheads(report: dict) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per counted round: the overhead as the issue defines it, the aggregator's merge (decode and
    fold every payload), its own learning work (one distillation step and the student's eval,
    which Flower's rows do not do), and the nodes' compute phases' wall times summed: they overlap
    when K nodes share 2 cores, so a sum far above the round time shows how much they took turns,
    and all but the slowest node's compute then counts as overhead."""
    over, merge, learn, total = [], [], [], []
    for r in report["rounds"][1:]:
        merged = [n for n, s in r["nodes"].items() if s["status"] == "merged"]
        compute = [sum(float(r["node_metrics"][n].get(t, 0) or 0) for t in COMPUTE) for n in merged]
        over.append(r["round_s"] - max(compute))
        merge.append(float(r.get("t_merge", "nan")))
        learn.append(float(r.get("t_learn", "nan")))
        total.append(sum(compute))
    return over, merge, learn, total


def lmteam_rows(nodes: list[int], kinds: list[str], rounds: int, model: Path | None) -> list[dict]:
    domains = default_corpus(max_bytes_per_domain=400_000)  # 64 private shards of at least a few KB
    rows = []
    for k in nodes:
        # the fleet's fork server preloads transformers when any of the runs uses the HF model
        base = config("sparse-49k" if "sparse-49k" in kinds else kinds[0], k, rounds, model)
        with local_fleet(base, prepare_data(base, domains), FleetSettings()) as fleet:
            st = Store.from_url(fleet.settings.backend_url)
            t_up = time.time()
            fleet.wait_ready(st.r, timeout=900)
            print(f"K={k}: fleet up in {time.time() - t_up:.0f}s", flush=True)
            for kind in kinds:
                cfg = config(kind, k, rounds, model)
                redis_peak = RedisPeak(st.r)
                t0 = time.time()
                rep = drive(cfg, fleet.settings, prepare_data(cfg, domains))
                wall = time.time() - t0
                redis_mb = redis_peak.stop()
                over, merge, learn, total = overheads(rep)
                node_pss = [pss_mb(fleet.procs[f"node{i}"].pid) for i in range(k)]
                fleet_pss = sum(pss_mb(p.pid) for p in fleet.procs.values()) + pss_mb(fleet.redis.proc.pid)
                last = rep["rounds"][-1]
                row = {"system": "lmteam", "payload": kind, "nodes": k,
                       "payload_values_per_node": int(np.prod(SHAPES[kind])),
                       "payload_bytes": int(next(iter(last["node_metrics"].values()))["payload_bytes"]),
                       "round_overhead_s": statistics.median(over), "round_overhead_s_all": over,
                       "aggregator_merge_s": statistics.median(merge), "aggregator_learn_s": statistics.median(learn),
                       "overhead_less_learning_s": statistics.median(o - x for o, x in zip(over, learn, strict=True)),
                       "nodes_compute_sum_s": statistics.median(total),
                       "round_s_median": statistics.median(r["round_s"] for r in rep["rounds"][1:]),
                       "merged_per_round": [sum(s["status"] == "merged" for s in r["nodes"].values())
                                            for r in rep["rounds"]],
                       "aggregator_peak_rss_mb": peak_rss_mb(fleet.procs["aggregator"].pid),
                       "redis_peak_mb": redis_mb,
                       "node_worker_pss_mb": {"median": statistics.median(node_pss), "max": max(node_pss)},
                       "fleet_pss_mb": fleet_pss, "rounds_counted": len(over), "wall_s": wall}
                rows.append(row)
                print(f"K={k:3d} {kind:10s} {row['payload_bytes']:>9,} B  overhead {row['round_overhead_s']:.3f}s  "
                      f"(merge {row['aggregator_merge_s']:.3f}s, distill+eval {row['aggregator_learn_s']:.3f}s)  "
                      f"round {row['round_s_median']:.3f}s  aggregator peak {row['aggregator_peak_rss_mb']:.0f} MB  "
                      f"redis peak {redis_mb:.1f} MB  node PSS {statistics.median(node_pss):.0f}/{max(node_pss):.0f} MB  "
                      f"fleet PSS {fleet_pss / 1024:.2f} GB", flush=True)
    return rows


def merge_cost_rows(kinds: list[str]) -> list[dict]:
    """Decode + fold of one payload into the running sum, in-process: the aggregator's cost per node
    (pipeline/fpld/merge.py's path: RunningMean for dense logits, SparseLogprobMean for sparse)."""
    from broker.wire.codec import decode_logits, encode_logits
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
        times = []
        for _ in range(7):
            t = time.perf_counter()
            fold()
            times.append(time.perf_counter() - t)
        cost = statistics.median(times)
        out.append({"payload": kind, "payload_bytes": len(wire), "payload_values_per_node": int(np.prod(shape)),
                    "decode_and_fold_s": cost, "payloads_per_s": 1 / cost})
        print(f"merge cost {kind:10s} {len(wire):>9,} B: {cost * 1e3:.1f} ms per payload", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--payloads", nargs="+", choices=PAYLOADS, default=list(PAYLOADS))
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run; the first is not counted")
    ap.add_argument("--no-flower", action="store_true", help="lmteam rows only")
    ap.add_argument("--no-deployment", action="store_true", help="Flower's simulation engine only")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fleet_scale.json")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        model = wide_vocab_model(Path(tmp)) if "sparse-49k" in args.payloads else None
        merge_cost = merge_cost_rows(args.payloads)
        rows = lmteam_rows(args.nodes, args.payloads, args.rounds, model)
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
