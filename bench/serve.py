"""Serving a SmallTalk mixture on the fleet vs today's single-process `generate`.

    python bench/serve.py                       # trains a 4-expert run first (about 2 min), then measures
    python bench/serve.py --run runs/<job>      # serve an existing 4-expert run

200 prompts (24-byte windows of the four built-in domains' held-out tail, 50 each), each
continued by 32 sampled tokens (temperature 0.8, top-k 40), through:

- single-process: today's `generate` code path with the routers and experts loaded once (not once
  a prompt, as `lmteam generate --local` does per call): route one prompt, run its expert, next;
- the fleet: an embedded fleet (private Redis, local `lmteam worker --serve` replicas) with 1 and
  with 2 replicas of each of the 4 experts; the submitter routes all 200, sends each to its
  expert's queue, and waits; replicas batch what queued up (LMTEAM_SERVE_BATCH, 16);
- the same with 2 replicas, one replica SIGKILLed once 50 answers are in, chosen among those
  holding a claimed request at that moment; heartbeats every 0.5 s, so it is seen lost in 1.5 s.

requests_per_s: prompts / wall time from the first routing to the last answer. Latencies: for the
fleet, from the submission (all 200 at once) to the answer reaching the submitter; for the
single process, each prompt's own route + generate (it never queues). lost: prompts without an
answer; duplicated: answers stored more than once (broker/serving.py's SET NX; an extra entry in
the submission's delivered list); redone: prompts generated twice (the failover's extra work).

Result in bench/results/serve.json (2026-12-03, shared 2-core machine, other jobs running):

    how                                     replicas  requests/s  p50 ms  p95 ms  lost  duplicated
    single-process generate (loaded once)       -         25.6       38      52     0       0
    fleet                                       1         64.1     1814    2929     0       0
    fleet                                       2         69.0     2022    2812     0       0
    fleet, expert0-r0 SIGKILLed at 98 answers   2         38.2     2571    5017     0       0

The gain is batching (15.4 prompts a forward on average): 8 replicas on 2 cores add little
parallelism. The killed replica held 16 claimed requests; they were resent once its heartbeats
stopped (1.5 s) and answered by expert0-r1; none was answered twice (redone 0: the killed one
had stored none of them).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker import serving  # noqa: E402
from broker.settings import FleetSettings  # noqa: E402
from pipeline.data import default_corpus  # noqa: E402
from pipeline.smalltalk.data import RunDir  # noqa: E402
from pipeline.smalltalk.serve import Sampling, run_from_dir  # noqa: E402
from pipeline.smalltalk.serve_driver import Mixture, serving_fleet  # noqa: E402

PROMPT_BYTES, MAX_NEW, N_PROMPTS = 24, 32, 200
SAMPLING = Sampling(max_new=MAX_NEW, temperature=0.8, top_k=40, seed=0)


def prompts_from_corpus(n: int = N_PROMPTS) -> list[str]:
    """n UTF-8 windows of PROMPT_BYTES bytes, an equal share from the tail of each built-in domain."""
    domains = default_corpus(max_bytes_per_domain=300_000)
    per = n // len(domains)
    out = []
    for d in domains:
        tail = d.tokens[-150_000:].tobytes()
        got = []
        for at in range(0, len(tail) - PROMPT_BYTES, 211):  # spread out, not consecutive windows
            try:  # whole characters only, so every prompt is exactly PROMPT_BYTES tokens
                got.append(tail[at:at + PROMPT_BYTES].decode())
            except UnicodeDecodeError:
                continue
            if len(got) == per:
                break
        out += got
    return out


def train_run(out: Path) -> Path:
    from pipeline.smalltalk.config import SmallTalkConfig
    from pipeline.smalltalk.driver import run_smalltalk

    cfg = SmallTalkConfig(experts=4, prefix=16, em_rounds=2, router_seqs=256, router_steps=30, expert_steps=150,
                          checkpoint_every=150, dense=False, block_size=64, n_layer=2, n_embd=64, n_head=4,
                          eval_seqs=32, domain_bytes=200_000)
    run_smalltalk(cfg, FleetSettings(), out, say=print, expert_workers=2)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def single_process(run: Path, prompts: list[str]) -> dict:
    """Today's `generate` path (pipeline/smalltalk/local.py), the models loaded once."""
    from pipeline.smalltalk.driver import load_models
    from pipeline.smalltalk.routing import prefix_losses

    served = run_from_dir(run)
    cfg, tok = served.cfg, served.tokenizer()
    routers, experts, _ = load_models(RunDir(run), cfg)
    lat, t0 = [], time.perf_counter()
    for i, p in enumerate(prompts):
        t = time.perf_counter()
        ids = tok.encode(p)
        m = min(cfg.prefix, len(ids))
        e = int(prefix_losses(routers, torch.from_numpy(ids[None, :m].astype(np.int64)), m)[0].argmin())
        gen = torch.Generator().manual_seed(SAMPLING.seed + i)
        experts[e].generate(torch.from_numpy(ids[None].astype(np.int64)), MAX_NEW, temperature=SAMPLING.temperature,
                            top_k=SAMPLING.top_k, generator=gen)
        lat.append(1000 * (time.perf_counter() - t))
    wall = time.perf_counter() - t0
    return {"mode": "single-process generate", "experts": cfg.experts, "replicas": 0, "prompts": len(prompts),
            "requests_per_s": len(prompts) / wall, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "lost": 0,
            "duplicated": 0, "wall_s": wall}


def fleet_row(run: Path, prompts: list[str], replicas: int, kill: bool, workdir: Path) -> dict:
    served = run_from_dir(run)
    experts = list(range(served.cfg.experts))
    settings = FleetSettings(heartbeat_s=0.5)
    workdir.mkdir(parents=True, exist_ok=True)
    with serving_fleet(run, experts, replicas, settings, workdir=workdir) as fleet:
        mix = Mixture(served).connect(fleet.settings)
        mix.wait(mix.submit(prompts[::10], SAMPLING), timeout=300)  # warm-up: every replica loaded and running
        killed: dict = {}
        t0 = time.perf_counter()
        sub = mix.submit(prompts, SAMPLING)
        if kill:
            threading.Thread(target=_kill_one, args=(fleet, mix, sub, killed), daemon=True).start()
        answers = mix.wait(sub, timeout=600, strict=False)
        wall = time.perf_counter() - t0
        delivered = serving.delivered(mix.client, sub.id)
        redone = sum(n > 1 for n in serving.generations(mix.client, sub.rids).values())
        mix.close()
    got = [a for a in answers if a is not None]
    lat = [a["total_ms"] for a in got]
    row = {"mode": "fleet" + (", 1 replica SIGKILLed mid-run" if kill else ""), "experts": len(experts),
           "replicas": replicas, "prompts": len(prompts), "requests_per_s": len(prompts) / wall,
           "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "lost": len(prompts) - len(got),
           "duplicated": len(delivered) - len(set(delivered)), "wall_s": wall,
           "mean_batch": float(np.mean([a["batch"] for a in got])), "errors": sum(bool(a.get("error")) for a in got),
           "resent": sum(a["resent"] for a in got), "redone": int(redone),
           "route_ms": got[0]["route_ms"] if got else None,
           "answers_per_expert": [sum(a["expert"] == e for a in got) for e in experts]}
    if kill:
        row.update(killed=killed.get("name"), killed_at_answers=killed.get("at"))
    return row


def _kill_one(fleet, mix: Mixture, sub, out: dict) -> None:
    """Once 50 answers are in, SIGKILL a replica that holds a claimed, unanswered request right now."""
    while True:
        answered = len(serving.delivered(mix.client, sub.id))
        if answered >= 50:
            open_ = [r for r in sub.rids if r not in serving.answers(mix.client, [r])]
            holders = sorted(set(serving.claims(mix.client, open_).values()))
            if holders:
                out["name"], out["at"] = holders[0].split("@")[0], answered
                fleet.kill_worker(out["name"])
                return
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="a finished 4-expert SmallTalk run dir")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-serve", help="scratch folder")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = args.run or args.work / "run"
    if args.run is None and not (run / "experts" / "3.safetensors").exists():
        train_run(run)
    prompts = prompts_from_corpus()
    assert len(prompts) == N_PROMPTS, len(prompts)
    rows = [single_process(run, prompts)]
    print(json.dumps(rows[-1]), flush=True)
    for replicas, kill in ((1, False), (2, False), (2, True)):
        rows.append(fleet_row(run, prompts, replicas, kill, args.work / f"fleet-{replicas}-{int(kill)}"))
        print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "setup": {
        "prompt_bytes": PROMPT_BYTES, "max_new": MAX_NEW, "temperature": SAMPLING.temperature,
        "top_k": SAMPLING.top_k, "serve_batch": FleetSettings().serve_batch, "run": str(run),
        "experts_config": run_from_dir(run).cfg.to_dict(), "torch_threads": 1,
        "machine": "shared 2-core VM (other jobs running)", "date": time.strftime("%Y-%m-%d")}}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
