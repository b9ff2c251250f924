"""SmallTalk LM pieces without a fleet: config, data, score payloads, in-process EM, metrics, CLI errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from broker.wire.codec import PayloadError
from pipeline.data import windows_from_bytes, windows_to_bytes
from pipeline.smalltalk.cli import standalone
from pipeline.smalltalk.config import SmallTalkConfig, SmallTalkConfigError
from pipeline.smalltalk.data import (
    RunDir,
    assignment_from_bytes,
    assignment_to_bytes,
    load_domains,
    prepare_data,
)
from pipeline.smalltalk.eval import evaluate_mixture, flops
from pipeline.smalltalk.steps import (
    decode_scores,
    encode_scores,
    local_em,
    new_expert,
    new_router,
    train_expert,
)
from tests.fleet import tiny_corpus

SECRET = b"test-secret"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), domains=3, size=20_000)


def tiny(corpus: list[str], **overrides) -> SmallTalkConfig:
    base = dict(experts=3, prefix=12, em_rounds=2, router_seqs=120, router_steps=10, expert_steps=10,
                block_size=24, n_layer=1, n_head=2, n_embd=16, router_embd=8, eval_seqs=30, corpus=corpus)
    base.update(overrides)
    return SmallTalkConfig(**base).validate()


def test_config_round_trips_and_is_strict():
    cfg = SmallTalkConfig(experts=8, prefix=64, corpus=["a.txt"])
    assert SmallTalkConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.dense_steps == 8 * cfg.expert_steps and cfg.dense_batch == cfg.batch_size
    paper = SmallTalkConfig(dense_match="batch")
    assert paper.dense_steps == paper.expert_steps and paper.dense_batch == 4 * paper.batch_size
    with pytest.raises(SmallTalkConfigError, match="unknown SmallTalk option"):
        SmallTalkConfig.from_dict({**cfg.to_dict(), "expertz": 3})
    with pytest.raises(SmallTalkConfigError, match="must be int"):
        SmallTalkConfig.from_dict({**cfg.to_dict(), "experts": "4"})
    with pytest.raises(SmallTalkConfigError, match="must be int"):
        SmallTalkConfig.from_dict({**cfg.to_dict(), "prefix": True})
    with pytest.raises(SmallTalkConfigError, match="--prefix must be between 2 and --block-size"):
        SmallTalkConfig(prefix=200, block_size=128).validate()
    with pytest.raises(SmallTalkConfigError, match="--experts must be at least 1"):
        SmallTalkConfig(experts=0).validate()
    with pytest.raises(SmallTalkConfigError, match="--order"):
        SmallTalkConfig(order="worst").validate()


def test_data_is_deterministic_with_fresh_em_sets(corpus):
    cfg = tiny(corpus)
    a, b = prepare_data(cfg, load_domains(cfg)), prepare_data(cfg, load_domains(cfg))
    assert torch.equal(a.train, b.train) and a.fingerprint() == b.fingerprint()
    assert len(a.em_sets) == 2 and not set(a.em_sets[0]) & set(a.em_sets[1])  # fresh sequences each round
    assert len(a.round_set(2)) == len(a.train)  # the last scoring covers the whole pool
    assert sorted(set(a.labels.tolist())) == [0, 1, 2] and np.bincount(a.eval_labels).tolist() == [10, 10, 10]
    assert torch.equal(windows_from_bytes(windows_to_bytes(a.train), cfg.block_size), a.train)
    assign = np.array([-1, 0, 2, 1])
    assert np.array_equal(assignment_from_bytes(assignment_to_bytes(assign), 4), assign)
    other = prepare_data(tiny(corpus, seed=1), load_domains(cfg))
    assert other.fingerprint() != a.fingerprint()


def test_score_payload_round_trip_and_rejection():
    cfg = SmallTalkConfig(experts=4)
    losses = np.random.default_rng(0).uniform(0.5, 6.0, size=(1000, 4)).astype(np.float32)
    wire = encode_scores(losses, cfg, secret=SECRET, job="j", rnd=1, shard="score0")
    assert len(wire) < losses.size * 4 * 0.6  # 16 bits a score, plus a small header
    back = decode_scores(wire, cfg, secret=SECRET, job="j", rnd=1, shard="score0", rows=1000, max_bytes=10**6)
    assert np.abs(back - losses).max() < 1e-3
    assert np.array_equal(back.argmin(axis=1), losses.argmin(axis=1))
    with pytest.raises(PayloadError, match="signature"):
        decode_scores(wire, cfg, secret=b"other", job="j", rnd=1, shard="score0", rows=1000, max_bytes=10**6)
    with pytest.raises(PayloadError, match="shape"):
        decode_scores(wire, cfg, secret=SECRET, job="j", rnd=1, shard="score0", rows=999, max_bytes=10**6)
    with pytest.raises(PayloadError, match="round"):
        decode_scores(wire, cfg, secret=SECRET, job="j", rnd=2, shard="score0", rows=1000, max_bytes=10**6)
    raw = SmallTalkConfig(experts=4, score_bits=32)
    exact = decode_scores(encode_scores(losses, raw, secret=SECRET, job="j", rnd=0, shard="s"), raw,
                          secret=SECRET, job="j", rnd=0, shard="s", rows=1000, max_bytes=10**6)
    assert np.array_equal(exact, losses)


def test_local_em_gives_a_balanced_assignment_of_the_pool(corpus):
    cfg = tiny(corpus)
    data = prepare_data(cfg, load_domains(cfg))
    routers, assign, rounds = local_em(cfg, data.train, data.em_sets)
    assert len(routers) == 3 and assign.shape == (len(data.train),)
    sizes = np.bincount(assign, minlength=3)
    assert sizes.max() - sizes.min() <= 1
    assert [r["round"] for r in rounds] == [0, 1] and rounds[-1]["scored"] == len(data.train)


def test_mixture_of_identical_experts_is_the_dense_model(corpus):
    cfg = tiny(corpus)
    data = prepare_data(cfg, load_domains(cfg))
    expert = new_expert(cfg)
    routers = [new_router(cfg, e) for e in range(cfg.experts)]
    ev = evaluate_mixture([expert] * 3, routers, data.eval, data.eval_labels, data.domains, cfg.prefix, expert)
    assert ev["ppl"] == pytest.approx(ev["dense_ppl"]) and ev["oracle_ppl"] == pytest.approx(ev["ppl"])
    assert ev["ppl_change_ci95"] == [0.0, 0.0]
    assert sum(ev["load"]) == len(data.eval) and set(ev["per_domain"]) == set(data.domains)


def test_flops_accounting():
    cfg = SmallTalkConfig(experts=4, prefix=32, block_size=128)
    expert, router = new_expert(cfg), new_router(cfg, 0)
    f = flops(cfg, expert, router, scored=10_000)
    assert f["train_flops_experts"] == pytest.approx(f["train_flops_dense"])  # E x steps at the same batch
    assert f["train_flops_mixture"] > f["train_flops_dense"]
    n_r, n_e = router.num_params(non_embedding=True), expert.num_params(non_embedding=True)
    assert f["routing_cost_fraction"] == pytest.approx(4 * n_r * 31 / (n_e * 128))


def test_run_dir_assignments_round_trip(tmp_path):
    run = RunDir(tmp_path / "r")
    run.save_assignments({0: np.array([0, 1, -1]), 2: np.array([2, 2, 0])})
    got = run.load_assignments()
    assert sorted(got) == [0, 2] and got[0].tolist() == [0, 1, -1]
    assert run.update_state(a=1) == {"a": 1} and run.update_state(b=2) == {"a": 1, "b": 2}


@pytest.mark.parametrize("args, message", [
    (["smalltalk", "train", "--prefix", "300"], "--prefix must be between 2 and --block-size"),
    (["smalltalk", "train", "--corpus", "missing.txt"], "missing.txt does not exist"),
    (["smalltalk", "train", "--experts", "0"], "--experts must be at least 1"),
    (["smalltalk", "eval", "no-such-run"], "is not a SmallTalk run dir"),
    (["generate", "no-such-run", "--prompt", "hi"], "is not a SmallTalk run dir"),
])
def test_cli_bad_input_is_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMTEAM_BROKER_URL", raising=False)
    res = CliRunner().invoke(standalone, args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_expert_training_resumed_from_a_checkpoint_matches_an_uninterrupted_run(corpus):
    """What a redelivered expert task does: state from the last checkpoint blob, same batches after it."""
    from pipeline.models.train import Checkpointing
    from pipeline.models.train_state import state_from_bytes, state_to_bytes

    cfg = tiny(corpus, expert_steps=30, checkpoint_every=10)
    seqs = prepare_data(cfg, load_domains(cfg)).train[:200]
    blobs: dict[int, bytes] = {}
    full = new_expert(cfg)
    train_expert(cfg, "1", full, seqs, checkpointing=Checkpointing(
        every=10, save=lambda step, opt: blobs.__setitem__(step, state_to_bytes(step, full, opt))))
    assert sorted(blobs) == [10, 20]
    state = state_from_bytes(blobs[20])
    losses = train_expert(cfg, "1", state.model, seqs, checkpointing=Checkpointing(
        resume_step=state.step, resume_optimizer=state.optimizer))
    assert len(losses) == 10  # only the steps after the checkpoint
    for a, b in zip(full.state_dict().values(), state.model.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_a_run_too_short_for_the_mixture_to_win_says_so_before_and_after_training():
    """A newcomer's first run (the defaults) must not read as the method failing."""
    from pipeline.smalltalk.cli import _say_after, _say_what_it_will_show

    said: list[str] = []
    short = _say_what_it_will_show(SmallTalkConfig().validate(), said.append)
    assert short is not None and short < 50 and len(said) == 1
    assert "not that it wins" in said[0] and "worse than the dense model's" in said[0] and "--help" in said[0]
    long_run = SmallTalkConfig(n_layer=1, n_head=2, n_embd=32, expert_steps=6000).validate()  # bench/smalltalk.py's
    assert _say_what_it_will_show(long_run, said.append) is None and len(said) == 1
    runner = CliRunner()
    with runner.isolation() as (out, _, _):
        _say_after({"summary": {"ppl_change": 0.6}}, short)
        _say_after({"summary": {"ppl_change": -0.04}}, short)
        _say_after({"summary": {"ppl_change": 0.6}}, None)
    assert out.getvalue().decode().count("As noted before training") == 1
