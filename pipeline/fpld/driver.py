"""Run an FPLD job: prepare public data, dispatch rounds to the node queues, collect the report.

The same code drives an embedded fleet (private Redis and local workers, started here) and a real
one (`--broker redis://...`): only where the workers come from differs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from celery import Celery

from broker import keys
from broker.app import client_app
from broker.auth import check_fleet_secret, connect_checked
from broker.embedded import EmbeddedFleet, WorkerSpec
from broker.forked import PRELOAD
from broker.jobs import JobFailed, JobRecord, new_job_id
from broker.registry import live_queues
from broker.round_gate import follow_round, open_round
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.data import (
    Domain,
    assign_shards,
    default_corpus,
    load_corpus,
    split_domain,
    windows,
    windows_to_bytes,
)
from pipeline.files import write_atomic
from pipeline.fpld.config import FPLDConfig, auto_merge_groups
from pipeline.fpld.steps import initial_student
from pipeline.models.lm import load_state_bytes, state_bytes, tokenizer_for, vocab_size
from pipeline.models.spec import ModelError, local_source, make_spec
from pipeline.models.train import perplexity
from pipeline.report.progress import NullProgress
from pipeline.report.team_metrics import NodeSpan, RoundTiming, team_metrics


@dataclass
class PublicData:
    """What the submitter knows: the public probe set, the held-out mixture, and (embedded) shards."""

    probe: torch.Tensor  # (probe_seqs, block_size + 1)
    eval: torch.Tensor  # (eval_seqs, block_size + 1)
    shards: list[np.ndarray]  # private training text per node (embedded fleet only)
    domains: list[str]


def load_domains(cfg: FPLDConfig) -> list[Domain]:
    return load_corpus(cfg.corpus) if cfg.corpus else default_corpus()


def _spread(parts: list[np.ndarray], block: int, n: int) -> torch.Tensor:
    """n windows taken evenly from every domain's part: an equal-weight mixture."""
    per = [windows(p, block) for p in parts]
    picks, i = [], 0
    while len(picks) < n:
        w = per[i % len(per)]
        k = i // len(per)
        if k < len(w):
            picks.append(w[k])
        elif all(i // len(per) >= len(x) for x in per):
            break
        i += 1
    return torch.stack(picks)


def prepare_data(cfg: FPLDConfig, domains: list[Domain]) -> PublicData:
    """Split each domain into private train / public probe / held-out eval; nothing overlaps.

    The split is on the text (bytes); the public parts are then tokenized with the job's model's
    tokenizer. Shards stay text: each node tokenizes its own."""
    tok = tokenizer_for(cfg.model_spec())
    splits = [split_domain(d.tokens) for d in domains]
    probe = _spread([tok.encode_bytes(s[1]) for s in splits], cfg.block_size, cfg.probe_seqs)
    evals = _spread([tok.encode_bytes(s[2]) for s in splits], cfg.block_size, cfg.eval_seqs)
    shards = assign_shards([s[0] for s in splits], cfg.nodes)
    return PublicData(probe, evals, shards, [d.name for d in domains])


@contextmanager
def local_fleet(cfg: FPLDConfig, data: PublicData, settings: FleetSettings, workdir: Path | None = None,
                appendonly: bool = False, tls: bool = False):
    """An embedded fleet whose node workers hold this job's private shards."""
    with tempfile.TemporaryDirectory(prefix="lmteam-shards-") as tmp:
        specs = []
        for i, shard in enumerate(data.shards):
            path = Path(tmp) / f"node{i}.txt"
            path.write_bytes(shard.tobytes())
            specs.append(WorkerSpec("node", i, (str(path),)))
        specs.append(WorkerSpec("aggregator"))
        if cfg.merge_group_count > 1 or auto_merge_groups(cfg.nodes, aggregators=2) > 1:  # two group merges at a time
            specs.append(WorkerSpec("aggregator", worker_name="aggregator1"))
        preload = PRELOAD + (("workers.preload_hf",) if cfg.model else ())  # modules the fork server shares
        with EmbeddedFleet(specs, settings, workdir=workdir, appendonly=appendonly, tls=tls, preload=preload) as fleet:
            yield fleet


def run_fpld(cfg: FPLDConfig, settings: FleetSettings, *, out_dir: Path | None = None,
             progress: NullProgress | None = None, job_id: str | None = None) -> dict:
    """Run a whole job on the configured fleet (or an embedded one) and return its report."""
    cfg = resolve_model(cfg).validate()
    settings.validate()
    data = prepare_data(cfg, load_domains(cfg))  # bad input fails here, before anything starts
    progress = progress or NullProgress()
    if settings.broker_url is None:
        progress.message(f"starting an embedded fleet: private redis-server, {cfg.nodes} node workers, 1 aggregator")
        with local_fleet(cfg, data, settings) as fleet:
            fleet.wait_ready(Store.from_url(fleet.settings.backend_url).r)
            return drive(cfg, fleet.settings, data, out_dir=out_dir, progress=progress, job_id=job_id)
    return drive(cfg, settings, data, out_dir=out_dir, progress=progress, job_id=job_id)


def resolve_model(cfg: FPLDConfig) -> FPLDConfig:
    """The model as the job record keeps it: an alias resolved to its folder, and the weights'
    hash, so every worker proves it loads the same model and any run can be reproduced."""
    if not cfg.model:
        return cfg
    spec = make_spec(cfg.model, block_size=cfg.block_size, lora_rank=cfg.lora_rank, seed=cfg.seed)
    if cfg.model_sha and spec.sha and cfg.model_sha != spec.sha:
        raise ModelError(f"model {spec.source} has weights sha256 {spec.sha[:12]}…, the job asks for "
                         f"{cfg.model_sha[:12]}…")
    return replace(cfg, model=spec.source, model_sha=spec.sha)


def drive(cfg: FPLDConfig, settings: FleetSettings, data: PublicData, *, out_dir: Path | None = None,
          progress: NullProgress | None = None, job_id: str | None = None) -> dict:
    """Submit the job to a running fleet and follow it round by round."""
    cfg = resolve_model(cfg)
    progress = progress or NullProgress()
    app = client_app(settings)
    st = Store(connect_checked(settings.backend_url), ttl=settings.blob_ttl)
    check_fleet_secret(st.r, settings.secret)
    _warn_missing_workers(st, cfg, progress)
    if not cfg.merge_groups:  # auto, against the fleet as it is now; the record keeps the number
        aggregators = sum(w["queue"] == keys.AGGREGATOR_QUEUE for w in live_queues(st.r).values())
        cfg = replace(cfg, merge_groups=auto_merge_groups(cfg.nodes, aggregators))
    job_id = job_id or new_job_id("fpld")
    job = JobRecord.create(st.r, job_id, "fpld", cfg.to_dict(), settings.public_dict(), ttl=settings.blob_ttl)
    st.put_blob(job_id, "probe", windows_to_bytes(data.probe))
    st.put_blob(job_id, "eval", windows_to_bytes(data.eval))
    st.put_blob(job_id, "student/0", state_bytes(initial_student(cfg)))
    what = "FedAvg (weights)" if cfg.method == "fedavg" else f"{cfg.payload} {cfg.bits}-bit logits"
    rounds, timings = [], []
    with job.running(settings.job_keep_s, settings.blob_keep_s):
        progress.message(f"job {job_id}: {cfg.nodes} nodes x {cfg.rounds} rounds, {what}, model "
                         f"{cfg.model or 'built-in byte GPT'}")
        t_job = time.time()
        try:
            with progress:
                for rnd in range(cfg.rounds):
                    result, timing = _run_round(app, cfg, st, job, rnd, progress, settings.merge_grace_s)
                    rounds.append(result)
                    timings.append(timing)
                    if result["status"] != "ok":
                        raise JobFailed(result["error"])
        finally:
            app.close()
        report = build_report(cfg, settings, job_id, data, rounds, timings, st, time.time() - t_job)
        job.set(report=report)
        if out_dir is not None:
            write_student(cfg, st.get_blob(job_id, f"student/{cfg.rounds}"), out_dir)
            write_atomic(out_dir / "report.json", json.dumps(report, indent=2))
    return report


def write_student(cfg: FPLDConfig, state: bytes, out_dir: Path) -> None:
    """The final student: an HF folder (LoRA merged) that AutoModelForCausalLM loads, for an HF
    model; the built-in model's safetensors checkpoint otherwise."""
    if cfg.model_spec().is_builtin:
        write_atomic(out_dir / "student.safetensors", state)
        return
    final = out_dir / "student"
    tmp = out_dir / ".student.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    load_state_bytes(cfg.model_spec(), state).save_folder(tmp, Path(local_source(cfg.model_spec())))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def _run_round(app: Celery, cfg: FPLDConfig, st: Store, job: JobRecord, rnd: int, progress: NullProgress,
               grace_s: float):
    nodes = cfg.node_ids
    dispatched = time.time()
    deadline = st.now() + cfg.round_timeout
    job.set(round=rnd)
    job.event("round_start", round=rnd, deadline=deadline)
    progress.round_started(rnd, cfg.rounds, nodes, cfg.local_steps, cfg.distill_steps)
    # The node that completes the round sends the merge; at the deadline we do, if none has
    # (broker/round_gate.py). No worker waits meanwhile.
    open_round(st, job.id, rnd, nodes, keys.FPLD_AGGREGATE_TASK, [job.id, rnd, deadline],
               groups=cfg.merge_group_count, group_task=keys.FPLD_GROUP_MERGE_TASK, grace_s=grace_s)
    for node in nodes:
        app.send_task(keys.FPLD_NODE_TASK, args=[job.id, rnd, node], shadow=f"fpld node {node} r{rnd} {job.id}")
    # The aggregator decides the round; we only watch. Allow it time to distill after the deadline.
    result = follow_round(st, app, job.id, rnd, deadline, cfg.round_timeout + grace_s + 600 + 20 * cfg.distill_steps,
                          on_poll=(lambda: progress.update(st.round_nodes(job.id, rnd, nodes + ["aggregator"])))
                          if progress.shows_nodes else None,
                          shadow=f"fpld aggregate r{rnd} {job.id}")
    if result is None:
        raise JobFailed(f"round {rnd}: no result from the aggregator (is an aggregator worker running?)")
    if "nodes" not in result:  # the aggregator failed before it classified the nodes
        raise JobFailed(str(result.get("error") or f"round {rnd}: the aggregator ended it {result.get('status')}"))
    states = st.round_nodes(job.id, rnd, nodes)
    progress.update(st.round_nodes(job.id, rnd, nodes + ["aggregator"]))
    spans = [NodeSpan(n, float(s["started_at"]), float(s["finished_at"]), int(s.get("payload_bytes", 0)),
                      float(s.get("cpu_s", 0.0)))
             for n, s in states.items() if result["nodes"][n]["status"] == "merged"]
    ended = float(result.get("finished_at", time.time()))
    timing = RoundTiming(dispatched, spans, ended - float(result["sealed_at"]), ended)
    result = {**result, "dispatched_at": dispatched, "round_s": ended - dispatched, "node_metrics": states}
    if result["status"] == "ok":
        late = [n for n, v in result["nodes"].items() if v["status"] != "merged"]
        progress.message(f"round {rnd + 1}/{cfg.rounds}: merged {result['merged']}/{cfg.nodes}"
                         + (f" (dropped {', '.join(late)})" if late else "")
                         + f", student ppl {result['student_ppl']:.2f}, {ended - dispatched:.1f}s")
    return result, timing


def _warn_missing_workers(st: Store, cfg: FPLDConfig, progress: NullProgress) -> None:
    queues = {w["queue"] for w in live_queues(st.r).values()}
    missing = [keys.node_queue(n) for n in cfg.node_ids if keys.node_queue(n) not in queues]
    if keys.AGGREGATOR_QUEUE not in queues:
        missing.append(keys.AGGREGATOR_QUEUE)
    if missing:
        progress.message(f"warning: no registered worker consumes {', '.join(missing)}; "
                         "tasks wait in those queues until one starts")


def build_report(cfg: FPLDConfig, settings: FleetSettings, job_id: str, data: PublicData, rounds: list[dict],
                 timings: list[RoundTiming], st: Store, wall_s: float) -> dict:
    last = rounds[-1]
    local_ppl = {n: s.get("local_ppl") for n, s in last["node_metrics"].items() if s.get("local_ppl") is not None}
    sent = {n: sum(int(r["node_metrics"][n].get("payload_bytes", 0) or 0) for r in rounds
                   if r["nodes"][n]["status"] == "merged") for n in cfg.node_ids}
    side = {n: sum(int(r["node_metrics"][n].get("teacher_kl_bytes", 0) or 0) for r in rounds) for n in cfg.node_ids}
    f32 = cfg.probe_seqs * cfg.block_size * vocab_size(cfg.model_spec()) * 4
    base = load_state_bytes(cfg.model_spec(), st.get_blob(job_id, "student/0"))
    return {
        "job": job_id,
        "kind": "fpld",
        "config": cfg.to_dict(),
        "settings": settings.public_dict(),
        "domains": data.domains,
        "summary": {
            "student_ppl": last["student_ppl"],
            "initial_ppl": perplexity(base, data.eval),
            "local_ppl": local_ppl,
            "local_ppl_mean": float(np.mean(list(local_ppl.values()))) if local_ppl else None,
            "teacher_kl": last.get("teacher_kl"),
            "bytes_per_node": sent,
            # --measure-teacher-kl: float32 logits sent beside the payload, only to measure KL
            "teacher_kl_bytes_per_node": side if any(side.values()) else None,
            "float32_bytes_per_round": f32,
            "round_s": [r["round_s"] for r in rounds],
            "wall_s": wall_s,
            "dropped": {str(r["round"]): [n for n, v in r["nodes"].items() if v["status"] == "late"] for r in rounds},
            "retried": {str(r["round"]): [n for n, v in r["nodes"].items() if v["retries"]] for r in rounds},
            "rejected": {str(r["round"]): [n for n, v in r["nodes"].items() if v["status"] == "rejected"]
                         for r in rounds},
        },
        "rounds": rounds,
        "team": team_metrics(timings, workers=cfg.nodes),
    }
