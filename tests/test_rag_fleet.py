"""FC-RAG on a real fleet: private redis-server, real `lmteam worker` processes, a slow node, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from broker.embedded import EmbeddedFleet, WorkerSpec
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.data import load_corpus
from pipeline.models.checkpoint import save_model
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.train import train_lm
from pipeline.rag import conformal
from pipeline.rag import run as rag_run
from pipeline.rag.config import RAGConfig
from pipeline.rag.driver import Client, RunDir, load_student, node_shards
from tests.fleet import tiny_corpus

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
ALPHAS = [0.2, 0.3]


def tiny_student(path: Path, corpus: list[str]) -> Path:
    """A 1-layer byte model trained for a few steps: weak, but a real student checkpoint."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32))
    train_lm(model, np.concatenate([d.tokens for d in load_corpus(corpus)]), steps=100, batch_size=16)
    save_model(path, model)
    return path


def rag_cfg(corpus: list[str], **overrides) -> RAGConfig:
    base = dict(nodes=4, corpus=corpus, n_cal=150, n_test=100, query_batch=50, candidates=32, budget=64,
                passage_bytes=64, embed_dim=512, query_timeout=10.0, alpha=0.3)
    return RAGConfig(**{**base, **overrides}).validate()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rag")
    corpus = tiny_corpus(tmp, domains=4, size=40_000)
    student = load_student(tiny_student(tmp / "student.safetensors", corpus))
    domains = load_corpus(corpus)
    specs = []
    for i, shard in enumerate(node_shards(domains, 4)):
        (tmp / f"node{i}.txt").write_bytes(shard.tobytes())
        specs.append(WorkerSpec("node", i, (str(tmp / f"node{i}.txt"),), state_dir=str(tmp / "state" / f"node{i}")))
    specs.append(WorkerSpec("aggregator"))
    with EmbeddedFleet(specs, FleetSettings(retry_backoff=0.2, max_retries=1)) as f:
        store = Store.from_url(f.settings.backend_url)
        f.wait_ready(store.r)
        yield f, store, corpus, domains, student, tmp


def _evaluate(fleet, cfg: RAGConfig) -> dict:
    f, _, _, domains, student, tmp = fleet
    with Client(f.settings, cfg, f"rag-test-{time.monotonic_ns()}") as client:
        return rag_run.evaluate(cfg, f.settings, RunDir(tmp / "unused"), ALPHAS, client=client, student=student,
                                domains=domains)


def test_eval_on_a_fleet_covers_as_calibrated(fleet):
    """Index, calibrate, test through real workers: coverage sits where split conformal puts it."""
    cfg = rag_cfg(fleet[2])
    rep = _evaluate(fleet, cfg)
    assert {n["status"] for n in rep["index"].values()} == {"indexed"}
    assert all(v["status"] == "merged" for v in rep["calibration"]["nodes"].values())
    s = rep["summary"]
    assert s["merged_per_query"] == {"4": 100}
    for a in ALPHAS:
        r = s["alphas"][str(a)]
        assert r["queries"] == 100 and r["slack"] > 1 / (cfg.n_cal + 1)
        assert all(math.isfinite(q) for q in r["qhat"])
        lo, hi = conformal.beta_binomial_interval(100, *conformal.coverage_beta(cfg.n_cal, a), level=0.999)
        assert lo <= r["coverage"] <= hi, (a, r)
        assert r["coverage"] >= r["bound"]
        assert 1 <= r["mean_set_size"] < 256
    assert s["alphas"]["0.2"]["mean_set_size"] >= s["alphas"]["0.3"]["mean_set_size"]
    # budgets went over the wire as configured: 16 scores x 4 bits + 16 ids x 8 bits + two headers
    assert all(300 < v["bytes"] < 1400 + 50 * 24 for v in rep["rounds"][0]["nodes"].values())


def test_cli_calibrate_and_query_against_the_fleet(fleet, tmp_path):
    """`rag index/calibrate/query --broker`: the run dir carries the job; query prints the set."""
    from pipeline.rag.cli import rag

    f, _, corpus, _, student, _ = fleet
    fleet_args = ["--broker", f.settings.broker_url, "--secret", f.settings.secret, "--run", str(tmp_path / "run"),
                  "-q"]
    before = signal.getsignal(signal.SIGTERM)
    try:
        runner = CliRunner()
        res = runner.invoke(rag, ["query", "hello", *fleet_args])
        assert res.exit_code == 1 and "lmteam rag calibrate" in res.output
        corpus_args = [x for p in corpus for x in ("--corpus", p)]
        res = runner.invoke(rag, ["index", *corpus_args, "--passage-bytes", "64", "--embed-dim", "512", *fleet_args])
        assert res.exit_code == 0, res.output
        assert res.output.count(": indexed,") == 4
        res = runner.invoke(rag, ["calibrate", "--alpha", "0.3", "--student", str(student.path), "--n-cal", "120",
                                  "--candidates", "16", "--budget", "64", *fleet_args])
        assert res.exit_code == 0, res.output
        assert "calibrated on 120 queries, 4/4 nodes: alpha=0.3" in res.output
        res = runner.invoke(rag, ["query", "def __init__(self", *fleet_args])
        assert res.exit_code == 0, res.output
        assert "alpha=0.3:" in res.output and "4/4 nodes merged" in res.output and "latency" in res.output
        res = runner.invoke(rag, ["query", "def __init__(self", "--json", "--alpha", "0.2", "--alpha", "0.5",
                                  *fleet_args])
        out = json.loads(res.output)
        sets = out["queries"][0]["sets"]
        assert set(sets) == {"0.2", "0.5"} and (sets["0.2"] == "all" or len(sets["0.2"]) >= len(sets["0.5"]))
        res = runner.invoke(rag, ["calibrate", "--budget", "65", *fleet_args])
        assert res.exit_code == 2 and "budget of node 0 is 65 bits" in res.output
    finally:
        signal.signal(signal.SIGTERM, before)


def test_slow_node_is_dropped_and_the_bound_follows(fleet):
    """Node 3 sleeps past every query deadline: 3 of 4 nodes merge per query, the hub recalibrates
    for those 3 and reports the wider slack; the late payload changes nothing."""
    f, store, corpus, *_ = fleet
    cfg = rag_cfg(corpus, n_cal=100, n_test=60, query_batch=30, query_timeout=2.5, faults={"3@predict": "slow:5"})
    rep = _evaluate(fleet, cfg)
    assert all(v["status"] == "merged" for v in rep["calibration"]["nodes"].values())  # calibrated with 4
    s = rep["summary"]
    assert s["merged_per_query"] == {"3": 60}
    for r in rep["rounds"]:
        assert r["nodes"]["3"]["status"] == "late" and r["used_nodes"] == [0, 1, 2]
    full = rep["calibration"]["bound"]["slack"]
    for a in ALPHAS:
        assert set(s["alphas"][str(a)]["bound_by_merged"]) == {"3"}
    three = rep["rounds"][0]["bounds"]["0.3"]["slack"]
    assert full["f_max"] > 0 and three["f_max"] > 0
    # Delta_RAG / f_max = sqrt(sum v) / K: with 3 of 4 equal budgets, sqrt(4/3) times wider
    assert three["rag"] / three["f_max"] == pytest.approx(full["rag"] / full["f_max"] * math.sqrt(4 / 3))
    job, rnd = rep["job"], rep["rounds"][0]["round"]
    end = time.monotonic() + 20
    from pipeline.rag.config import QUERY_TTL

    qstore = Store(store.r, ttl=QUERY_TTL)
    while time.monotonic() < end and qstore.node_state(job, rnd, "3").get("late_at") is None:
        time.sleep(0.2)
    assert qstore.node_state(job, rnd, "3").get("status") == "late"
    assert qstore.get_payload(job, rnd, "3") is None and qstore.round_result(job, rnd)["merged"] == 3


@pytest.mark.e2e
def test_cli_eval_then_query_on_the_embedded_default(tmp_path):
    """`rag eval` then `rag query` with the same --run, each on its own embedded fleet: the second
    finds the nodes' indexes on disk instead of rebuilding them."""
    corpus = tiny_corpus(tmp_path, domains=2, size=30_000)
    student = tiny_student(tmp_path / "student.safetensors", corpus)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMTEAM_")}
    env["PYTHONPATH"] = str(ROOT)
    run = tmp_path / "run"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.rag.cli", *args, "--run", str(run)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=180)

    res = cli("eval", "--nodes", "2", "--corpus", corpus[0], "--corpus", corpus[1], "--student", str(student),
              "--n-cal", "100", "--n-test", "50", "--candidates", "16", "--budget", "64", "--passage-bytes", "64",
              "--embed-dim", "256", "--alpha", "0.3", "-q")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "coverage" in res.stdout and "merged nodes per query: 2: 50" in res.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["summary"]["alphas"]["0.3"]["queries"] == 50
    indexes = sorted(run.glob("state/node*/rag/index-*/index.safetensors"))
    assert len(indexes) == 2
    stamp = [p.stat().st_mtime_ns for p in indexes]
    res = cli("query", "The quick brown fox", "-q")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "alpha=0.3:" in res.stdout and "2/2 nodes merged" in res.stdout
    assert [p.stat().st_mtime_ns for p in indexes] == stamp  # loaded from the state dir, not rebuilt
    leftover = subprocess.run(["pgrep", "-f", f"cli worker.*{tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout == ""
