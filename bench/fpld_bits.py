"""FPLD bandwidth sweep: what B bits per logit cost in teacher KL and student perplexity.

K=4 non-IID nodes (one domain each: --corpus files or every *.txt of --corpus-dir; by default the
built-in corpus; the committed result used --corpus-dir ../shared/data/corpora),
the same job run through a real embedded fleet at B in {1, 2, 4, 8, 16} and unquantized (32),
next to two references trained in this process on the same data and evaluated on the same
held-out mixture:
  - local-only: each node trains alone from scratch for T x local_steps steps (no federation);
  - central: one model trained on the pooled private data for K x T x local_steps steps
    (the upper reference: all data in one place, the same total training compute).

    python bench/fpld_bits.py [--corpus FILE ... | --corpus-dir DIR] [--bits 1 2 4 8 16 32] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from inputs import add_corpus_args, corpus_files  # noqa: E402  (bench/inputs.py)

from broker.settings import FleetSettings  # noqa: E402
from broker.store import Store  # noqa: E402
from pipeline.fpld.config import FPLDConfig  # noqa: E402
from pipeline.fpld.driver import drive, load_domains, local_fleet, prepare_data  # noqa: E402
from pipeline.fpld.steps import initial_student  # noqa: E402
from pipeline.models.train import perplexity, train_lm  # noqa: E402
from pipeline.report.progress import RichProgress  # noqa: E402


def references(cfg: FPLDConfig, data) -> dict:
    """Local-only models and the central model, trained here with the fleet's hyperparameters."""
    torch.set_num_threads(2)
    steps = cfg.rounds * cfg.local_steps
    local = {}
    for i, shard in enumerate(data.shards):
        model = initial_student(cfg)
        train_lm(model, shard, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=100 + i)
        local[str(i)] = perplexity(model, data.eval)
    central = initial_student(cfg)
    t0 = time.perf_counter()
    train_lm(central, np.concatenate(data.shards), steps=cfg.nodes * steps, batch_size=cfg.batch_size,
             lr=cfg.lr, seed=7)
    return {"local_only_ppl": local, "central_ppl": perplexity(central, data.eval),
            "central_steps": cfg.nodes * steps, "central_train_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_args(ap)
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=150)
    ap.add_argument("--distill-steps", type=int, default=150)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fpld_bits.json")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    args = ap.parse_args()

    files = corpus_files(args)
    base = FPLDConfig(nodes=4, rounds=args.rounds, corpus=files, local_steps=args.local_steps,
                      distill_steps=args.distill_steps, measure_teacher_kl=True).validate()
    data = prepare_data(base, load_domains(base))
    rows = []
    with local_fleet(base, data, FleetSettings()) as fleet:
        fleet.wait_ready(Store.from_url(fleet.settings.backend_url).r)
        for bits in args.bits:
            cfg = FPLDConfig(**{**base.to_dict(), "bits": bits}).validate()
            rep = drive(cfg, fleet.settings, data, progress=RichProgress())
            s = rep["summary"]
            rows.append({"bits": bits, "student_ppl": s["student_ppl"], "teacher_kl": s["teacher_kl"],
                         "local_ppl_mean": s["local_ppl_mean"], "local_ppl": s["local_ppl"],
                         "bytes_per_node_per_round": int(np.mean(list(s["bytes_per_node"].values()))) // cfg.rounds,
                         "wall_s": s["wall_s"], "job": rep["job"]})
    ref = references(base, data)
    result = {"bench": "fpld_bits", "nodes": base.nodes, "rounds": base.rounds, "domains": data.domains,
              "config": base.to_dict(), "rows": rows, **ref,
              "initial_ppl": perplexity(initial_student(base), data.eval)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"\nFPLD K={base.nodes} T={base.rounds}, domains: {', '.join(data.domains)}")
    print(f"{'bits':>5} {'KL(fp||B-bit)':>14} {'student ppl':>12} {'local ppl (mean)':>17} {'bytes/node/round':>17}")
    for r in rows:
        kl = f"{r['teacher_kl']:.5f}" if r["teacher_kl"] is not None else "-"
        print(f"{r['bits']:>5} {kl:>14} {r['student_ppl']:>12.2f} {r['local_ppl_mean']:>17.2f} "
              f"{r['bytes_per_node_per_round']:>17,}")
    lo = ref["local_only_ppl"]
    print(f"local-only models (no federation): {', '.join(f'node {k} {v:.2f}' for k, v in lo.items())}; "
          f"mean {np.mean(list(lo.values())):.2f}")
    print(f"central model on pooled data ({ref['central_steps']} steps): {ref['central_ppl']:.2f}")
    print(f"initial model: {result['initial_ppl']:.2f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
