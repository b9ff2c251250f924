"""Tests for pipeline.models.train: LM training, probe logits, distillation, perplexity, KL, FLOPs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.data import encode, windows
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.train import distill, mean_kl, perplexity, probe_logits, train_flops, train_lm

TINY = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
REPETITIVE = encode("abcdefgh ijklmnop qrstuvwx yz. " * 200)


def _model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(TINY)


def test_train_lm_reduces_loss():
    """Training on repetitive text cuts the loss well below its starting value."""
    calls: list[tuple[int, float]] = []
    losses = train_lm(_model(), REPETITIVE, steps=60, progress=lambda s, loss: calls.append((s, loss)))
    assert len(losses) == 60
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert calls[0][0] == 0 and calls[-1][0] == 59 and len(calls) == 7


def test_train_lm_deterministic():
    """Same seed and same initial weights give identical losses; the global RNG is untouched."""
    torch.manual_seed(123)
    before = torch.rand(1)
    a = train_lm(_model(), REPETITIVE, steps=5, seed=3)
    b = train_lm(_model(), REPETITIVE, steps=5, seed=3)
    c = train_lm(_model(), REPETITIVE, steps=5, seed=4)
    assert a == b and a != c
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), before)


def test_train_lm_rejects_short_text():
    """Text shorter than one window fails before training."""
    from pipeline.data import CorpusError

    with pytest.raises(CorpusError):
        train_lm(_model(), encode("tiny"), steps=1)


def test_probe_logits_shape_and_mode():
    """probe_logits returns float32 (n*block_size, V) matching the model and restores train mode."""
    model = _model()
    probe = windows(REPETITIVE, 16)[:5]
    out = probe_logits(model, probe)
    assert out.shape == (5 * 16, 256) and out.dtype == np.float32
    assert model.training
    expected = model.eval()(probe[:, :-1])[0].reshape(-1, 256).detach().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_distill_reduces_kl_to_teacher():
    """Distilling a fresh student towards a trained teacher's logits lowers their KL."""
    teacher = _model(1)
    train_lm(teacher, REPETITIVE, steps=40)
    probe = windows(REPETITIVE[-800:], 16)
    t_logits = probe_logits(teacher, probe)
    student = _model(2)
    before = mean_kl(t_logits, probe_logits(student, probe))
    losses = distill(student, probe, t_logits, steps=40)
    after = mean_kl(t_logits, probe_logits(student, probe))
    assert after < 0.5 * before
    assert losses[-1] < losses[0]


def test_distill_ignores_probe_targets():
    """The student never sees the probe's next tokens: changing the last column changes nothing."""
    probe = windows(REPETITIVE[-800:], 16)
    t_logits = probe_logits(_model(1), probe)
    other = probe.clone()
    other[:, -1] = 0
    a, b = _model(2), _model(2)
    assert distill(a, probe, t_logits, steps=3) == distill(b, other, t_logits, steps=3)


def test_distill_rejects_wrong_teacher_shape():
    """Teacher logits must have one row per probe input position."""
    probe = windows(REPETITIVE, 16)[:4]
    with pytest.raises(ValueError, match="shape"):
        distill(_model(), probe, np.zeros((3 * 16, 256), np.float32), steps=1)


def test_perplexity_uniform_model_is_vocab_size():
    """A model that outputs constant logits has perplexity 256."""
    model = _model()
    with torch.no_grad():
        for p in model.lm_head.parameters():
            p.zero_()  # zero tied matrix: every logit is 0, i.e. uniform
    assert perplexity(model, windows(REPETITIVE, 16)) == pytest.approx(256.0, rel=1e-4)


def test_perplexity_drops_after_training():
    """Training on the text lowers perplexity on it."""
    model = _model()
    ev = windows(REPETITIVE, 16)
    before = perplexity(model, ev)
    train_lm(model, REPETITIVE, steps=30)
    assert perplexity(model, ev) < before / 4


def test_mean_kl_zero_for_identical():
    """mean_kl(a, a) is exactly 0."""
    a = np.random.default_rng(0).normal(size=(10, 256)).astype(np.float32)
    assert mean_kl(a, a) == 0.0


def test_mean_kl_positive_and_stable():
    """KL of different logits is positive, asymmetric in general, and finite for huge logits."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 256)), rng.normal(size=(10, 256))
    assert mean_kl(a, b) > 0
    big = a * 1e4
    assert math.isfinite(mean_kl(big, b)) and mean_kl(big, b) > 0
    assert mean_kl(a + 5.0, a) == pytest.approx(0.0, abs=1e-12)  # shift invariance


def test_mean_kl_matches_torch():
    """mean_kl agrees with torch's kl_div on random logits."""
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(7, 256)), rng.normal(size=(7, 256))
    ref = torch.nn.functional.kl_div(
        torch.log_softmax(torch.tensor(q), -1),
        torch.log_softmax(torch.tensor(p), -1),
        log_target=True,
        reduction="batchmean",
    )
    assert mean_kl(p, q) == pytest.approx(ref.item(), rel=1e-9)


def test_train_flops_six_n_d():
    """train_flops is 6 * non-embedding params * tokens."""
    model = _model()
    assert train_flops(model, 1000) == 6 * model.num_params(non_embedding=True) * 1000
