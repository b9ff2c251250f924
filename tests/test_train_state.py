"""Resumable training: a run interrupted and resumed from its checkpoint equals an uninterrupted one."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.train import Checkpointing, train_lm
from pipeline.models.train_state import load_state, save_state, state_from_bytes, state_to_bytes

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
TOKENS = np.frombuffer(b"the quick brown fox jumps over the lazy dog. " * 40, dtype=np.uint8)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG)


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    """Stop after 10 of 20 steps (as a killed worker would), resume from disk: identical weights."""
    full = _model()
    train_lm(full, TOKENS, steps=20, batch_size=4, seed=3)

    path = tmp_path / "ckpt.safetensors"
    first = _model()
    saved = []

    def save(step, opt):
        save_state(path, step, first, opt)
        saved.append(step)
        if step == 10:
            raise KeyboardInterrupt  # the process dies right after its checkpoint

    try:
        train_lm(first, TOKENS, steps=20, batch_size=4, seed=3, checkpointing=Checkpointing(every=5, save=save))
    except KeyboardInterrupt:
        pass
    assert saved == [5, 10]

    state = load_state(path)
    assert state.step == 10
    losses = train_lm(state.model, TOKENS, steps=20, batch_size=4, seed=3,
                      checkpointing=Checkpointing(resume_step=state.step, resume_optimizer=state.optimizer))
    assert len(losses) == 10
    for a, b in zip(full.state_dict().values(), state.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_train_state_bytes_roundtrip_and_no_pickle(tmp_path):
    """The state is safetensors (JSON header + raw tensors) and round-trips."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long))[0].sum().backward()
    opt.step()
    blob = state_to_bytes(7, model, opt)
    assert blob[8:9] == b"{"  # safetensors header, not a pickle stream
    state = state_from_bytes(blob)
    assert state.step == 7 and set(state.optimizer["state"]) == set(opt.state_dict()["state"])
    assert load_state(tmp_path / "missing") is None


def test_train_lm_accepts_63_bit_seeds():
    """Seeds derived from job ids are 63-bit; per-step reseeding must not overflow."""
    train_lm(_model(), TOKENS, steps=2, batch_size=2, seed=2**63 - 1)
