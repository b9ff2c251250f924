"""The work of SmallTalk LM's tasks as plain functions: train a router, score a shard, train an expert.

Celery tasks (workers/smalltalk.py) fetch inputs from the store, call these and write the
outputs; the bench calls them in-process. Seeds depend on (cfg.seed, role, index) and never on the
job id, so a resumed run (a new job) trains exactly what the first one would have.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from broker.wire.codec import decode_logits, encode_logits
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.lm import build_model, load_state_bytes
from pipeline.models.train import Checkpointing, train_sequences
from pipeline.seeds import derive_seed
from pipeline.smalltalk.balanced_assignment import balanced_assignment, random_balanced
from pipeline.smalltalk.config import DENSE, SmallTalkConfig
from pipeline.smalltalk.routing import prefix_losses

Progress = Callable[[int, float], None]
# Losses are mean nats per token, clipped to [-SCORE_CLIP, SCORE_CLIP] on the wire: an untrained
# byte model scores ln(256) = 5.5 (a 49k-token one ln(49152) = 10.8), so 16 leaves room and 16 bits
# give a step of 0.0005 nats.
SCORE_CLIP = 16.0


def new_router(cfg: SmallTalkConfig, e: int) -> GPT:
    """Router e before EM: distinct seeds, so the routers start apart as well as on different data."""
    torch.manual_seed(derive_seed(cfg.seed, "router-init", e))
    return GPT(GPTConfig.from_dict(cfg.router_model()))


def new_expert(cfg: SmallTalkConfig, device: str = "cpu") -> torch.nn.Module:
    """Every expert and the dense model start from the same weights (a seeded built-in model, or
    the HF model with the same seeded LoRA adapters): only their data differs."""
    return build_model(replace(cfg.expert_spec(), seed=derive_seed(cfg.seed, "expert-init")), device)


def tokens_per_param(cfg: SmallTalkConfig) -> float:
    """Training tokens one expert sees per (non-embedding) parameter."""
    return cfg.expert_steps * cfg.batch_size * cfg.block_size / new_expert(cfg).num_params(non_embedding=True)


# Below this many training tokens per parameter the bench's experts lost to the dense model of the
# same FLOPs (bench/smalltalk.py: +23% at ~150, a tie at ~300, -3.7% at ~590).
CAPACITY_BOUND_TOKENS_PER_PARAM = 500


def expert_from_bytes(cfg: SmallTalkConfig, data: bytes, device: str = "cpu") -> torch.nn.Module:
    """An expert (or the dense model) from the bytes `state_bytes` wrote of it."""
    return load_state_bytes(cfg.expert_spec(), data, device)


def train_router(cfg: SmallTalkConfig, router: GPT, seqs: torch.Tensor, rnd: int, e: int,
                 progress: Progress | None = None) -> list[float]:
    """One EM M-step for router e: next-token loss on the prefixes of its sequences only (Eq. 9)."""
    if len(seqs) == 0:
        return []  # an expert the balanced rule left empty keeps its router (only possible if N < E)
    return train_sequences(router, seqs[:, : cfg.prefix], steps=cfg.router_steps, batch_size=cfg.batch_size,
                           lr=cfg.router_lr, seed=derive_seed(cfg.seed, "router", rnd, e), progress=progress)


def score(cfg: SmallTalkConfig, routers: list[GPT], seqs: torch.Tensor) -> np.ndarray:
    """(n, E) prefix losses of every router on every sequence (the E-step's evidence)."""
    return prefix_losses(routers, seqs, cfg.prefix)


def encode_scores(losses: np.ndarray, cfg: SmallTalkConfig, *, secret: bytes, job: str, rnd: int,
                  shard: str) -> bytes:
    """Losses as a signed codec payload: 16 bits a score by default, half of float32."""
    if cfg.score_bits == 32:
        return encode_logits(losses, secret=secret, job=job, round=rnd, node=shard, bits=32)
    return encode_logits(losses, secret=secret, job=job, round=rnd, node=shard, bits=cfg.score_bits,
                         clip=SCORE_CLIP)


def decode_scores(payload: bytes, cfg: SmallTalkConfig, *, secret: bytes, job: str, rnd: int, shard: str,
                  rows: int, max_bytes: int) -> np.ndarray:
    """Verify and decode a shard's losses; raises broker.wire.codec.PayloadError on anything wrong."""
    x, _ = decode_logits(payload, secret=secret, max_bytes=max_bytes, expect_shape=(rows, cfg.experts),
                         expect_job=job, expect_round=rnd, expect_node=shard)
    return x


def assign(cfg: SmallTalkConfig, losses: np.ndarray) -> np.ndarray:
    """The E-step: the paper's balanced assignment on the routers' prefix losses."""
    return balanced_assignment(losses, order=cfg.order)  # type: ignore[arg-type]


def initial_assignment(cfg: SmallTalkConfig, n: int) -> np.ndarray:
    return random_balanced(n, cfg.experts, derive_seed(cfg.seed, "em-init"))


def expert_batch(cfg: SmallTalkConfig, name: str) -> int:
    return cfg.dense_batch if name == DENSE else cfg.batch_size


def expert_steps(cfg: SmallTalkConfig, name: str) -> int:
    return cfg.dense_steps if name == DENSE else cfg.expert_steps


def train_expert(cfg: SmallTalkConfig, name: str, model: torch.nn.Module, seqs: torch.Tensor,
                 checkpointing: Checkpointing | None = None, progress: Progress | None = None) -> list[float]:
    """Plain LM training of expert `name` (or the dense model) on its sequences; resumable."""
    return train_sequences(model, seqs, steps=expert_steps(cfg, name), batch_size=expert_batch(cfg, name),
                           lr=cfg.lr, seed=derive_seed(cfg.seed, "expert", name), progress=progress,
                           checkpointing=checkpointing)


def local_em(cfg: SmallTalkConfig, pool: torch.Tensor, em_sets: list[np.ndarray],
             log: Callable[[str], None] | None = None) -> tuple[list[GPT], np.ndarray, list[dict]]:
    """Stage 1 in one process (bench ablations, tests): the routers and the pool's balanced assignment.

    Same functions, seeds and order as the fleet's tasks; returns (routers, assignment of the
    whole pool, per-round stats).
    """
    routers = [new_router(cfg, e) for e in range(cfg.experts)]
    current = initial_assignment(cfg, len(em_sets[0]))
    rounds: list[dict] = []
    for rnd in range(cfg.em_rounds):
        seqs = pool[torch.from_numpy(em_sets[rnd])]
        for e, router in enumerate(routers):
            train_router(cfg, router, seqs[torch.from_numpy(np.nonzero(current == e)[0])], rnd, e)
        nxt = em_sets[rnd + 1] if rnd + 1 < cfg.em_rounds else np.arange(len(pool))
        losses = score(cfg, routers, pool[torch.from_numpy(nxt)])
        current = assign(cfg, losses)
        stats = {"round": rnd, "scored": len(nxt), "mean_best_loss": float(losses.min(axis=1).mean()),
                 "argmin_kept": float((current == losses.argmin(axis=1)).mean())}
        rounds.append(stats)
        if log:
            log(f"EM round {rnd + 1}/{cfg.em_rounds}: mean best prefix loss {stats['mean_best_loss']:.3f}, "
                f"{100 * stats['argmin_kept']:.0f}% at their best router")
    return routers, current, rounds
