"""Pure training and evaluation functions for federated logit distillation (FPLD).

A node runs train_lm() on its private shard and probe_logits() on the shared public probe set;
the aggregator averages those logits and distill()s a student towards them. Nothing here talks
to Celery or Redis, and each function is deterministic given its seed: random windows come from
numpy's seeded Generator, and dropout runs under a forked, seeded torch RNG so the caller's global
RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.data import windows
from pipeline.models.gpt import GPT

Progress = Callable[[int, float], None]
_EVAL_BATCH = 64


def _eval_batch(model: torch.nn.Module, width: int) -> int:
    # At a real vocabulary one batch's logits dominate memory: keep them near 256 MB of float32.
    return max(1, min(_EVAL_BATCH, 2**26 // max(1, width * model.config.vocab_size)))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _precision(model: torch.nn.Module) -> Iterator[None]:
    """bf16 autocast on CUDA (weights stay float32); plain float32 elsewhere."""
    dev = _device(model)
    if dev.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _fork_rng(model: torch.nn.Module):
    # Fork the RNG of the device the model is on too, so dropout on a GPU is seeded like on CPU.
    dev = _device(model)
    return torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else [])


def _lr_at(step: int, steps: int, lr: float) -> float:
    # Short linear warm-up, then cosine decay to lr/10: AdamW's early moment estimates are noisy,
    # and decaying makes short runs settle instead of ending mid-oscillation.
    warmup = min(10, steps // 10)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(model: GPT, lr: float) -> torch.optim.AdamW:
    # nanoGPT's recipe: decay matrices only; decaying biases and LayerNorm gains just hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


@dataclass
class Checkpointing:
    """Resume from `resume` (a step and an optimizer state_dict; the model is already restored)
    and call `save(step, optimizer)` every `every` steps."""

    every: int = 0
    save: Callable[[int, torch.optim.Optimizer], None] | None = None
    resume_step: int = 0
    resume_optimizer: dict | None = None


def _run(
    model: GPT,
    loss_fn: Callable[[np.random.Generator], torch.Tensor],
    steps: int,
    lr: float,
    seed: int,
    progress: Progress | None,
    log_every: int,
    ckpt: Checkpointing | None = None,
) -> list[float]:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    ckpt = ckpt or Checkpointing()
    opt = _optimizer(model, lr)
    if ckpt.resume_optimizer is not None:
        opt.load_state_dict(ckpt.resume_optimizer)
    losses: list[float] = []
    was_training = model.training
    model.train()
    with _fork_rng(model):
        for step in range(ckpt.resume_step, steps):
            # Randomness depends on (seed, step) only, so a run resumed at any step draws the
            # same batches (and dropout masks) as an uninterrupted one.
            rng = np.random.default_rng([seed, step])
            torch.manual_seed((seed * 1_000_003 + step) % 2**63)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            with _precision(model):
                loss = loss_fn(rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if progress is not None and (step % log_every == 0 or step == steps - 1):
                progress(step, losses[-1])
            if ckpt.save is not None and ckpt.every and (step + 1) % ckpt.every == 0 and step + 1 < steps:
                ckpt.save(step + 1, opt)
    model.train(was_training)
    return losses


def train_lm(
    model: GPT,
    tokens: np.ndarray,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Progress | None = None,
    log_every: int = 10,
    checkpointing: Checkpointing | None = None,
) -> list[float]:
    """Next-token training with AdamW on random windows of tokens; returns the loss of every step run.

    progress(step, loss) is called every log_every steps and after the last one; `checkpointing`
    makes the run resumable (see pipeline/models/train_state.py).
    """
    block_size, dev = model.config.block_size, _device(model)
    windows(tokens, block_size)  # fail fast with CorpusError if tokens cannot fill one window

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        batch = windows(tokens, block_size, n=batch_size, rng=rng).to(dev)  # (B, T+1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        return loss

    return _run(model, loss_fn, steps, lr, seed, progress, log_every, checkpointing)


def train_sequences(
    model: GPT,
    seqs: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Progress | None = None,
    log_every: int = 10,
    checkpointing: Checkpointing | None = None,
) -> list[float]:
    """As train_lm, but batches are random rows of a fixed set of sequences seqs (N, L+1), L <= block_size.

    For models that must see whole sequences of their own set (SmallTalk's experts train on the
    sequences routed to them, its routers on those sequences' prefixes), not windows of a stream.
    """
    if seqs.ndim != 2 or len(seqs) == 0 or seqs.shape[1] < 2:
        raise ValueError(f"need a non-empty (N, L+1) tensor of sequences, got shape {tuple(seqs.shape)}")

    dev = _device(model)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        batch = seqs[torch.from_numpy(rng.integers(0, len(seqs), size=batch_size))].to(dev)  # (B, L+1)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        return loss

    return _run(model, loss_fn, steps, lr, seed, progress, log_every, checkpointing)


@torch.no_grad()
def probe_logits(model: GPT, probe: torch.Tensor) -> np.ndarray:
    """Logits at every input position of probe[:, :-1], float32 of shape (n * block_size, vocab)."""
    was_training, dev = model.training, _device(model)
    model.eval()
    out = []
    step = _eval_batch(model, probe.shape[1])
    for i in range(0, len(probe), step):
        with _precision(model):
            logits, _ = model(probe[i : i + step, :-1].to(dev))  # (b, T, V)
        out.append(logits.reshape(-1, logits.size(-1)).float().cpu().numpy())  # (b*T, V)
    model.train(was_training)
    if not out:
        return np.zeros((0, model.config.vocab_size), dtype=np.float32)
    return np.concatenate(out)


def distill(
    model: GPT,
    probe: torch.Tensor,
    teacher_logits: np.ndarray,
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    temperature: float = 1.0,
    progress: Progress | None = None,
    log_every: int = 10,
) -> list[float]:
    """Train model to match teacher_logits on the probe inputs; returns the per-step loss.

    Minimises mean over positions of KL(softmax(teacher/t) || softmax(student/t)) * t^2. The
    student sees only probe[:, :-1]; the probe's own next tokens are never used, so the teacher's
    soft labels are the only supervision (that is what keeps the nodes' private text private).
    The t^2 factor (Hinton et al. 2015) keeps gradient size independent of the temperature.
    """
    n, width = probe.shape
    T, V = width - 1, model.config.vocab_size
    if teacher_logits.shape != (n * T, V):
        raise ValueError(f"teacher_logits has shape {teacher_logits.shape}, expected {(n * T, V)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dev = _device(model)
    inputs = probe[:, :-1].to(dev)  # (n, T); targets deliberately dropped
    teacher = torch.from_numpy(np.asarray(teacher_logits, dtype=np.float32)).view(n, T, V).to(dev)  # (n, T, V)
    # Teacher log-probs are fixed, so compute them once rather than every step.
    teacher_logp = F.log_softmax(teacher / temperature, dim=-1)

    def loss_fn(rng: np.random.Generator) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, n, size=batch_size)).to(dev)
        logits, _ = model(inputs[idx])  # (B, T, V)
        student_logp = F.log_softmax(logits.float() / temperature, dim=-1).view(-1, V)  # (B*T, V)
        kl = F.kl_div(student_logp, teacher_logp[idx].view(-1, V), log_target=True, reduction="batchmean")
        return kl * temperature**2

    return _run(model, loss_fn, steps, lr, seed, progress, log_every)


@torch.no_grad()
def perplexity(model: GPT, eval_windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over all positions of eval_windows (N, block_size+1)."""
    was_training, dev = model.training, _device(model)
    model.eval()
    total, count = 0.0, 0
    step = _eval_batch(model, eval_windows.shape[1])
    for i in range(0, len(eval_windows), step):
        batch = eval_windows[i : i + step].to(dev)
        with _precision(model):
            logits, _ = model(batch[:, :-1])  # (b, T, V)
        total += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()  # (b*T, V) vs (b*T,)
        count += batch[:, 1:].numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity needs at least one eval window")
    return math.exp(total / count)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)  # shift so exp() cannot overflow
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean over rows of KL(softmax(p) || softmax(q)), the last axis being the vocabulary.

    Computed in float64 in row chunks, so probe-sized inputs do not need several float64 copies.
    """
    p_logits, q_logits = np.asarray(p_logits), np.asarray(q_logits)
    if p_logits.shape != q_logits.shape:
        raise ValueError(f"shape mismatch: {p_logits.shape} vs {q_logits.shape}")
    V = p_logits.shape[-1]
    p2, q2 = p_logits.reshape(-1, V), q_logits.reshape(-1, V)  # (rows, V)
    if len(p2) == 0:
        raise ValueError("mean_kl needs at least one row")
    total = 0.0
    for i in range(0, len(p2), 8192):
        lp = _log_softmax(p2[i : i + 8192].astype(np.float64))
        lq = _log_softmax(q2[i : i + 8192].astype(np.float64))
        total += float((np.exp(lp) * (lp - lq)).sum())
    return total / len(p2)


def train_flops(model: GPT, tokens_seen: float) -> float:
    """Approximate training FLOPs as 6 * N * D (Kaplan et al. 2020; nanoGPT's estimate_mfu).

    N is the parameter count without position embeddings (the tied token embedding counts once,
    as the lm_head matmul); D is tokens processed. Forward costs ~2N FLOPs per token, backward
    ~4N. The attention-score term (12 * n_layer * n_embd * block_size per token) is left out:
    with the default GPTConfig it would add about 8%.
    """
    return 6.0 * model.num_params(non_embedding=True) * float(tokens_seen)
