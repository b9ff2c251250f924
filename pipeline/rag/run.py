"""The four FC-RAG operations behind `lmteam rag`: index, calibrate, query, eval.

Each one opens the fleet (embedded or real, see pipeline/rag/driver.py), does its part and records what
a later invocation needs in the run dir: rag.json (job id, config with the scorer model and its
hash, calibration summary) and calibration.safetensors (per-node calibration scores; the hub
recalibrates from them for any subset of nodes a query merges).
"""

from __future__ import annotations

import json
import time

from broker.jobs import new_job_id
from broker.settings import FleetSettings
from pipeline.rag.config import RAGConfig
from pipeline.rag.driver import (
    Client,
    EvalSet,
    RAGError,
    RunDir,
    Say,
    checked,
    eval_set,
    fleet,
    jsonable,
    load_text,
    resolve_model,
    summarize,
)
from pipeline.rag.steps import Query, exclusions_from_blob, exclusions_to_blob


def _quiet(_: str) -> None:
    pass


def _index_summary(states: dict[str, dict], cfg: RAGConfig, say: Say) -> dict:
    bad = {n: s.get("error", s["status"]) for n, s in states.items() if s["status"] != "indexed"}
    for node, why in bad.items():
        say(f"node {node}: no index ({why})")
    for node, s in states.items():
        if s.get("notice"):
            say(f"node {node}: {s['notice']}")
    if len(states) - len(bad) < cfg.effective_quorum:
        raise RAGError(f"only {len(states) - len(bad)} of {cfg.nodes} nodes have an index; quorum is "
                       f"{cfg.effective_quorum}")
    return {n: {k: s.get(k) for k in ("status", "passages", "embedder", "source", "index_s", "index")}
            for n, s in states.items()}


def index(cfg: RAGConfig, settings: FleetSettings, run: RunDir, say: Say = _quiet) -> dict:
    """Every node builds its passage index under its state dir; a new job is recorded in the run dir."""
    job = new_job_id("rag")
    with fleet(cfg, settings, run, say) as fs, Client(fs, cfg, job) as client:
        client.ensure_job()
        t0 = time.time()
        nodes = _index_summary(client.index(), cfg, say)
    state = {**(run.load() or {}), "job": job, "config": cfg.to_dict(), "index": nodes}
    state.pop("calibration", None)  # a new index means a new calibration
    run.save(state)
    return {"job": job, "nodes": nodes, "wall_s": time.time() - t0}


def _calibrate(client: Client, ev: EvalSet, say: Say) -> tuple[dict, bytes]:
    say(f"calibrating on {len(ev.cal)} questions")
    res = checked(client.run_round("calibrate", ev.queries(ev.cal), ev.labels(ev.cal)))
    return res, client.calibration_bytes(res["round"])


def _save_calibration(run: RunDir, job: str, cfg: RAGConfig, res: dict, data: bytes, ev: EvalSet) -> dict:
    """The calibration and each node's excluded spans: a later `rag query` on a new embedded fleet
    hands the nodes the same spans, so they find the same index on disk."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.calibration_file.write_bytes(data)
    summary = {"round": res["round"], "n_cal": res["n_cal"], "nodes": res["nodes"], "bound": res["bound"]}
    excl = {node: dict(zip(("data_sha", "spans"), exclusions_from_blob(b), strict=True))
            for node, b in ev.exclusions.items()}
    run.save({**(run.load() or {}), "job": job, "config": cfg.to_dict(), "calibration": summary, "exclusions": excl})
    return summary


def calibrate(cfg: RAGConfig, settings: FleetSettings, run: RunDir, say: Say = _quiet) -> dict:
    """One-shot split-conformal calibration on n_cal questions; q_hat and slack for cfg.alpha."""
    cfg = resolve_model(cfg)
    domains = load_text(cfg)
    ev = eval_set(cfg, domains, cfg.n_cal, 0)
    job = new_job_id("rag")  # a job's config never changes: new budgets, new job
    say(f"scorer {cfg.model} (weights {cfg.model_sha[:12]})")
    with fleet(cfg, settings, run, say, domains) as fs, Client(fs, cfg, job) as client:
        client.ensure_job(ev.exclusions)
        _index_summary(client.index(), cfg, say)
        res, data = _calibrate(client, ev, say)
    return _save_calibration(run, job, cfg, res, data, ev)


def query(text: str, options: list[str], settings: FleetSettings, run: RunDir, alphas: list[float] | None = None,
          say: Say = _quiet) -> dict:
    """Prediction set among `options` for the question `text`. Against a warm fleet this imports no torch."""
    state = run.load()
    if not state or "calibration" not in state:
        raise RAGError(f"no calibration in {run.path}: run `lmteam rag calibrate` (or `lmteam rag eval`) first")
    cfg = RAGConfig.from_dict(state["config"])
    if len(options) != cfg.options:
        raise RAGError(f"--options gave {len(options)} options; this calibration is for {cfg.options}")
    calib = (state["calibration"]["round"], run.calibration_file.read_bytes())
    excl = {node: exclusions_to_blob(e["data_sha"], [tuple(x) for x in e["spans"]])
            for node, e in (state.get("exclusions") or {}).items()}
    with fleet(cfg, settings, run, say) as fs, Client(fs, cfg, state["job"]) as client:
        client.ensure_job(excl, calibration=calib)
        t0 = time.perf_counter()
        res = checked(client.run_round("predict", [Query(text, tuple(options))], calibration=calib[0],
                                       alphas=alphas or [cfg.alpha]))
        res["latency_s"] = time.perf_counter() - t0
    res["options"] = list(options)
    return res


def evaluate(cfg: RAGConfig, settings: FleetSettings, run: RunDir, alphas: list[float], say: Say = _quiet,
             client: Client | None = None, domains: list | None = None) -> dict:
    """Index, calibrate and test in one fleet session; coverage, set size and acc@1 per alpha.

    With `client` (the bench, tests), runs on that client's fleet and job and writes nothing to
    disk; its config must already name a resolved model.
    """
    cfg = resolve_model(cfg) if client is None else cfg
    domains = domains if domains is not None else load_text(cfg)
    ev = eval_set(cfg, domains, cfg.n_cal, cfg.n_test)
    t0 = time.time()
    if client is not None:
        return _evaluate(client, cfg, ev, alphas, say, t0)
    job = new_job_id("rag")
    say(f"scorer {cfg.model} (weights {cfg.model_sha[:12]})")
    with fleet(cfg, settings, run, say, domains) as fs, Client(fs, cfg, job) as c:
        report = _evaluate(c, cfg, ev, alphas, say, t0)
        data = c.calibration_bytes(report["calibration"]["round"])
    report["calibration"] = _save_calibration(run, job, cfg, report.pop("_cal"), data, ev)
    run.save({**run.load(), "report": str(run.path / "report.json")})
    (run.path / "report.json").write_text(json.dumps(jsonable(report), indent=2))
    return report


def _evaluate(client: Client, cfg: RAGConfig, ev: EvalSet, alphas: list[float], say: Say, t0: float) -> dict:
    client.ensure_job(ev.exclusions)
    nodes = _index_summary(client.index(), cfg, say)
    res, _ = _calibrate(client, ev, say)
    say(f"testing on {len(ev.test)} questions, alpha in {', '.join(map(str, alphas))}")
    rounds = []
    for lo in range(0, len(ev.test), cfg.query_batch):
        batch = ev.test[lo : lo + cfg.query_batch]
        rounds.append(checked(client.run_round("predict", ev.queries(batch), calibration=res["round"],
                                               alphas=alphas)))
    summary = summarize(cfg, rounds, ev.labels(ev.test), alphas, res["n_cal"])
    uplink = {n: {"score_bits_per_query": cfg.budget_of(n)} for n in cfg.node_ids}
    kinds = [q.kind for q in ev.test]
    return {
        "job": client.job, "kind": "rag", "config": cfg.to_dict(), "index": nodes,
        "calibration": {"round": res["round"], "n_cal": res["n_cal"], "nodes": res["nodes"], "bound": res["bound"]},
        "_cal": res, "summary": summary, "uplink": uplink,
        "test_questions": {"count": len(ev.test), "by_kind": {k: kinds.count(k) for k in sorted(set(kinds))},
                           "by_node": {str(i): sum(q.node == i for q in ev.test) for i in range(cfg.nodes)},
                           "examples": [q.to_dict() for q in ev.test[:5]]},
        "rounds": [{k: r[k] for k in ("round", "nodes", "merged", "used_nodes", "uncalibrated", "bounds",
                                      "waited_s", "queries")} | {"queries": len(r["queries"])} for r in rounds],
        "wall_s": time.time() - t0,
    }
