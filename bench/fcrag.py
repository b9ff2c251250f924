"""FC-RAG bench: coverage and set size of next-byte prediction sets per alpha and per node budget,
and the latency of a query against a warm fleet of 4 nodes.

K=4 nodes on an embedded fleet, one domain each (the files of --corpus or --corpus-dir; by default
the built-in corpus; the committed result used --corpus-dir ../shared/data/corpora). The student
is distilled by a short FPLD job on the same fleet (or
--student PATH). Each node indexes the private training part of its domain; calibration and test
queries come from the held-out tails of all domains, which no node indexes and FPLD never trains
on. For every budget B_i = k' x b bits (b bits per score) a fresh job calibrates on --n-cal queries
and tests on --n-test; every alpha is read off the same runs. The nodes cache raw scores of a
repeated query batch, so only quantization (the part the budget changes) is redone per budget.

    python bench/fcrag.py [--corpus FILE ... | --corpus-dir DIR] [--bits 1 2 3 4 8 16]
                          [--alphas 0.05 0.1 0.2] [--student PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from inputs import add_corpus_args, corpus_files  # noqa: E402  (bench/inputs.py)

from broker.embedded import EmbeddedFleet, WorkerSpec  # noqa: E402
from broker.settings import FleetSettings  # noqa: E402
from broker.store import Store  # noqa: E402
from pipeline.data import default_corpus, load_corpus  # noqa: E402
from pipeline.rag import conformal  # noqa: E402
from pipeline.rag import run as rag_run  # noqa: E402
from pipeline.rag.config import RAGConfig  # noqa: E402
from pipeline.rag.driver import (  # noqa: E402
    Client,
    RunDir,
    cal_test_split,
    heldout_queries,
    jsonable,
    load_student,
    node_shards,
)
from pipeline.rag.steps import Calibration, context_bytes  # noqa: E402


def train_student(args, files: list[str], settings: FleetSettings, out: Path) -> Path:
    """A short FPLD job on this same fleet: the distilled student every node then scores with."""
    from pipeline.fpld.config import FPLDConfig
    from pipeline.fpld.driver import drive, prepare_data

    cfg = FPLDConfig(nodes=4, rounds=args.fpld_rounds, local_steps=args.local_steps, distill_steps=args.distill_steps,
                     corpus=files, block_size=args.block_size, probe_seqs=64, eval_seqs=32,
                     measure_teacher_kl=False).validate()
    data = prepare_data(cfg, load_corpus(files) if files else default_corpus())
    rep = drive(cfg, settings, data, out_dir=out)
    print(f"FPLD student: {cfg.rounds} rounds, ppl {rep['summary']['student_ppl']:.2f} "
          f"(initial {rep['summary']['initial_ppl']:.2f}), {rep['summary']['wall_s']:.0f} s", flush=True)
    return out / "student.safetensors"


def resampled_coverage(cal: np.ndarray, test: np.ndarray, alpha: float, splits: int = 500) -> dict:
    """Coverage averaged over random re-splits of the pooled calibration and test label scores.

    One split's coverage scatters around 1 - alpha by about sqrt(alpha(1-alpha)(1/n_cal + 1/n_test));
    the mean over re-splits shows where the procedure itself sits (split conformal: k/(n_cal+1)).
    """
    pooled, rng, covs = np.concatenate([cal, test]), np.random.default_rng(0), []
    for _ in range(splits):
        perm = rng.permutation(len(pooled))
        qhat = conformal.conformal_quantile(pooled[perm[: len(cal)]], alpha)
        covs.append(float(np.mean(pooled[perm[len(cal):]] <= qhat)))
    return {"mean": float(np.mean(covs)), "sd": float(np.std(covs)), "splits": splits,
            "expected": conformal.quantile_rank(len(cal), alpha) / (len(cal) + 1)}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def latency(client: Client, cfg: RAGConfig, student, calib_round: int, texts: list[bytes], args, settings,
            tmp: Path) -> dict:
    """Median and p95 of one query through the warm fleet: in-process, and as `lmteam rag query` processes."""
    for t in texts[:3]:  # warm every node's model and index caches
        client.run_round("predict", [t], calibration=calib_round)
    inproc = []
    for t in texts[: args.latency_queries]:
        t0 = time.perf_counter()
        rag_run.checked(client.run_round("predict", [t], calibration=calib_round))
        inproc.append(time.perf_counter() - t0)
    run = RunDir(tmp / "cli-run")
    run.save({"job": client.job, "config": cfg.to_dict(),
              "student": {"path": str(student.path), "sha256": student.sha, "block_size": student.block_size},
              "calibration": {"round": calib_round}})
    run.calibration_file.write_bytes(client.calibration_bytes(calib_round))
    wall, reported = [], []
    for t in texts[: args.cli_queries]:
        argv = [sys.executable, "-m", "pipeline.rag.cli", "query", "--run", str(run.path), "--broker",
                settings.broker_url, "--secret", settings.secret, "-q", "--", t.decode("utf-8", "replace")]
        t0 = time.perf_counter()
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
        wall.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise RuntimeError(f"rag query failed: {res.stderr[-500:]}")
        reported.append(float(res.stdout.rsplit("latency", 1)[1].split("ms")[0]) / 1000.0)
    return {
        "queries_in_process": len(inproc), "queries_cli": len(wall),
        "in_process_ms": {"median": pct(inproc, 50), "p95": pct(inproc, 95)},
        "cli_query_path_ms": {"median": pct(reported, 50), "p95": pct(reported, 95)},
        "cli_process_wall_ms": {"median": pct(wall, 50), "p95": pct(wall, 95)},
        "note": "in_process: submit to result through the warm fleet (what a server pays per query); "
                "cli_query_path: the same, measured inside `lmteam rag query`; cli_process_wall: the whole "
                "`python -m pipeline.rag.cli query` process, interpreter start and imports included",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(ap)
    ap.add_argument("--student", type=Path, default=None)
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16], help="bits per score b; B_i = k' b")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--candidates", type=int, default=32)
    ap.add_argument("--n-cal", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--embedder", default="tfidf")
    ap.add_argument("--fpld-rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=120)
    ap.add_argument("--distill-steps", type=int, default=120)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--latency-queries", type=int, default=100)
    ap.add_argument("--cli-queries", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fcrag.json")
    args = ap.parse_args()
    t_start = time.time()

    files = corpus_files(args)
    domains = load_corpus(files) if files else default_corpus()
    tmp = Path(tempfile.mkdtemp(prefix="lmteam-fcrag-"))
    specs = []
    for i, shard in enumerate(node_shards(domains, 4)):
        (tmp / f"node{i}.txt").write_bytes(shard.tobytes())
        specs.append(WorkerSpec("node", i, (str(tmp / f"node{i}.txt"),), state_dir=str(tmp / "state" / f"node{i}")))
    specs.append(WorkerSpec("aggregator"))
    rows, extra = [], {}
    (tmp / "fleet").mkdir()
    with EmbeddedFleet(specs, FleetSettings(), workdir=tmp / "fleet") as fleet:
        fleet.wait_ready(Store.from_url(fleet.settings.backend_url).r)
        settings = fleet.settings
        student = load_student(args.student or train_student(args, files, settings, tmp / "fpld"))
        base = RAGConfig(nodes=4, candidates=args.candidates, budget=args.candidates * 4, corpus=files,
                         n_cal=args.n_cal, n_test=args.n_test, embedder=args.embedder, alpha=0.1,
                         calibration_timeout=600, query_timeout=120).validate()
        latency_client = None
        for b in [*args.bits, "noretrieval"]:
            over = {"budget": args.candidates * 4, "passages": 0} if b == "noretrieval" else {"budget": args.candidates * b}
            cfg = RAGConfig(**{**base.to_dict(), **over}).validate()
            client = Client(settings, cfg, f"rag-bench-{b}-{int(time.time())}")
            t0 = time.time()
            rep = rag_run.evaluate(cfg, settings, RunDir(tmp / "unused"), args.alphas, client=client,
                                   student=student, domains=domains)
            s = rep["summary"]
            print(f"budget {b if b == 'noretrieval' else cfg.budget} bits/query: acc@1 {s['acc1']:.3f}, "
                  f"{time.time() - t0:.0f} s, merged {s['merged_per_query']}", flush=True)
            if b == "noretrieval":
                extra["no_retrieval"] = {"budget": cfg.budget, "acc1": s["acc1"],
                                         "alphas": {a: {k: r[k] for k in ("coverage", "mean_set_size", "slack")}
                                                    for a, r in s["alphas"].items()}}
                client.close()
                continue
            calib = Calibration.from_bytes(client.calibration_bytes(rep["calibration"]["round"]))
            cal_scores = calib.scores_for(calib.node_mask)
            for r in s["alphas"].values():
                rows.append({"alpha": r["alpha"], "budget": cfg.budget, "bits_per_score": b,
                             "coverage": r["coverage"], "mean_set_size": r["mean_set_size"], "slack": r["slack"],
                             "queries": r["queries"], "bound": r["bound"], "holds": r["coverage"] >= r["bound"],
                             "slack_parts": r["slack_parts"], "qhat": r["qhat"][0],
                             "conformal_interval_99": r["conformal_interval_99"],
                             "median_set_size": r["median_set_size"], "acc1": s["acc1"],
                             "n_cal": rep["calibration"]["n_cal"], "merged_per_query": s["merged_per_query"],
                             "coverage_resampled": resampled_coverage(cal_scores, np.asarray(s["test_label_scores"]),
                                                                      r["alpha"])})
            if b == 4:
                latency_client, calib_round, lat_cfg = client, rep["calibration"]["round"], cfg
            else:
                client.close()
        queries = heldout_queries(domains, context_bytes(base, student.block_size), base.seed)
        _, test = cal_test_split(queries, args.n_cal, args.n_test)
        lat = latency(latency_client, lat_cfg, student, calib_round, test.contexts[::7], args, settings, tmp)
        latency_client.close()

    result = {
        "bench": "fcrag", "nodes": 4, "domains": [d.name for d in domains], "candidates": args.candidates,
        "task": "next-byte prediction sets on held-out text (vocab 256); query = the preceding "
                f"{context_bytes(base, student.block_size)} bytes",
        "student": {"path": str(student.path), "block_size": student.block_size,
                    "trained": "given" if args.student else f"FPLD {args.fpld_rounds} rounds x {args.local_steps} "
                                                              f"local / {args.distill_steps} distill steps"},
        "embedder": args.embedder, "rows": rows, **extra,
        "latency": {"budget": lat_cfg.budget, **lat}, "wall_s": time.time() - t_start,
    }
    shutil.rmtree(tmp, ignore_errors=True)  # node indexes and the student: hundreds of MB, bench-only
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(result), indent=2))
    print(f"\n{'alpha':>5} {'B bits':>6} {'b':>3} {'coverage':>8} {'1-a-slack':>9} {'set size':>8} {'slack':>7} "
          f"{'(1/(n+1), RAG, FL)':>24} {'queries':>7} {'resampled':>9}")
    for r in rows:
        p = r["slack_parts"]
        print(f"{r['alpha']:>5} {r['budget']:>6} {r['bits_per_score']:>3} {r['coverage']:>8.4f} {r['bound']:>9.4f} "
              f"{r['mean_set_size']:>8.2f} {r['slack']:>7.4f} ({p['conformal']:.4f}, {p['rag']:.4f}, {p['fl']:.4f}) "
              f"{r['queries']:>7} {r['coverage_resampled']['mean']:>9.4f}")
    nr = extra["no_retrieval"]
    print("no retrieval (k=0), B=" + str(nr["budget"]) + ": acc@1 " + f"{nr['acc1']:.3f}, " + ", ".join(
        f"alpha {a}: coverage {v['coverage']:.4f} size {v['mean_set_size']:.2f}" for a, v in nr["alphas"].items()))
    print(f"latency (ms, median / p95): in-process {lat['in_process_ms']['median']:.1f} / {lat['in_process_ms']['p95']:.1f}"
          f"; CLI query path {lat['cli_query_path_ms']['median']:.1f} / {lat['cli_query_path_ms']['p95']:.1f}"
          f"; CLI process {lat['cli_process_wall_ms']['median']:.0f} / {lat['cli_process_wall_ms']['p95']:.0f}")
    print(f"wrote {args.out} in {result['wall_s']:.0f} s; coverage >= 1-alpha-slack in "
          f"{sum(r['holds'] for r in rows)}/{len(rows)} rows")


if __name__ == "__main__":
    main()
