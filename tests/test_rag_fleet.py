"""FC-RAG on a real fleet: private redis-server, real `lmteam worker` processes, a real HF scorer
(the tiny random llama), cloze questions from the nodes' own text, a slow node, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.embedded import EmbeddedFleet, WorkerSpec
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.data import load_corpus
from pipeline.rag import conformal
from pipeline.rag import run as rag_run
from pipeline.rag.config import RAGConfig
from pipeline.rag.driver import Client, RunDir, node_shards, resolve_model
from tests.test_rag_questions import prose_corpus

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
ALPHAS = [0.2, 0.3]


def rag_cfg(corpus: list[str], model: Path, **overrides) -> RAGConfig:
    base = dict(nodes=4, corpus=corpus, model=str(model), block_size=64, n_cal=120, n_test=60, query_batch=30,
                budget=16, passages=1, passage_bytes=64, embed_dim=512, query_timeout=20.0, alpha=0.3)
    return resolve_model(RAGConfig(**{**base, **overrides}).validate())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rag")
    corpus = prose_corpus(tmp, domains=4, sentences=1200)
    domains = load_corpus(corpus)
    specs = []
    for i, shard in enumerate(node_shards(domains, 4)):
        (tmp / f"node{i}.txt").write_bytes(shard.tobytes())
        specs.append(WorkerSpec("node", i, (str(tmp / f"node{i}.txt"),), state_dir=str(tmp / "state" / f"node{i}")))
    specs.append(WorkerSpec("aggregator"))
    with EmbeddedFleet(specs, FleetSettings(retry_backoff=0.2, max_retries=1)) as f:
        store = Store.from_url(f.settings.backend_url)
        f.wait_ready(store.r)
        yield f, store, corpus, domains, tmp


def _evaluate(fleet, cfg: RAGConfig) -> dict:
    f, _, _, domains, tmp = fleet
    with Client(f.settings, cfg, f"rag-test-{time.monotonic_ns()}") as client:
        return rag_run.evaluate(cfg, f.settings, RunDir(tmp / "unused"), ALPHAS, client=client, domains=domains)


def test_eval_on_a_fleet_covers_as_calibrated(fleet, tiny_llama_dir):
    """Index (question windows excluded), calibrate, test through real workers: coverage sits where
    split conformal puts it; every node scored all 4 options of every question."""
    cfg = rag_cfg(fleet[2], tiny_llama_dir)
    rep = _evaluate(fleet, cfg)
    assert {n["status"] for n in rep["index"].values()} == {"indexed"}
    assert all(v["status"] == "merged" for v in rep["calibration"]["nodes"].values())
    assert rep["test_questions"]["count"] == 60 and set(rep["test_questions"]["by_node"]) == {"0", "1", "2", "3"}
    s = rep["summary"]
    assert s["merged_per_query"] == {"4": 60} and 0 <= s["acc1"] <= 1
    for a in ALPHAS:
        r = s["alphas"][str(a)]
        assert r["queries"] == 60 and r["slack"] > 1 / (cfg.n_cal + 1)
        assert all(math.isfinite(q) for q in r["qhat"])
        lo, hi = conformal.beta_binomial_interval(60, *conformal.coverage_beta(cfg.n_cal, a), level=0.999)
        assert lo <= r["coverage"] <= hi, (a, r)
        assert r["coverage"] >= r["bound"]
        assert 0 <= r["mean_set_size"] <= 4
    assert s["alphas"]["0.2"]["mean_set_size"] >= s["alphas"]["0.3"]["mean_set_size"]
    # the budget went over the wire as configured: 30 queries x 4 options x 4 bits, plus a header
    assert all(60 < v["bytes"] < 60 + 600 for v in rep["rounds"][0]["nodes"].values())


def test_cli_calibrate_and_query_against_the_fleet(fleet, tmp_path, tiny_llama_dir):
    """`rag index/calibrate/query --options --broker`: the run dir carries the job and the model."""
    from pipeline.rag.cli import rag

    f, _, corpus, _, _ = fleet
    fleet_args = ["--broker", f.settings.broker_url, "--secret", f.settings.secret, "--run", str(tmp_path / "run"),
                  "-q"]
    before = signal.getsignal(signal.SIGTERM)
    try:
        runner = CliRunner()
        res = runner.invoke(rag, ["query", "Who?", "--options", "a,b,c,d", *fleet_args])
        assert res.exit_code == 1 and "lmteam rag calibrate" in res.output
        corpus_args = [x for p in corpus for x in ("--corpus", p)]
        res = runner.invoke(rag, ["index", *corpus_args, "--passage-bytes", "64", "--embed-dim", "512", *fleet_args])
        assert res.exit_code == 0, res.output
        assert res.output.count(": indexed,") == 4
        res = runner.invoke(rag, ["calibrate", "--alpha", "0.3", "--model", str(tiny_llama_dir), "--block-size", "64",
                                  "--passages", "1", "--n-cal", "100", "--budget", "16", *fleet_args])
        assert res.exit_code == 0, res.output
        assert "calibrated on 100 queries, 4/4 nodes: alpha=0.3" in res.output
        question = ["Who rode to Tollmark with the lantern?", "--options", "Alaric,Brunhild,Casimir,Dagny"]
        res = runner.invoke(rag, ["query", *question, *fleet_args])
        assert res.exit_code == 0, res.output
        assert "alpha=0.3:" in res.output and "of 4 options" in res.output and "4/4 nodes merged" in res.output
        assert "Alaric" in res.output and "latency" in res.output
        res = runner.invoke(rag, ["query", *question, "--json", "--alpha", "0.2", "--alpha", "0.5", *fleet_args])
        out = json.loads(res.output)
        sets = out["queries"][0]["sets"]
        assert set(sets) == {"0.2", "0.5"} and len(sets["0.2"]) >= len(sets["0.5"])
        assert out["options"] == ["Alaric", "Brunhild", "Casimir", "Dagny"]
        res = runner.invoke(rag, ["query", "Who?", "--options", "a,b,c", *fleet_args])
        assert res.exit_code == 1 and "3 options; this calibration is for 4" in res.output
        res = runner.invoke(rag, ["calibrate", "--budget", "18", *fleet_args])
        assert res.exit_code == 2 and "budget of node 0 is 18 bits" in res.output
        res = runner.invoke(rag, ["calibrate", "--model", str(tmp_path / "nowhere"), *fleet_args])
        assert res.exit_code != 0
    finally:
        signal.signal(signal.SIGTERM, before)


def test_slow_node_is_dropped_and_the_bound_follows(fleet, tiny_llama_dir):
    """Node 3 sleeps past every query deadline: 3 of 4 nodes merge per query, the hub recalibrates
    for those 3 and reports the wider slack; the late payload changes nothing."""
    f, store, corpus, *_ = fleet
    cfg = rag_cfg(corpus, tiny_llama_dir, n_cal=100, n_test=40, query_batch=20, query_timeout=3.0,
                  faults={"3@predict": "slow:6"})
    rep = _evaluate(fleet, cfg)
    assert all(v["status"] == "merged" for v in rep["calibration"]["nodes"].values())  # calibrated with 4
    s = rep["summary"]
    assert s["merged_per_query"] == {"3": 40}
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


def test_a_node_with_other_text_refuses_the_exclusions(fleet, tiny_llama_dir):
    """Spans of text a node does not hold would exclude the wrong bytes: its index task fails."""
    f, _, corpus, domains, tmp = fleet
    cfg = rag_cfg(corpus, tiny_llama_dir)
    from pipeline.rag.driver import eval_set
    from pipeline.rag.steps import exclusions_to_blob

    ev = eval_set(cfg, domains, 20, 0)
    ev.exclusions["2"] = exclusions_to_blob("0" * 64, [(0, 100)])
    with Client(f.settings, replace(cfg, index_timeout=60.0), f"rag-test-{time.monotonic_ns()}") as client:
        client.ensure_job(ev.exclusions)
        states = client.index()
    assert states["2"]["status"] == "failed" and "sha256" in states["2"].get("error", "")
    assert all(states[n]["status"] == "indexed" for n in ("0", "1", "3"))


@pytest.mark.e2e
def test_cli_eval_then_query_on_the_embedded_default(tmp_path, tiny_llama_dir):
    """`rag eval` then `rag query` with the same --run, each on its own embedded fleet: the second
    finds the nodes' indexes on disk instead of rebuilding them."""
    corpus = prose_corpus(tmp_path, domains=2, sentences=1000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMTEAM_")}
    env["PYTHONPATH"] = str(ROOT)
    run = tmp_path / "run"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.rag.cli", *args, "--run", str(run)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300)

    res = cli("eval", "--nodes", "2", "--corpus", corpus[0], "--corpus", corpus[1], "--model", str(tiny_llama_dir),
              "--block-size", "64", "--passages", "1", "--n-cal", "60", "--n-test", "30", "--budget", "16",
              "--passage-bytes", "64", "--embed-dim", "256", "--alpha", "0.3", "-q")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "coverage" in res.stdout and "merged nodes per query: 2: 30" in res.stdout
    report = json.loads((run / "report.json").read_text())
    assert report["summary"]["alphas"]["0.3"]["queries"] == 30
    indexes = sorted(run.glob("state/node*/rag/index-*/index.safetensors"))
    assert len(indexes) == 2
    stamp = [p.stat().st_mtime_ns for p in indexes]
    res = cli("query", "Who rode to Tollmark?", "--options", "Alaric,Brunhild,Casimir,Dagny", "-q")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "alpha=0.3:" in res.stdout and "2/2 nodes merged" in res.stdout
    assert [p.stat().st_mtime_ns for p in indexes] == stamp  # loaded from the state dir, not rebuilt
    leftover = subprocess.run(["pgrep", "-f", f"cli worker.*{tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout == ""
