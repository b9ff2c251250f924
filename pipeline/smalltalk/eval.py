"""What a SmallTalk run is judged by: held-out perplexity of the routed mixture and of the dense
model, cluster purity against the source domains, and the FLOPs of training and of routing.

Pure functions of models and tensors (no fleet): `lmteam smalltalk eval`, the driver's report and
the bench all call these.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.models.gpt import GPT
from pipeline.models.train import train_flops
from pipeline.smalltalk.config import SmallTalkConfig
from pipeline.smalltalk.routing import prefix_losses, route

_BATCH = 64


@torch.no_grad()
def token_nll(model: GPT, seqs: torch.Tensor) -> np.ndarray:
    """Next-token loss (nats) at every position of seqs (N, T+1): float64 (N, T)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(seqs), _BATCH):
        x = seqs[i : i + _BATCH]
        logits, _ = model(x[:, :-1])  # (b, T, V)
        out.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").double().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, seqs.shape[1] - 1))


def _ppl(nll: np.ndarray) -> float:
    return float(math.exp(nll.mean())) if nll.size else float("nan")


def ppl_per_byte(nll: np.ndarray, seqs: torch.Tensor, byte_lengths: np.ndarray) -> float:
    """exp(total nats / total bytes) of the predicted tokens: perplexity per UTF-8 byte.

    nll is (N, T) per-token losses on seqs (N, T+1); the targets are seqs[:, 1:]. Per-token
    perplexity depends on how much text a token holds, so only this compares across tokenizers
    (a byte model's per-token perplexity is already per byte)."""
    targets = np.asarray(seqs[:, 1:], dtype=np.int64)
    nbytes = int(np.asarray(byte_lengths)[targets].sum())
    if nll.shape != targets.shape or nbytes == 0:
        raise ValueError(f"need (N, T) losses for (N, T+1) sequences holding text, got {nll.shape} and {targets.shape}")
    return float(math.exp(float(np.sum(nll)) / nbytes))


def ppl_ratio_ci(nll_a: np.ndarray, nll_b: np.ndarray, level: float = 0.95, draws: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap over sequences: a confidence interval for ppl(a) / ppl(b) - 1.

    nll_a and nll_b are per-token losses (N, T) of two models on the same held-out sequences.
    Resampling whole sequences keeps the correlation between tokens of one sequence, so the
    interval answers "would another held-out sample of this size flip the sign?". It says
    nothing about training noise (seeds); that needs reruns.
    """
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"need two (N, T) loss arrays of one shape, got {a.shape} and {b.shape}")
    diff = a.mean(axis=1) - b.mean(axis=1)  # per sequence; every sequence has T tokens
    idx = np.random.default_rng(seed).integers(0, len(diff), size=(draws, len(diff)))
    ratios = np.exp(diff[idx].mean(axis=1)) - 1.0
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def evaluate_mixture(experts: list[GPT], routers: list[GPT], seqs: torch.Tensor, labels: np.ndarray,
                     domains: list[str], prefix: int, dense: GPT | None = None,
                     routing: np.ndarray | None = None, byte_lengths: np.ndarray | None = None) -> dict:
    """Perplexity of prefix-routed experts (one expert per sequence) and of the dense model.

    `ppl` scores every token, the routing prefix too (as the paper appears to); `ppl_after_prefix`
    only tokens the router never saw, which removes the at most log2(E) bits routing could leak.
    `oracle_ppl` routes each sequence to the expert best on the whole sequence: a bound on routing.
    Pass `routing` (an expert per sequence) to evaluate another router (random, TF-IDF), and
    `byte_lengths` (the tokenizer's, by id) to get perplexity per byte as well.
    """
    if routing is None:
        routing = route(prefix_losses(routers, seqs, prefix))
    per_expert = np.stack([token_nll(m, seqs) for m in experts])  # (E, N, T)
    n = len(seqs)
    mixed = per_expert[routing, np.arange(n)]  # (N, T): each sequence under its routed expert
    oracle = per_expert[per_expert.sum(axis=2).argmin(axis=0), np.arange(n)]
    after = slice(prefix - 1, None)  # targets t >= M-1 are tokens after the prefix
    out: dict = {
        "sequences": n, "prefix": prefix,
        "ppl": _ppl(mixed), "ppl_after_prefix": _ppl(mixed[:, after]),
        "oracle_ppl": _ppl(oracle),
        "routed_to_best": float((routing == per_expert.sum(axis=2).argmin(axis=0)).mean()),
        "load": np.bincount(routing, minlength=len(experts)).tolist(),
        "per_domain": {},
    }
    dense_nll = token_nll(dense, seqs) if dense is not None else None
    if dense_nll is not None:
        out["dense_ppl"] = _ppl(dense_nll)
        out["dense_ppl_after_prefix"] = _ppl(dense_nll[:, after])
        out["ppl_change"] = out["ppl"] / out["dense_ppl"] - 1.0
        out["ppl_change_ci95"] = list(ppl_ratio_ci(mixed, dense_nll))
    if byte_lengths is not None:
        out["bytes_per_token"] = float(np.asarray(byte_lengths)[np.asarray(seqs[:, 1:])].mean())
        out["ppl_per_byte"] = ppl_per_byte(mixed, seqs, byte_lengths)
        if dense_nll is not None:
            out["dense_ppl_per_byte"] = ppl_per_byte(dense_nll, seqs, byte_lengths)
    for d, name in enumerate(domains):
        rows = labels == d
        entry = {"sequences": int(rows.sum()), "ppl": _ppl(mixed[rows]),
                 "routed": np.bincount(routing[rows], minlength=len(experts)).tolist()}
        if dense_nll is not None:
            entry["dense_ppl"] = _ppl(dense_nll[rows])
        out["per_domain"][name] = entry
    return out


def cluster_stats(assignment: np.ndarray, labels: np.ndarray, domains: list[str], experts: int) -> dict:
    """Per cluster: size, sequences per source domain, dominant domain and purity (its share).

    Overall purity = sum over clusters of the dominant domain's count / all sequences (1.0 means
    the clusters are exactly the domains; 1/D is what a random split gets).
    """
    assignment, labels = np.asarray(assignment), np.asarray(labels)
    clusters, dominant_total = [], 0
    for e in range(experts):
        counts = np.bincount(labels[assignment == e], minlength=len(domains))
        size = int(counts.sum())
        top = int(counts.argmax()) if size else -1
        dominant_total += int(counts.max()) if size else 0
        clusters.append({"expert": e, "size": size, "domains": dict(zip(domains, counts.tolist(), strict=True)),
                         "dominant": domains[top] if size else None,
                         "purity": float(counts.max() / size) if size else 0.0})
    total = int(sum(c["size"] for c in clusters))
    return {"clusters": clusters, "purity": dominant_total / total if total else 0.0}


def flops(cfg: SmallTalkConfig, expert: GPT, router: GPT, scored: int) -> dict:
    """Training FLOPs of the mixture (experts + router EM + scoring) and of the dense model, and the
    inference cost of routing as a fraction of running one expert (6ND training, 2N per token forward)."""
    expert_tokens = cfg.expert_steps * cfg.batch_size * cfg.block_size
    experts = cfg.experts * train_flops(expert, expert_tokens)
    routers = cfg.experts * train_flops(router, cfg.em_rounds * cfg.router_steps * cfg.batch_size * (cfg.prefix - 1))
    n_router = router.num_params(non_embedding=True)
    scoring = 2.0 * n_router * (cfg.prefix - 1) * cfg.experts * scored  # every router on every scored prefix
    dense = train_flops(expert, cfg.dense_steps * cfg.dense_batch * cfg.block_size)
    route_fwd = 2.0 * n_router * (cfg.prefix - 1) * cfg.experts
    expert_fwd = 2.0 * expert.num_params(non_embedding=True) * cfg.block_size
    mixture = experts + routers + scoring
    return {
        "expert_params": expert.num_params(non_embedding=True),
        "router_params": n_router,
        "router_to_expert_params": n_router / expert.num_params(non_embedding=True),
        "train_flops_experts": experts, "train_flops_routers": routers, "train_flops_scoring": scoring,
        "train_flops_mixture": mixture, "train_flops_dense": dense,
        "train_overhead_vs_dense": mixture / dense - 1.0 if dense else None,
        "inference_flops_expert": expert_fwd, "inference_flops_routing": route_fwd,
        "routing_cost_fraction": route_fwd / expert_fwd,
    }
