"""Run a SmallTalk LM job (arXiv 2410.03529) on the fleet: router EM, independent experts, report.

    stage 1, for r = 0..T-1:  routers on queue `experts`, one task each, on their assigned sequences
                              scoring tasks on queue `aggregator`, one per shard of the next set,
                              send (n x E) prefix losses as signed codec payloads
                              submitter: balanced assignment (pure function) -> next round's sets
                              (the last round scores the whole pool: those are the experts' clusters)
    stage 2:                  one task per expert (and one for the dense baseline) on queue
                              `experts`, no communication, checkpoints in the store every N steps
    report:                   held-out perplexity of routed mixture vs dense, purity, FLOPs

The same code drives an embedded fleet (started here) and a real one (--broker). The run dir
mirrors every finished piece (see pipeline/smalltalk/data.py), so `--resume` picks a run up
again on a fresh fleet after the submitter or the whole embedded fleet died.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from broker import keys
from broker.app import client_app
from broker.auth import check_fleet_secret, connect_checked
from broker.embedded import EmbeddedFleet, WorkerSpec
from broker.jobs import JobFailed, JobRecord, new_job_id
from broker.registry import live_queues
from broker.settings import FleetSettings
from broker.store import Store
from broker.waiting import seconds_left, wait_for
from broker.wire.codec import PayloadError
from pipeline.data import windows_to_bytes
from pipeline.models.checkpoint import load_model
from pipeline.models.lm import tokenizer_for, vocab_size
from pipeline.models.spec import make_spec
from pipeline.smalltalk.config import DENSE, KIND, SmallTalkConfig
from pipeline.smalltalk.data import (
    RunDir,
    SmallTalkData,
    assignment_to_bytes,
    load_domains,
    prepare_data,
)
from pipeline.smalltalk.eval import cluster_stats, evaluate_mixture, flops
from pipeline.smalltalk.steps import assign, decode_scores, expert_from_bytes, initial_assignment

Say = Callable[[str], None]
Watch = Callable[[str, dict[str, dict]], None]  # (phase title, task name -> state) on every poll


class SmallTalkFailed(JobFailed):
    """A SmallTalk job could not finish: a task failed for good, a payload was rejected, or the fleet stalled."""


def _quiet(*_: object) -> None:
    pass


@contextmanager
def embedded_fleet(settings: FleetSettings, threads: int = 1, workdir: Path | None = None, expert_workers: int = 1):
    """A private Redis, expert workers (routers, experts: expert, expert1, ...) and an aggregator (scoring)."""
    specs = [WorkerSpec("expert", threads=threads, worker_name=f"expert{i}" if i else None)
             for i in range(expert_workers)]
    specs.append(WorkerSpec("aggregator", threads=threads))
    with EmbeddedFleet(specs, settings, workdir=workdir) as fleet:
        fleet.wait_ready(Store.from_url(fleet.settings.backend_url).r)
        yield fleet


def run_smalltalk(cfg: SmallTalkConfig, settings: FleetSettings, out_dir: Path, *, say: Say = _quiet,
                  watch: Watch = _quiet, threads: int = 1, job_id: str | None = None, expert_workers: int = 1) -> dict:
    """Whole job on the configured fleet, or on an embedded one when settings name no broker."""
    cfg = resolve_model(cfg.validate())
    settings.validate()
    data = prepare_data(cfg, load_domains(cfg))  # bad input fails here, before anything starts
    if settings.broker_url is None:
        say(f"starting an embedded fleet: private redis-server, {expert_workers} expert worker"
            f"{'s' if expert_workers > 1 else ''}, 1 aggregator worker")
        with embedded_fleet(settings, threads, expert_workers=expert_workers) as fleet:
            return drive(cfg, fleet.settings, data, RunDir(out_dir), say=say, watch=watch, job_id=job_id)
    return drive(cfg, settings, data, RunDir(out_dir), say=say, watch=watch, job_id=job_id)


def drive(cfg: SmallTalkConfig, settings: FleetSettings, data: SmallTalkData, run: RunDir, *,
          say: Say = _quiet, watch: Watch = _quiet, job_id: str | None = None) -> dict:
    """Submit the job to a running fleet and follow it; resumes whatever `run` already holds."""
    app = client_app(settings)
    st = Store(connect_checked(settings.backend_url), ttl=settings.blob_ttl)
    check_fleet_secret(st.r, settings.secret)
    queues = {w["queue"] for w in live_queues(st.r).values()}
    missing = [q for q in (keys.EXPERT_QUEUE, keys.AGGREGATOR_QUEUE) if q not in queues]
    if missing:
        say(f"warning: no registered worker consumes {', '.join(missing)}; tasks wait there until one starts")
    job_id = job_id or new_job_id(KIND)
    previous = _check_resume(run, cfg, data)
    run.write_json(run.config_file, {"job": job_id, "config": cfg.to_dict(), "domains": data.domains,
                                     "fingerprint": data.fingerprint(), "first_job": previous or job_id})
    job = JobRecord.create(st.r, job_id, KIND, cfg.to_dict(), settings.public_dict(), ttl=settings.blob_ttl)
    st.put_blob(job_id, "seqs", windows_to_bytes(data.train))
    with job.running(settings.job_keep_s, settings.blob_keep_s):  # then its keys expire (broker/jobs.py)
        if previous:
            say(f"job {job_id}: resuming run {run.path} (first job {previous})")
        say(f"job {job_id}: {cfg.experts} experts, prefix {cfg.prefix}, {len(data.train)} training sequences "
            f"from {len(data.domains)} domains")
        ctx = _Ctx(app, st, job, cfg, data, run, say, watch, settings)
        t0 = time.time()
        try:
            em = _stage1(ctx)
            tasks = _stage2(ctx)
        finally:
            app.close()
        report = build_report(ctx, em, tasks, time.time() - t0, previous)
        job.set(report=report)
    run.write_json(run.report_file, report)
    return report


class _Ctx:
    def __init__(self, app, st: Store, job: JobRecord, cfg: SmallTalkConfig, data: SmallTalkData, run: RunDir,
                 say: Say, watch: Watch, settings: FleetSettings) -> None:
        self.app, self.st, self.job, self.cfg, self.data, self.run = app, st, job, cfg, data, run
        self.say, self.watch, self.settings = say, watch, settings
        self.stall = cfg.stall_timeout or settings.visibility_timeout + 600.0


def _check_resume(run: RunDir, cfg: SmallTalkConfig, data: SmallTalkData) -> str | None:
    """The first job of an existing run dir, after checking it is the same job on the same text."""
    if not run.exists():
        return None
    meta, old = run.load_config()
    if old.to_dict() != cfg.to_dict():
        raise SmallTalkFailed(f"{run.path} holds a run with a different config; use a new --out")
    if meta.get("fingerprint") != data.fingerprint():
        raise SmallTalkFailed(f"{run.path} was trained on different text (corpus changed); use a new --out")
    return meta.get("first_job") or meta.get("job")


def _stage1(c: _Ctx) -> list[dict]:
    """Router EM; returns per-round statistics. Rounds finished in the run dir are not redone."""
    cfg, data, run, st, jid = c.cfg, c.data, c.run, c.st, c.job.id
    state = run.read_json(run.state_file)
    done = int(state.get("em_rounds_done", 0))
    assignments = run.load_assignments()
    if 0 not in assignments:
        first = np.full(len(data.train), -1)
        first[data.em_sets[0]] = initial_assignment(cfg, len(data.em_sets[0]))  # the paper: a random split
        assignments[0] = first
        run.save_assignments(assignments)
    for e in range(cfg.experts):
        if done:
            st.put_blob(jid, f"router/{done - 1}/{e}", run.router_file(f"r{done - 1}/{e}").read_bytes())
    stats: list[dict] = list(state.get("em", []))[:done]
    for rnd in range(done, cfg.em_rounds):
        st.put_blob(jid, f"assign/{rnd}", assignment_to_bytes(assignments[rnd]))
        names = [f"router{e}" for e in range(cfg.experts)]
        for e in range(cfg.experts):
            c.app.send_task(keys.SMALLTALK_ROUTER_TASK, args=[jid, rnd, e], shadow=f"smalltalk router {e} r{rnd} {jid}")
        _wait(c, rnd, names, f"EM {rnd + 1}/{cfg.em_rounds}: routers")
        index = data.round_set(rnd + 1)
        losses, payload_bytes = _score(c, rnd, index)
        nxt = np.full(len(data.train), -1)
        nxt[index] = assign(cfg, losses)
        assignments[rnd + 1] = nxt
        for e in range(cfg.experts):  # this round's routers, then the assignment, then the round counts as done
            run.write(run.router_file(f"r{rnd}/{e}"), st.get_blob(jid, f"router/{rnd}/{e}") or b"")
        run.save_assignments(assignments)
        clusters = cluster_stats(nxt[index], data.labels[index], data.domains, cfg.experts)
        stats.append({"round": rnd, "scored": len(index), "mean_best_loss": float(losses.min(axis=1).mean()),
                      "at_best_router": float((nxt[index] == losses.argmin(axis=1)).mean()),
                      "cluster_sizes": [cl["size"] for cl in clusters["clusters"]], "purity": clusters["purity"],
                      "payload_bytes": payload_bytes, "float32_bytes": losses.size * 4})
        run.update_state(em_rounds_done=rnd + 1, em=stats)
        c.say(f"EM round {rnd + 1}/{cfg.em_rounds}: scored {len(index)} sequences "
              f"({payload_bytes:,} payload bytes), mean best prefix loss {stats[-1]['mean_best_loss']:.3f}, "
              f"cluster purity {clusters['purity']:.2f}")
    for e in range(cfg.experts):  # the routers inference uses: those of the last round
        run.write(run.router_file(e), run.router_file(f"r{cfg.em_rounds - 1}/{e}").read_bytes())
    st.put_blob(jid, f"assign/{cfg.em_rounds}", assignment_to_bytes(assignments[cfg.em_rounds]))
    return stats


def _score(c: _Ctx, rnd: int, index: np.ndarray) -> tuple[np.ndarray, int]:
    """Scoring tasks over shards of `index`; decode every payload strictly into one (n, E) matrix."""
    cfg, jid = c.cfg, c.job.id
    c.st.put_blob(jid, f"score/{rnd}/index", index.astype("<i4").tobytes())
    shards = (len(index) + cfg.score_shard - 1) // cfg.score_shard
    for i in range(shards):
        c.app.send_task(keys.SMALLTALK_SCORE_TASK, args=[jid, rnd, i], shadow=f"smalltalk score {i} r{rnd} {jid}")
    _wait(c, rnd, [f"score{i}" for i in range(shards)], f"EM {rnd + 1}/{cfg.em_rounds}: scoring")
    parts, nbytes = [], 0
    for i in range(shards):
        rows = len(index[i * cfg.score_shard:(i + 1) * cfg.score_shard])
        payload = c.st.get_payload(jid, rnd, f"score{i}") or b""
        try:
            parts.append(decode_scores(payload, cfg, secret=c.settings.secret.encode(), job=jid, rnd=rnd,
                                       shard=f"score{i}", rows=rows, max_bytes=c.settings.max_payload_bytes))
        except PayloadError as e:
            raise SmallTalkFailed(f"EM round {rnd}: scores of shard {i} rejected: {e}") from None
        nbytes += len(payload)
    return np.concatenate(parts), nbytes


def _stage2(c: _Ctx) -> dict[str, dict]:
    """Experts (and the dense model) as independent tasks; finished ones in the run dir are reused."""
    cfg, run, st, jid, rnd = c.cfg, c.run, c.st, c.job.id, c.cfg.em_rounds
    # The dense model first: it trains E x an expert's steps, so a worker that starts it while the
    # others take the experts finishes with them, where sent last it would run alone at the end.
    names = ([DENSE] if cfg.dense else []) + cfg.expert_names
    nodes = {n: (DENSE if n == DENSE else f"expert{n}") for n in names}
    todo = []
    for name in names:
        if run.expert_file(name).exists():
            st.put_blob(jid, f"expert/{name}/model", run.expert_file(name).read_bytes())
            st.node_update(jid, rnd, nodes[name], status="done", from_run_dir=True)
            continue
        if run.checkpoint_file(name).exists():  # an earlier submitter mirrored it: resume there
            st.put_blob(jid, f"expert/{name}/ckpt", run.checkpoint_file(name).read_bytes())
        todo.append(name)
        c.app.send_task(keys.SMALLTALK_EXPERT_TASK, args=[jid, rnd, name], shadow=f"smalltalk expert {name} {jid}")
    if todo:
        c.say(f"training {len(todo)} model(s) independently on queue {keys.EXPERT_QUEUE}: {', '.join(nodes[n] for n in todo)}")
    mirrored: dict[str, int] = {}

    def mirror(states: dict[str, dict]) -> None:
        # Keep the run dir resumable: copy each new checkpoint and each finished model out of the store.
        for name in todo:
            s = states[nodes[name]]
            step = int(s.get("checkpoint_step", 0) or 0)
            if run.expert_file(name).exists():
                continue
            if s.get("status") == "done":
                data = st.get_blob(jid, f"expert/{name}/model")
                if data:
                    run.write(run.expert_file(name), data)
                    run.checkpoint_file(name).unlink(missing_ok=True)
            elif step > mirrored.get(name, 0) and (data := st.get_blob(jid, f"expert/{name}/ckpt")):
                run.write(run.checkpoint_file(name), data)
                mirrored[name] = step

    states = _wait(c, rnd, [nodes[n] for n in names], "experts", mirror)
    return {n: states[nodes[n]] for n in names}


def _wait(c: _Ctx, rnd: int, names: list[str], title: str,
          on_poll: Callable[[dict[str, dict]], None] | None = None) -> dict[str, dict]:
    """Follow the tasks' states until all are done; a failed task or a stalled fleet fails the job.

    Every task that ends wakes this wait (broker/waiting.py); it also re-reads every 0.25 s to
    show progress and to notice a fleet on which nothing changes any more.
    """
    seen = {"snapshot": None, "changed": time.monotonic()}

    def all_done() -> dict[str, dict] | None:
        states = c.st.round_nodes(c.job.id, rnd, names)
        c.watch(title, states)
        if on_poll:
            on_poll(states)
        failed = {n: s.get("error", "") for n, s in states.items() if s.get("status") == "failed"}
        if failed:
            raise SmallTalkFailed(f"{title}: " + "; ".join(f"{n} failed: {why}" for n, why in failed.items()))
        if all(s.get("status") == "done" for s in states.values()):
            return states
        snapshot = repr(sorted((n, sorted(s.items())) for n, s in states.items()))
        if snapshot != seen["snapshot"]:
            seen.update(snapshot=snapshot, changed=time.monotonic())
        elif time.monotonic() - seen["changed"] > c.stall:
            raise SmallTalkFailed(f"{title}: no task progressed for {c.stall:.0f}s (are `lmteam worker --role "
                                  f"expert` and `--role aggregator` workers running?)")
        return None

    return wait_for(all_done, seconds_left(None), client=c.st.r, wake=keys.arrived(c.job.id, rnd))


def load_models(run: RunDir, cfg: SmallTalkConfig):
    """(routers, experts, dense or None) of a finished run, from its run dir."""
    routers = [load_model(run.router_file(e)) for e in range(cfg.experts)]
    experts = [expert_from_bytes(cfg, run.expert_file(e).read_bytes()) for e in range(cfg.experts)]
    dense = (expert_from_bytes(cfg, run.expert_file(DENSE).read_bytes())
             if cfg.dense and run.expert_file(DENSE).exists() else None)
    return routers, experts, dense


def resolve_model(cfg: SmallTalkConfig) -> SmallTalkConfig:
    """The experts' model as the job record keeps it (folder, weights' hash) and its vocabulary."""
    if not cfg.model:
        return cfg
    spec = make_spec(cfg.model, block_size=cfg.block_size, lora_rank=cfg.lora_rank, seed=cfg.seed)
    if cfg.model_sha and spec.sha and cfg.model_sha != spec.sha:
        raise SmallTalkFailed(f"model {spec.source} has other weights than the run was trained with")
    cfg = replace(cfg, model=spec.source, model_sha=spec.sha)
    return replace(cfg, vocab_size=vocab_size(cfg.expert_spec())).validate()


def build_report(c: _Ctx, em: list[dict], tasks: dict[str, dict], wall_s: float, previous: str | None) -> dict:
    cfg, data = c.cfg, c.data
    routers, experts, dense = load_models(c.run, cfg)
    final = c.run.load_assignments()[cfg.em_rounds]
    clusters = cluster_stats(final, data.labels, data.domains, cfg.experts)
    ev = evaluate_mixture(experts, routers, data.eval, data.eval_labels, data.domains, cfg.prefix, dense,
                          byte_lengths=tokenizer_for(cfg.expert_spec()).byte_lengths())
    fl = flops(cfg, experts[0], routers[0], sum(r["scored"] for r in em))
    summary = {
        "mixture_ppl": ev["ppl"], "dense_ppl": ev.get("dense_ppl"),
        "ppl_change": ev.get("ppl_change"),
        "ppl_change_ci95": ev.get("ppl_change_ci95"),
        "mixture_ppl_after_prefix": ev["ppl_after_prefix"], "dense_ppl_after_prefix": ev.get("dense_ppl_after_prefix"),
        "oracle_ppl": ev["oracle_ppl"], "purity": clusters["purity"],
        "mixture_ppl_per_byte": ev["ppl_per_byte"], "dense_ppl_per_byte": ev.get("dense_ppl_per_byte"),
        "bytes_per_token": ev["bytes_per_token"],
        "routing_cost_fraction": fl["routing_cost_fraction"], "train_flops_mixture": fl["train_flops_mixture"],
        "train_flops_dense": fl["train_flops_dense"], "train_overhead_vs_dense": fl["train_overhead_vs_dense"],
    }
    keep = ("status", "attempts", "resumed_from", "sequences", "train_loss", "t_task", "cpu_s", "worker",
            "from_run_dir", "checkpoint_step")
    return {
        "job": c.job.id, "kind": KIND, "first_job": previous or c.job.id, "config": cfg.to_dict(),
        "settings": c.settings.public_dict(), "domains": data.domains,
        "data": {"train_sequences": len(data.train), "eval_sequences": len(data.eval),
                 "em_sequences_per_round": len(data.em_sets[0]), "fingerprint": data.fingerprint()},
        "summary": summary, "em": em, "clusters": clusters, "eval": ev, "flops": fl,
        "tasks": {n: {k: s[k] for k in keep if k in s} for n, s in tasks.items()}, "wall_s": wall_s,
    }

