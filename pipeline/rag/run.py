"""The four FC-RAG operations behind `lmteam rag`: index, calibrate, query, eval.

Each one opens the fleet (embedded or real, see pipeline/rag/driver.py), does its part and records what
a later invocation needs in the run dir: rag.json (job id, config, student, calibration summary)
and calibration.safetensors (per-node calibration scores; the hub recalibrates from them for any
subset of nodes a query merges).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from broker.jobs import new_job_id
from broker.settings import FleetSettings
from pipeline.rag.config import RAGConfig
from pipeline.rag.driver import (
    Client,
    RAGError,
    RunDir,
    Say,
    Student,
    cal_test_split,
    checked,
    find_student,
    fleet,
    heldout_queries,
    jsonable,
    load_student,
    load_text,
    summarize,
)
from pipeline.rag.steps import context_bytes


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


def _calibrate(client: Client, cal_contexts: list[bytes], cal_labels: np.ndarray, say: Say) -> tuple[dict, bytes]:
    say(f"calibrating on {len(cal_contexts)} held-out queries")
    res = checked(client.run_round("calibrate", cal_contexts, cal_labels))
    return res, client.calibration_bytes(res["round"])


def _save_calibration(run: RunDir, job: str, cfg: RAGConfig, student: Student, res: dict, data: bytes) -> dict:
    run.path.mkdir(parents=True, exist_ok=True)
    run.calibration_file.write_bytes(data)
    summary = {"round": res["round"], "n_cal": res["n_cal"], "nodes": res["nodes"], "bound": res["bound"]}
    state = {**(run.load() or {}), "job": job, "config": cfg.to_dict(),
             "student": {"path": str(student.path.resolve()), "sha256": student.sha, "block_size": student.block_size},
             "calibration": summary}
    run.save(state)
    return summary


def calibrate(cfg: RAGConfig, settings: FleetSettings, run: RunDir, student_path: Path | None = None,
              say: Say = _quiet) -> dict:
    """One-shot split-conformal calibration on n_cal held-out queries; q_hat and slack for cfg.alpha."""
    student = load_student(find_student(student_path))
    domains = load_text(cfg)
    queries = heldout_queries(domains, context_bytes(cfg, student.block_size), cfg.seed)
    cal, _ = cal_test_split(queries, cfg.n_cal, 0)
    job = new_job_id("rag")  # a job's config never changes: new budgets, new job
    with fleet(cfg, settings, run, say, domains) as fs, Client(fs, cfg, job) as client:
        client.ensure_job(student)
        _index_summary(client.index(), cfg, say)
        res, data = _calibrate(client, cal.contexts, cal.labels, say)
    return _save_calibration(run, job, cfg, student, res, data)


def query(text: str, settings: FleetSettings, run: RunDir, alphas: list[float] | None = None,
          say: Say = _quiet) -> dict:
    """Prediction set for the next byte after `text`. Against a warm fleet this imports no torch."""
    state = run.load()
    if not state or "calibration" not in state:
        raise RAGError(f"no calibration in {run.path}: run `lmteam rag calibrate` (or `lmteam rag eval`) first")
    cfg = RAGConfig.from_dict(state["config"])
    student = load_student(Path(state["student"]["path"]))
    if student.sha != state["student"]["sha256"]:
        raise RAGError(f"student {student.path} changed since calibration: calibrate again")
    calib = (state["calibration"]["round"], run.calibration_file.read_bytes())
    with fleet(cfg, settings, run, say) as fs, Client(fs, cfg, state["job"]) as client:
        client.ensure_job(student, calib)
        t0 = time.perf_counter()
        res = checked(client.run_round("predict", [text.encode("utf-8")], calibration=calib[0],
                                       alphas=alphas or [cfg.alpha]))
        res["latency_s"] = time.perf_counter() - t0
    return res


def evaluate(cfg: RAGConfig, settings: FleetSettings, run: RunDir, alphas: list[float],
             student_path: Path | None = None, say: Say = _quiet, client: Client | None = None,
             student: Student | None = None, domains: list | None = None) -> dict:
    """Index, calibrate and test in one fleet session; coverage and set size per alpha.

    With `client` (the bench), runs on that client's fleet and job and writes nothing to disk.
    """
    student = student or load_student(find_student(student_path))
    domains = domains if domains is not None else load_text(cfg)
    queries = heldout_queries(domains, context_bytes(cfg, student.block_size), cfg.seed)
    cal, test = cal_test_split(queries, cfg.n_cal, cfg.n_test)
    t0 = time.time()
    if client is not None:
        return _evaluate(client, cfg, student, cal, test, alphas, say, t0)
    job = new_job_id("rag")
    with fleet(cfg, settings, run, say, domains) as fs, Client(fs, cfg, job) as c:
        c.ensure_job(student)
        report = _evaluate(c, cfg, student, cal, test, alphas, say, t0)
        data = c.calibration_bytes(report["calibration"]["round"])
    report["calibration"] = _save_calibration(run, job, cfg, student, report.pop("_cal"), data)
    run.save({**run.load(), "report": str(run.path / "report.json")})
    (run.path / "report.json").write_text(json.dumps(jsonable(report), indent=2))
    return report


def _evaluate(client: Client, cfg: RAGConfig, student: Student, cal, test, alphas: list[float], say: Say,
              t0: float) -> dict:
    client.ensure_job(student)
    nodes = _index_summary(client.index(), cfg, say)
    res, _ = _calibrate(client, cal.contexts, cal.labels, say)
    say(f"testing on {len(test)} held-out queries, alpha in {', '.join(map(str, alphas))}")
    rounds = []
    for lo in range(0, len(test), cfg.query_batch):
        batch = test.take(lo, lo + cfg.query_batch)
        rounds.append(checked(client.run_round("predict", batch.contexts, calibration=res["round"], alphas=alphas)))
    summary = summarize(cfg, rounds, test, alphas, res["n_cal"])
    uplink = {n: {"score_bits_per_query": cfg.budget_of(n), "id_bits_per_query": 8 * cfg.candidates}
              for n in cfg.node_ids}
    return {
        "job": client.job, "kind": "rag", "config": cfg.to_dict(),
        "student": {"path": str(student.path), "sha256": student.sha, "block_size": student.block_size},
        "index": nodes, "calibration": {"round": res["round"], "n_cal": res["n_cal"], "nodes": res["nodes"],
                                        "bound": res["bound"]},
        "_cal": res, "summary": summary, "uplink": uplink,
        "rounds": [{k: r[k] for k in ("round", "nodes", "merged", "used_nodes", "uncalibrated", "bounds",
                                      "waited_s", "queries")} | {"queries": len(r["queries"])} for r in rounds],
        "wall_s": time.time() - t0,
    }
