"""SmallTalk LM on a real fleet: private redis-server, real `lmteam worker` processes, a SIGKILLed
expert worker, and a run resumed from its run dir on a fresh fleet."""

from __future__ import annotations

import json

import pytest

from broker.embedded import WorkerSpec
from broker.jobs import JobRecord
from broker.settings import FleetSettings
from broker.store import Store
from pipeline.smalltalk.config import SmallTalkConfig
from pipeline.smalltalk.data import RunDir, load_domains, prepare_data
from pipeline.smalltalk.driver import drive, embedded_fleet
from tests.fleet import in_thread, tiny_corpus, wait_until

pytestmark = pytest.mark.integration


def tiny(corpus: list[str], **overrides) -> SmallTalkConfig:
    base = dict(experts=3, prefix=12, em_rounds=2, router_seqs=120, router_steps=15, expert_steps=40,
                checkpoint_every=20, dense=False, block_size=24, n_layer=1, n_head=2, n_embd=16, router_embd=8,
                eval_seqs=30, score_shard=400, corpus=corpus)
    base.update(overrides)
    return SmallTalkConfig(**base).validate()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), domains=3, size=20_000)



def _untrained_ppl(cfg: SmallTalkConfig, data) -> float:
    from pipeline.models.train import perplexity
    from pipeline.smalltalk.steps import new_expert

    return perplexity(new_expert(cfg), data.eval)



def test_sigkilled_expert_worker_resumes_from_its_checkpoint(corpus, tmp_path):
    """Kill the expert worker's process group after expert 0's first checkpoint; restart it: the task
    is redelivered, expert 0 resumes from the checkpoint in the store, and the job completes."""
    cfg = tiny(corpus, expert_steps=400, checkpoint_every=50)
    data = prepare_data(cfg, load_domains(cfg))
    with embedded_fleet(FleetSettings(visibility_timeout=8)) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        job = "smalltalk-sigkill"
        t, box = in_thread(lambda: drive(cfg, fleet.settings, data, RunDir(tmp_path / "run"), job_id=job))
        stage2 = cfg.em_rounds

        def past_first_checkpoint() -> bool:
            s = store.node_state(job, stage2, "expert0")
            return int(s.get("checkpoint_step", 0) or 0) >= 50 and s.get("status") == "running"

        assert wait_until(past_first_checkpoint, 90), store.node_state(job, stage2, "expert0")
        fleet.kill_worker("expert")  # SIGKILL, whole process group: the task dies unacknowledged
        state = store.node_state(job, stage2, "expert0")
        # progress ("step") is reported every few steps and can lag the last checkpoint
        killed_at = max(int(state.get("step", 0) or 0), int(state.get("checkpoint_step", 0) or 0))
        fleet.start_worker(WorkerSpec("expert"))  # what a restart policy does
        t.join(150)
        assert not t.is_alive(), "job did not finish"
        assert "error" not in box, box.get("error")
        report = box["report"]
        e0 = report["tasks"]["0"]
        assert int(e0["attempts"]) == 2
        assert 50 <= int(e0["resumed_from"]) <= killed_at  # from its last checkpoint, not from scratch
        assert all(report["tasks"][n]["status"] == "done" for n in cfg.expert_names)
        assert JobRecord(store.r, job).get()["status"] == "succeeded"
        # trained experts, routed: well below what the shared initial weights give on the same text
        assert report["summary"]["mixture_ppl"] < 0.5 * _untrained_ppl(cfg, data)
        assert sum(c["size"] for c in report["clusters"]["clusters"]) == len(data.train)

        # `lmteam status JOB` shows every task of the job, the resumed expert included
        from rich.console import Console

        from pipeline.report.status import print_job

        console = Console(record=True, width=200)
        print_job(store.r, JobRecord(store.r, job).get() | {"id": job}, "http://fl", console)
        out = console.export_text()
        assert "EM round 1/2: routers, scoring" in out and "experts and the dense baseline" in out
        row = next(line for line in out.splitlines() if "expert0" in line)
        assert "done" in row and str(e0["resumed_from"]) in row
        assert all(f"router{e}" in out for e in range(cfg.experts)) and "score0" in out


def test_run_resumes_on_a_fresh_fleet_and_evaluates(corpus, tmp_path):
    """The whole embedded fleet dies during stage 2; `drive` on a new fleet with the same run dir
    redoes no EM round, resumes the expert from the checkpoint mirrored in the run dir, finishes;
    the run dir then serves eval and generate."""
    cfg = tiny(corpus, expert_steps=300, checkpoint_every=50, dense=True)
    data = prepare_data(cfg, load_domains(cfg))
    run = RunDir(tmp_path / "run")
    with embedded_fleet(FleetSettings(visibility_timeout=30)) as fleet:
        t, box = in_thread(lambda: drive(cfg, fleet.settings, data, run, job_id="smalltalk-first"))
        assert wait_until(lambda: run.checkpoint_file("0").exists(), 90)
    # the fleet (Redis and workers) is gone; the first submitter is left failing in its thread
    state = json.loads(run.state_file.read_text())
    assert state["em_rounds_done"] == cfg.em_rounds
    with embedded_fleet(FleetSettings(), expert_workers=2) as fleet:
        store = Store.from_url(fleet.settings.backend_url)
        report = drive(cfg, fleet.settings, data, run, job_id="smalltalk-second")
        assert store.round_nodes("smalltalk-second", 0, ["router0"])["router0"] == {}  # EM not redone
        workers = {str(t["worker"]).split("@")[0] for t in report["tasks"].values() if t.get("worker")}
        assert workers == {"expert", "expert1"}  # two expert workers shared the experts and the dense model
    assert report["first_job"] == "smalltalk-first"
    assert int(report["tasks"]["0"]["resumed_from"]) >= 50
    summary = report["summary"]
    assert summary["dense_ppl"] < 0.5 * _untrained_ppl(cfg, data)
    assert summary["ppl_change"] == pytest.approx(summary["mixture_ppl"] / summary["dense_ppl"] - 1, rel=1e-6)
    assert json.loads(run.report_file.read_text())["job"] == "smalltalk-second"

    from pipeline.smalltalk.local import evaluate_run, generate

    ev = evaluate_run(run.path)
    assert ev["ppl"] == pytest.approx(report["summary"]["mixture_ppl"], rel=1e-6)
    short = evaluate_run(run.path, prefix=4)
    assert short["prefix"] == 4 and sum(short["load"]) == ev["sequences"]
    out = generate(run.path, "def main():", max_new_tokens=20, seed=1)
    assert 0 <= out["expert"] < cfg.experts and len(out["router_losses"]) == cfg.experts
    assert out == generate(run.path, "def main():", max_new_tokens=20, seed=1)  # seeded
    t.join(0)


@pytest.mark.e2e
def test_cli_train_eval_generate(corpus, tmp_path):
    """The commands end to end on the embedded default: train writes a run dir, eval and generate read it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMTEAM_")} | {"PYTHONPATH": str(root)}

    def st(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipeline.smalltalk.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=180)

    run = tmp_path / "run"
    res = st("smalltalk", "train", "--experts", "2", "--prefix", "8", "--block-size", "16", "--n-layer", "1",
             "--n-embd", "16", "--n-head", "2", "--router-embd", "8", "--em-rounds", "1", "--router-seqs", "64",
             "--router-steps", "5", "--expert-steps", "10", "--eval-seqs", "20", "--quiet", "--out", str(run),
             *[a for p in corpus for a in ("--corpus", p)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "mixture perplexity" in res.stdout
    report = json.loads((run / "report.json").read_text())
    assert {"mixture_ppl", "dense_ppl", "ppl_change_ci95", "purity", "routing_cost_fraction"} <= set(report["summary"])
    assert sorted(p.name for p in (run / "experts").iterdir()) == ["0.safetensors", "1.safetensors"]
    res = st("smalltalk", "eval", str(run), "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout)["ppl"] == pytest.approx(report["summary"]["mixture_ppl"], rel=1e-6)
    res = st("smalltalk", "eval", str(run))
    assert res.returncode == 0 and "mixture vs dense: " in res.stdout and "95% CI" in res.stdout, res.stderr[-2000:]
    res = st("generate", str(run), "--prompt", "import os", "--max-new", "16")
    assert res.returncode == 0 and res.stdout.startswith("import os") and "[expert" in res.stderr
    again = st("smalltalk", "train", "--out", str(run), "--quiet")
    assert again.returncode == 2 and "--resume" in again.stderr  # an existing run is never overwritten
