"""Run FC-RAG on a fleet: build node indexes, calibrate, answer queries, evaluate.

The same code drives an embedded fleet (private Redis and local workers, started here, with node
state dirs under the run dir so indexes persist between invocations) and a real one
(`--broker redis://...`, nodes holding their own `--data`). The query path imports neither torch
nor the corpus code, so a client against a warm fleet starts fast.

The evaluation task is multiple choice: cloze questions built from each node's private shard
(pipeline/rag/questions.py), whose windows every node leaves out of its index (the job's
`exclude/<node>` blobs, checked against the node's text by hash). Calibration and test
questions are disjoint and shuffled together, so they are exchangeable.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from broker import keys
from broker.app import client_app
from broker.auth import check_fleet_secret, connect_checked
from broker.jobs import JobFailed, JobRecord, JobStatus
from broker.round_gate import follow_round, open_round
from broker.settings import FleetSettings
from broker.store import Store
from broker.waiting import seconds_left, wait_for
from pipeline.files import write_atomic
from pipeline.rag.config import QUERY_TTL, RAGConfig
from pipeline.rag.questions import BLANK
from pipeline.rag.steps import Query, exclusions_to_blob, queries_to_blob

DEFAULT_RUN = Path("runs") / "rag"
Say = Callable[[str], None]


class RAGError(JobFailed):
    """FC-RAG cannot go on (no model, no calibration, quorum not met); one readable line."""


# --- the scorer model and the run dir ----------------------------------------------------------

def default_model(runs: Path = Path("runs")) -> str:
    """smollm2 where it is pulled, else the newest FPLD student folder (runs/<job>/student/)."""
    from pipeline.models.hf_folder import KNOWN_MODELS, default_cache_dir

    if (default_cache_dir() / KNOWN_MODELS["smollm2"] / "config.json").is_file():
        return "smollm2"
    found = sorted(runs.glob("*/student/config.json"), key=lambda p: p.stat().st_mtime)
    if found:
        return str(found[-1].parent)
    raise RAGError("no scorer model: pass --model DIR|ALIAS|HUB_ID, run `lmteam model pull smollm2`, or run "
                   "`lmteam fpld --model ...` first (it writes runs/<job>/student/)")


def resolve_model(cfg: RAGConfig) -> RAGConfig:
    """The scorer as the job record keeps it: a folder (an FPLD run dir stands for its student/)
    and its weights' hash, so every node proves it loads the same model."""
    from pipeline.models.spec import ModelError, make_spec

    name = cfg.model or default_model()
    run_dir = Path(name).expanduser()
    if run_dir.is_dir() and not (run_dir / "config.json").is_file():
        if (run_dir / "student" / "config.json").is_file():
            name = str(run_dir / "student")
        elif (run_dir / "student.safetensors").is_file():
            raise RAGError(f"{run_dir} holds a built-in byte-level student; FC-RAG scores options with an HF "
                           "model: run `lmteam fpld --model smollm2` (its student/ is an HF folder) or pass --model")
    try:
        spec = make_spec(name, block_size=cfg.block_size)
    except ModelError as e:
        raise RAGError(str(e)) from None
    if spec.is_builtin:
        raise RAGError("FC-RAG needs an HF scorer model (--model DIR|ALIAS|HUB_ID)")
    if cfg.model_sha and spec.sha and cfg.model_sha != spec.sha:
        raise RAGError(f"model {spec.source} has weights sha256 {spec.sha[:12]}…, the job asks for {cfg.model_sha[:12]}…")
    return replace(cfg, model=spec.source, model_sha=spec.sha)


class RunDir:
    """runs/rag/: rag.json (job, config with the scorer, calibration summary), calibration.safetensors,
    report.json, and state/node<i>/ (embedded node workers' state: their indexes)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def state_file(self) -> Path:
        return self.path / "rag.json"

    @property
    def calibration_file(self) -> Path:
        return self.path / "calibration.safetensors"

    def state_dir(self, name: str) -> Path:
        return self.path / "state" / name

    def load(self) -> dict | None:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else None

    def save(self, state: dict) -> None:
        write_atomic(self.state_file, json.dumps(jsonable(state), indent=2))


def jsonable(x: object) -> object:
    """inf/nan are not JSON: files written here say null instead (q_hat = null means +inf)."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    return x


# --- data: node shards, questions, exclusions -----------------------------------------------------

def load_text(cfg: RAGConfig) -> list:
    from pipeline.data import default_corpus, load_corpus

    return load_corpus(cfg.corpus) if cfg.corpus else default_corpus()


def node_shards(domains: list, nodes: int) -> list[np.ndarray]:
    """Each node's private text on an embedded fleet: FPLD's private training parts, non-IID."""
    from pipeline.data import assign_shards, split_domain

    return assign_shards([split_domain(d.tokens)[0] for d in domains], nodes)


@dataclass
class EvalSet:
    """Questions of every node's shard, split into calibration and test, and what each node excludes."""

    cal: list  # pipeline.rag.questions.Question
    test: list
    exclusions: dict[str, bytes]  # node -> blob of its excluded spans

    @staticmethod
    def queries(questions: list) -> list[Query]:
        return [Query("Fill in the blank: " + q.text, q.options, q.text.split(BLANK)[0]) for q in questions]

    @staticmethod
    def labels(questions: list) -> np.ndarray:
        return np.asarray([q.answer for q in questions], dtype=np.int64)


def eval_set(cfg: RAGConfig, domains: list, n_cal: int, n_test: int) -> EvalSet:
    """n_cal + n_test cloze questions from the nodes' shards (about equal numbers per node)."""
    from pipeline.rag.questions import excluded_spans, node_questions

    shards = node_shards(domains, cfg.nodes)
    per_node = -(-(n_cal + n_test) // cfg.nodes) + 8
    qs = node_questions([s.tobytes() for s in shards], per_node, cfg.seed, options=cfg.options)
    if len(qs) < n_cal + n_test:
        raise RAGError(f"the nodes' text gives {len(qs)} questions of {cfg.options} options; --n-cal {n_cal} + "
                       f"--n-test {n_test} is more: lower them or pass a larger corpus")
    qs = qs[: n_cal + n_test]
    excl = {node: exclusions_to_blob(hashlib.sha256(shards[i].tobytes()).hexdigest(), excluded_spans(qs, i))
            for i, node in enumerate(cfg.node_ids)}
    return EvalSet(qs[:n_cal], qs[n_cal:], excl)


# --- fleet ----------------------------------------------------------------------------------------

@contextmanager
def fleet(cfg: RAGConfig, settings: FleetSettings, run: RunDir, say: Say = lambda _: None,
          domains: list | None = None) -> Iterator[FleetSettings]:
    """The configured fleet, or an embedded one whose nodes hold cfg's corpus shards."""
    if settings.broker_url is not None:
        yield settings
        return
    from broker.embedded import EmbeddedFleet, WorkerSpec

    shards = node_shards(domains if domains is not None else load_text(cfg), cfg.nodes)
    say(f"starting an embedded fleet: private redis-server, {cfg.nodes} node workers, 1 aggregator")
    with tempfile.TemporaryDirectory(prefix="lmteam-rag-") as tmp:
        specs = []
        for i, shard in enumerate(shards):
            path = Path(tmp) / f"node{i}.txt"
            path.write_bytes(shard.tobytes())
            specs.append(WorkerSpec("node", i, (str(path),), state_dir=str(run.state_dir(f"node{i}").resolve())))
        specs.append(WorkerSpec("aggregator", state_dir=str(run.state_dir("aggregator").resolve())))
        with EmbeddedFleet(specs, settings) as f:
            f.wait_ready(Store.from_url(f.settings.backend_url).r)
            yield f.settings


class Client:
    """The submitter's side of one FC-RAG job on a running fleet."""

    def __init__(self, settings: FleetSettings, cfg: RAGConfig, job_id: str) -> None:
        self.cfg, self.job = cfg, job_id
        self.st = Store(connect_checked(settings.backend_url), ttl=settings.blob_ttl)
        check_fleet_secret(self.st.r, settings.secret)
        self.qst = Store(self.st.r, ttl=QUERY_TTL)
        self.app = client_app(settings)
        self.settings = settings

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_job(self, exclusions: dict[str, bytes] | None = None,
                   calibration: tuple[int, bytes] | None = None) -> JobRecord:
        """Create the job record if this Redis lacks it (an embedded fleet is new every time), with
        each node's excluded spans (before any index is built) and a saved calibration."""
        rec = JobRecord(self.st.r, self.job, ttl=self.settings.blob_ttl)
        if not rec.exists():
            rec = JobRecord.create(self.st.r, self.job, "rag", self.cfg.to_dict(), self.settings.public_dict(),
                                   ttl=self.settings.blob_ttl)
            rec.set_status(JobStatus.RUNNING)
        for node, data in (exclusions or {}).items():
            self.st.put_blob(self.job, f"exclude/{node}", data)
        if calibration is not None:
            rnd, data = calibration
            if not self.st.has_blob(self.job, f"calibration/{rnd}"):
                self.st.put_blob(self.job, f"calibration/{rnd}", data)
            self.st.r.set(keys.round_counter(self.job), rnd, nx=True)  # new rounds must not reuse its number
        return rec

    def _new_round(self) -> int:
        return int(self.st.r.incr(keys.round_counter(self.job)))

    def index(self) -> dict[str, dict]:
        """Every node builds (or finds) its index; returns each node's final state."""
        rnd = self._new_round()
        for node in self.cfg.node_ids:
            self.app.send_task(keys.RAG_INDEX_TASK, args=[self.job, rnd, node], shadow=f"rag index node {node} {self.job}")

        def all_in() -> bool | None:
            states = self.st.round_nodes(self.job, rnd, self.cfg.node_ids)
            return True if all(s.get("status") in ("indexed", "failed") for s in states.values()) else None

        wait_for(all_in, seconds_left(self.cfg.index_timeout), client=self.st.r, wake=keys.arrived(self.job, rnd),
                 poll=1.0)
        states = self.st.round_nodes(self.job, rnd, self.cfg.node_ids)
        for s in states.values():
            s.setdefault("status", "late")
        return states

    def run_round(self, phase: str, queries: list[Query], labels: np.ndarray | None = None,
                  calibration: int | None = None, alphas: list[float] | None = None) -> dict:
        """Fan one batch of queries out to the nodes and wait for the aggregator's result."""
        st = self.qst if phase == "predict" else self.st
        rnd = self._new_round()
        st.put_blob(self.job, f"queries/{rnd}", queries_to_blob(queries))
        if labels is not None:  # calibration labels go to the hub (aggregator), never to the nodes
            st.put_blob(self.job, f"labels/{rnd}", np.asarray(labels, dtype=np.uint8).tobytes())
        timeout = self.cfg.query_timeout if phase == "predict" else self.cfg.calibration_timeout
        deadline = st.now() + timeout
        merge = [self.job, rnd, deadline, phase, calibration, alphas or []]
        open_round(st, self.job, rnd, self.cfg.node_ids, keys.RAG_AGGREGATE_TASK, merge)  # see the FPLD driver
        for node in self.cfg.node_ids:
            self.app.send_task(keys.RAG_SCORE_TASK, args=[self.job, rnd, node, phase],
                               shadow=f"rag {phase} node {node} r{rnd}")
        result = follow_round(st, self.app, self.job, rnd, deadline, timeout + 120, poll=1.0,
                              shadow=f"rag {phase} aggregate r{rnd}")
        if result is None:
            raise RAGError(f"round {rnd}: no result from the aggregator (is an aggregator worker running?)")
        return result

    def calibration_bytes(self, rnd: int) -> bytes:
        data = self.st.get_blob(self.job, f"calibration/{rnd}")
        if data is None:
            raise RAGError(f"calibration round {rnd} wrote no calibration record")
        return data


def checked(result: dict) -> dict:
    if result.get("status") != "ok":
        raise RAGError(result.get("error") or f"round {result.get('round')} failed")
    return result


# --- eval report ----------------------------------------------------------------------------------

def summarize(cfg: RAGConfig, rounds: list[dict], labels: np.ndarray, alphas: list[float], n_cal: int) -> dict:
    """Coverage, set size, the slack and the bound per alpha; merged nodes per query and their bound."""
    from pipeline.rag import conformal

    per_alpha, merged = {}, []
    for r in rounds:
        merged += [len(r["used_nodes"])] * len(r["queries"])
    queries = [q for r in rounds for q in r["queries"]]
    top1 = [q["cands"][0][0] if q["cands"] else -1 for q in queries]
    for a in alphas:
        key, sets, bounds, slacks = str(a), [], [], []
        for r in rounds:
            b = r["bounds"][key]
            for q in r["queries"]:
                sets.append(q["sets"][key])
                bounds.append(b["bound"])
                slacks.append(b["slack"]["total"])
        sizes = [len(s) for s in sets]
        covered = [int(y) in s for s, y in zip(sets, labels, strict=True)]
        lo, hi = conformal.beta_binomial_interval(len(labels), *conformal.coverage_beta(n_cal, a), level=0.99)
        full = [r["bounds"][key] for r in rounds if len(r["used_nodes"]) == max(merged)]
        per_alpha[key] = {
            "alpha": a, "queries": len(labels), "coverage": float(np.mean(covered)),
            "mean_set_size": float(np.mean(sizes)), "median_set_size": float(np.median(sizes)),
            "slack": float(np.max(slacks)), "slack_parts": full[0]["slack"] if full else None,
            "bound": float(np.min(bounds)), "qhat": [r["bounds"][key]["qhat"] for r in rounds],
            "conformal_interval_99": [lo, hi],
            "bound_by_merged": {str(m): next(r["bounds"][key]["bound"] for r in rounds if len(r["used_nodes"]) == m)
                                for m in sorted(set(merged))},
        }
    # the merged score of each test query's true label, for re-analysis (resampled coverage)
    label = [dict(map(tuple, q["cands"])).get(int(y), np.inf) for q, y in zip(queries, labels, strict=True)]
    return {"alphas": per_alpha, "acc1": float(np.mean(np.asarray(top1) == labels)),
            "merged_per_query": {str(m): merged.count(m) for m in sorted(set(merged))},
            "test_label_scores": [float(x) for x in label]}
