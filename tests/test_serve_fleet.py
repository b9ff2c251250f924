"""Serving a SmallTalk mixture on a fleet: real redis-server, real `lmteam worker --serve` replicas.

One tiny run (2 built-in experts, trained once per module by the CLI) is served: routing sends a
prompt only to its expert's queue, a SIGKILLed replica's request completes on the other replica
and is delivered once, and an expert with no live replica fails clearly or falls back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from broker import keys, serving
from broker.settings import FleetSettings
from pipeline.smalltalk.serve import Sampling, generate_batch, run_from_dir
from pipeline.smalltalk.serve_driver import Mixture, ServeFailed, serving_fleet
from tests.fleet import tiny_corpus, wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["def main(argv):", "The module provides", "import os, sys", "class Parser(object):",
           "Return the value of", "for i in range(10):"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("LMTEAM_")} | {"PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    corpus = tiny_corpus(tmp, domains=2, size=20_000)
    out = tmp / "run"
    res = subprocess.run([sys.executable, "-m", "cli", "smalltalk", "train", "--experts", "2", "--em-rounds", "1",
                          "--router-steps", "5", "--expert-steps", "5", "--block-size", "32", "--prefix", "8",
                          "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--eval-seqs", "8", "--router-seqs",
                          "64", "-q", "--out", str(out), *[a for p in corpus for a in ("--corpus", p)]],
                         cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def _routed(run: Path, prompts: list[str]) -> np.ndarray:
    return Mixture(run_from_dir(run)).route(prompts)[1].argmin(axis=1)


def test_generate_batch_same_as_alone_when_greedy(run):
    """A replica's batched forward gives each prompt what it would get alone (greedy), in groups by length."""
    model = run_from_dir(run).expert(0)
    prompts = [np.frombuffer(p.encode(), dtype=np.uint8).astype(np.int64) for p in ("abcdef", "uvwxyz", "hello")]
    greedy = [Sampling(max_new=12, temperature=0.0, top_k=None)] * 3
    batched, sizes = generate_batch(model, prompts, greedy, max_batch=8)
    assert sizes == [2, 2, 1]  # two prompts of 6 tokens shared a forward; the 5-token one ran alone
    for p, got in zip(prompts, batched, strict=True):
        alone = model.generate(torch.from_numpy(p[None]), 12, temperature=0.0)[0, len(p):].numpy()
        np.testing.assert_array_equal(got, alone)


def test_generate_batch_serves_an_hf_expert(tiny_llama_dir):
    """The same batching runs an HF causal LM expert (the real-model interface), on its own tokenizer's ids."""
    from pipeline.models.lm import build_model, tokenizer_for
    from pipeline.models.spec import make_spec

    spec = make_spec(str(tiny_llama_dir), block_size=64)
    model, tok = build_model(spec), tokenizer_for(spec)
    prompts = [tok.encode(p).astype(np.int64) for p in ("Once upon a time", "Once upon a time")]
    out, sizes = generate_batch(model, prompts, [Sampling(max_new=5, temperature=0.0, top_k=None)] * 2, 4)
    assert sizes == [2, 2] and all(len(o) == 5 for o in out) and (out[0] == out[1]).all()
    assert isinstance(tok.decode(out[0]), str)


def test_routing_sends_a_prompt_only_to_the_chosen_experts_queue(run, redis_server, redis_client):
    """With no replica running, every doorbell and pending id sits on its routed expert's queue, none elsewhere."""
    settings = FleetSettings(broker_url=redis_server.url, secret="s" * 32)
    mix = Mixture(run_from_dir(run)).connect(settings)
    try:
        sub = mix.submit(PROMPTS, Sampling(max_new=4))
    finally:
        mix.close()
    routed = _routed(run, PROMPTS)
    assert [sub.expert[r] for r in sub.rids] == list(routed)
    assert len(set(routed)) == 2, "the prompts should reach both experts for this test to mean something"
    for e in (0, 1):
        mine = [r for r, x in zip(sub.rids, routed, strict=True) if x == e]
        assert redis_client.llen(keys.expert_queue(e)) == len(mine)  # kombu's list for queue expert.<e>
        doorbells = [json.loads(m)["headers"]["argsrepr"] for m in redis_client.lrange(keys.expert_queue(e), 0, -1)]
        assert sorted(doorbells) == sorted(repr([e, r]) for r in mine)
        assert [x.decode() for x in redis_client.lrange(keys.serve_pending(e), 0, -1)] == mine


def test_killed_replica_request_completes_on_the_other_replica(run, tmp_path):
    """SIGKILL the replica generating a request: the submitter sees its heartbeats stop, resends, the other
    replica of the same expert answers; the killed one's doorbell, redelivered later, delivers nothing twice."""
    prompt = ["def main(argv):"]
    e = int(_routed(run, prompt)[0])
    settings = FleetSettings(heartbeat_s=0.5, visibility_timeout=4)
    with serving_fleet(run, [e], 2, settings, workdir=tmp_path) as fleet:
        mix = Mixture(run_from_dir(run)).connect(fleet.settings)
        sub = mix.submit(prompt, Sampling(max_new=6000, temperature=0.0))  # seconds of generation
        rid = sub.rids[0]
        assert wait_until(lambda: serving.claims(mix.client, [rid]), 60)
        victim = serving.claims(mix.client, [rid])[rid]
        fleet.kill_worker(victim.split("@")[0])
        (answer,) = mix.wait(sub, timeout=120, replica_timeout=5)
        assert answer["replica"] != victim.split("@")[0] and answer["replica"].startswith(f"expert{e}-r")
        assert answer["expert"] == e and answer["resent"] == 1 and len(answer["text"]) > 0
        # the killed replica's unacknowledged doorbell comes back after the visibility timeout; it finds
        # the request answered, and the answer stays the one delivered
        assert not wait_until(lambda: len(serving.delivered(mix.client, sub.id)) > 1, 8)
        assert serving.delivered(mix.client, sub.id) == [rid]
        mix.close()


def test_no_live_replica_is_a_clear_error_or_a_recorded_fallback(run, tmp_path):
    """Only the other expert has a replica: the prompt fails within the timeout naming its expert and
    the command that fixes it; with fallback it is answered by the next-best expert, recorded."""
    prompt = ["class Parser(object):"]
    e = int(_routed(run, prompt)[0])
    other = 1 - e
    with serving_fleet(run, [other], 1, FleetSettings(heartbeat_s=0.5), workdir=tmp_path) as fleet:
        mix = Mixture(run_from_dir(run)).connect(fleet.settings)
        with pytest.raises(ServeFailed, match=f"expert {e} has no live replica.*--expert {e}"):
            mix.wait(mix.submit(prompt, Sampling(max_new=4)), timeout=30, replica_timeout=1)
        (answer,) = mix.wait(mix.submit(prompt, Sampling(max_new=4)), timeout=30, replica_timeout=1, fallback=True)
        assert answer["expert"] == other and answer["fallback_from"] == e and answer["routed_expert"] == e
        mix.close()


@pytest.mark.e2e
def test_cli_generate_prompts_json_and_local(run, tmp_path):
    """`lmteam generate RUN --prompts FILE --json` on the embedded default: one JSON line per prompt,
    each from its routed expert's replica; --local answers in-process with the same routing."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS[:3]) + "\n")

    def gen(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", "generate", str(run), *args], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=180)

    res = gen("--prompts", "p.txt", "--json", "--max-new", "8")
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    assert [x["prompt"] for x in lines] == PROMPTS[:3]
    assert [x["expert"] for x in lines] == list(_routed(run, PROMPTS[:3]))
    assert all(x["replica"] == f"expert{x['expert']}-r0" and x["gen_ms"] > 0 and x["route_ms"] > 0 for x in lines)
    res = gen("--prompt", PROMPTS[0], "--local", "--max-new", "8")
    assert res.returncode == 0 and res.stdout.startswith(PROMPTS[0]) and "[expert" in res.stderr


def test_cli_worker_serve_refuses_a_wrong_expert_or_run(run, tmp_path, redis_server, redis_client):
    """A replica that could never answer does not start: out-of-range expert, unknown run, missing --expert."""
    def worker(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cli", "worker", "--role", "expert", *args, "--broker",
                               redis_server.url, "--secret", "s" * 32], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=60)

    res = worker("--serve", str(run), "--expert", "5")
    assert res.returncode == 2 and "--expert 5" in res.stderr and "experts 0..1" in res.stderr
    res = worker("--serve", "smalltalk-nope", "--expert", "0")
    assert res.returncode == 2 and "neither a SmallTalk run dir nor a job" in res.stderr
    res = worker("--serve", str(run))
    assert res.returncode == 2 and "--serve RUN and --expert I go together" in res.stderr
