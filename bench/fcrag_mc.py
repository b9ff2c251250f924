"""FC-RAG bench on multiple choice: coverage, set size and acc@1 per alpha and per-node budget,
with and without retrieval, for a real scorer LM (arXiv 2605.09986, E4's protocol on our corpora).

K=4 nodes on an embedded fleet, one domain each (--corpus-dir, by default ../shared/data/corpora:
Grimm, Shakespeare, two WikiText parts). The questions are cloze questions built from each node's
private shard (pipeline/rag/questions.py): a sentence with a name, number or rare word removed,
the word and three distractors of the same kind from the same text; each question's sentence and
its neighbours are in no index. Every node scores every option with the scorer (mean token NLL
given its own top-k passages and the question); the hub averages, calibrates on --n-cal
questions and tests on --n-test. For each budget B_i = 4 x b bits a fresh job runs; the nodes
cache raw scores of a repeated question batch, so the LM runs once with retrieval and once
without (k=0), and only quantization is redone per budget.

    python bench/fcrag_mc.py [--model smollm2|DIR] [--embedder tfidf|minilm] [--n-cal 100 --n-test 100]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
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
from pipeline.rag import run as rag_run  # noqa: E402
from pipeline.rag.config import RAGConfig  # noqa: E402
from pipeline.rag.driver import Client, RunDir, jsonable, node_shards, resolve_model  # noqa: E402

DEFAULT_CORPORA = ROOT.parent / "shared" / "data" / "corpora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(ap)
    ap.add_argument("--model", default="smollm2", help="scorer: alias, HF folder, hub id or FPLD run dir")
    ap.add_argument("--embedder", default="tfidf")
    ap.add_argument("--embed-dim", type=int, default=8192, help="TF-IDF hashing dimension (fewer collisions than "
                                                                 "the CLI's 2048 for whole-sentence queries)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32, 128], help="B_i bits per query")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--n-cal", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--passages", type=int, default=2)
    ap.add_argument("--passage-bytes", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--s-max", type=float, default=20.0, help="scores are clipped to [0, S_max] before quantizing")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fcrag_mc.json")
    args = ap.parse_args()
    t_start = time.time()

    files = corpus_files(args) or ([str(DEFAULT_CORPORA)] if DEFAULT_CORPORA.is_dir() else [])
    domains = load_corpus(files) if files else default_corpus()
    base = resolve_model(RAGConfig(
        nodes=4, model=args.model, block_size=args.block_size, corpus=files, n_cal=args.n_cal, n_test=args.n_test,
        query_batch=args.n_test, embedder=args.embedder, embed_dim=args.embed_dim, passages=args.passages, passage_bytes=args.passage_bytes,
        s_max=args.s_max, alpha=0.1, calibration_timeout=3600, query_timeout=3600).validate())
    print(f"scorer {base.model} ({base.model_sha[:12]}), {args.embedder}, k={args.passages}, "
          f"{args.n_cal}+{args.n_test} questions, domains {[d.name for d in domains]}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="lmteam-fcrag-mc-"))
    specs = []
    for i, shard in enumerate(node_shards(domains, 4)):
        (tmp / f"node{i}.txt").write_bytes(shard.tobytes())
        specs.append(WorkerSpec("node", i, (str(tmp / f"node{i}.txt"),), state_dir=str(tmp / "state" / f"node{i}")))
    specs.append(WorkerSpec("aggregator"))
    reports: dict[tuple[int, bool], dict] = {}
    (tmp / "fleet").mkdir()
    with EmbeddedFleet(specs, FleetSettings(), workdir=tmp / "fleet") as fleet:
        fleet.wait_ready(Store.from_url(fleet.settings.backend_url).r)
        for retrieval in (True, False):  # the LM runs in the first budget of each; the rest hit the nodes' cache
            for b in args.budgets:
                cfg = replace(base, budget=b, passages=args.passages if retrieval else 0).validate()
                t0 = time.time()
                with Client(fleet.settings, cfg, f"rag-mc-{b}-{int(retrieval)}-{int(time.time())}") as client:
                    rep = rag_run.evaluate(cfg, fleet.settings, RunDir(tmp / "unused"), args.alphas, client=client,
                                           domains=domains)
                reports[(b, retrieval)] = rep
                s = rep["summary"]
                print(f"B={b} bits/query, {'retrieval' if retrieval else 'no retrieval'}: acc@1 {s['acc1']:.3f}, "
                      + ", ".join(f"a={a}: cov {r['coverage']:.3f} size {r['mean_set_size']:.2f}"
                                  for a, r in s["alphas"].items()) + f" ({time.time() - t0:.0f} s)", flush=True)

    rows = []
    for a in args.alphas:
        for b in args.budgets:
            r, nr = reports[(b, True)], reports[(b, False)]
            ra, na = r["summary"]["alphas"][str(a)], nr["summary"]["alphas"][str(a)]
            rows.append({"alpha": a, "budget_bits": b, "bits_per_score": b // 4, "coverage": ra["coverage"],
                         "set_size": ra["mean_set_size"], "slack": ra["slack"], "acc1": r["summary"]["acc1"],
                         "acc1_no_retrieval": nr["summary"]["acc1"], "bound": ra["bound"],
                         "holds": ra["coverage"] >= ra["bound"], "slack_parts": ra["slack_parts"], "qhat": ra["qhat"][0],
                         "conformal_interval_99": ra["conformal_interval_99"], "median_set_size": ra["median_set_size"],
                         "no_retrieval": {"coverage": na["coverage"], "set_size": na["mean_set_size"]},
                         "merged_per_query": r["summary"]["merged_per_query"]})
    first = reports[(args.budgets[0], True)]
    lift = [row["acc1"] - row["acc1_no_retrieval"] for row in rows]
    at = [row for row in rows if row["alpha"] == 0.1 and row["budget_bits"] == 32]
    goals = {
        "coverage_ge_1_minus_alpha_minus_slack": f"{sum(r['holds'] for r in rows)}/{len(rows)} rows",
        "acc1_lift_ge_0.20": {"min_lift": min(lift), "max_lift": max(lift), "met": min(lift) >= 0.20},
        "set_size_at_alpha_0.1_32_bits_le_2.0": {"set_size": at[0]["set_size"] if at else None,
                                                 "met": bool(at) and at[0]["set_size"] <= 2.0},
    }
    index = first["index"]
    result = {
        "bench": "fcrag_mc", "scorer": {"model": base.model, "sha256": base.model_sha, "block_size": base.block_size,
                                        "s_max": base.s_max},
        "retriever": {"embedder": sorted({v.get("embedder") for v in index.values()}), "passages": args.passages,
                      "embed_dim": args.embed_dim if args.embedder == "tfidf" else None,
                      "passage_bytes": args.passage_bytes, "index": index},
        "questions": {"n_cal": args.n_cal, "n_test": args.n_test, "options": 4, "domains": [d.name for d in domains],
                      **first["test_questions"]},
        "rows": rows, "goals": goals, "wall_s": time.time() - t_start,
    }
    shutil.rmtree(tmp, ignore_errors=True)  # node indexes: tens of MB, bench-only
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(jsonable(result), indent=2))
    print(f"\n{'alpha':>5} {'B bits':>6} {'coverage':>8} {'1-a-slack':>9} {'set size':>8} {'slack':>7} {'acc@1':>6} "
          f"{'no RAG':>6}")
    for r in rows:
        print(f"{r['alpha']:>5} {r['budget_bits']:>6} {r['coverage']:>8.3f} {r['bound']:>9.3f} {r['set_size']:>8.2f} "
              f"{r['slack']:>7.3f} {r['acc1']:>6.3f} {r['acc1_no_retrieval']:>6.3f}")
    print(json.dumps(goals, indent=1))
    print(f"wrote {args.out} in {result['wall_s']:.0f} s; mean lift {np.mean(lift):.3f}")


if __name__ == "__main__":
    main()
