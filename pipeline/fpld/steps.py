"""The two halves of an FPLD round as plain functions: what a node does, what the aggregator does.

Celery tasks (workers/fpld.py) only fetch inputs from the store, call these, and write outputs.
Paper: Dubey & Huo, "Federated probe-logit distillation", arXiv 2605.09986, Algorithm 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from broker.wire.codec import encode_logits
from broker.wire.sparse import encode_sparse_logits
from broker.wire.weights import encode_weights
from pipeline.fpld.config import FPLDConfig
from pipeline.models.lm import build_model, load_state_bytes, state_bytes, with_tensors
from pipeline.models.train import Checkpointing, distill, mean_kl, perplexity, probe_logits, train_lm
from pipeline.models.train_state import load_state, save_state
from pipeline.seeds import derive_seed

Progress = Callable[[int, float], None]


def initial_student(cfg: FPLDConfig) -> torch.nn.Module:
    """The shared base P^(0): the built-in model at a seeded random init, or the pretrained HF model
    (with fresh, seeded LoRA adapters when --lora-rank is set), identical everywhere."""
    return build_model(cfg.model_spec())


def encode_probe_logits(cfg: FPLDConfig, logits: np.ndarray, *, secret: bytes, job: str, rnd: int,
                        node: str) -> bytes:
    """The node's uplink in the job's payload scheme (dense B-bit, or sparse top-k)."""
    dither = derive_seed(job, rnd, node, "dither") if cfg.dither else None
    if cfg.payload == "sparse":
        return encode_sparse_logits(logits, secret=secret, job=job, round=rnd, node=node, k=cfg.topk,
                                    bits=cfg.bits, dither_seed=dither)
    if cfg.bits != 32:
        # Logits are defined up to a shift per position: put each row's top logit at +clip, so the
        # grid spans the 2*clip nats below it (a token further down has under e^-2L of the top
        # token's probability). Clipping raw logits to [-L, L] would cut a large model's top
        # logits: SmolLM2's 8-bit teacher was 0.97 nats from float32 that way.
        logits = logits - logits.max(axis=1, keepdims=True) + cfg.clip
    return encode_logits(logits, secret=secret, job=job, round=rnd, node=node, bits=cfg.bits, clip=cfg.clip,
                         dither_seed=dither, compress=cfg.compress)


@dataclass
class NodeOutput:
    payload: bytes
    full_logits: np.ndarray | None
    metrics: dict[str, float] = field(default_factory=dict)


def node_round(cfg: FPLDConfig, *, job: str, rnd: int, node: str, student: bytes, private: np.ndarray,
               probe: torch.Tensor, eval_windows: torch.Tensor | None, secret: bytes,
               progress: Progress | None = None, checkpoint: Path | None = None,
               device: str = "cpu") -> NodeOutput:
    """Fine-tune the broadcast student on private text, then send B-bit logits on the probe set
    (FedAvg: send the fine-tuned weights instead, signed, through the same round).

    With `checkpoint` (a node-local file), local training saves its state every
    cfg.checkpoint_every steps and a redelivered task resumes from it.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    spec = cfg.model_spec()

    def from_bytes(data: bytes) -> torch.nn.Module:
        return load_state_bytes(spec, data, device)

    state = load_state(checkpoint, from_bytes) if checkpoint else None
    model = state.model if state else from_bytes(student)
    ckpt = Checkpointing(
        every=cfg.checkpoint_every if checkpoint else 0,
        save=(lambda step, opt: save_state(checkpoint, step, model, opt, state_bytes)) if checkpoint else None,
        resume_step=state.step if state else 0, resume_optimizer=state.optimizer if state else None)
    losses = train_lm(model, private, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                      seed=derive_seed(job, rnd, node, "train"), progress=progress, checkpointing=ckpt)
    t1 = time.perf_counter()
    logits = None
    if cfg.method == "fedavg":
        weights = state_bytes(model)
        payload = encode_weights(weights, secret=secret, job=job, round=rnd, node=node)
        float32_bytes = len(weights)
    else:
        logits = probe_logits(model, probe)  # (probe_seqs * block_size, V)
        payload = encode_probe_logits(cfg, logits, secret=secret, job=job, rnd=rnd, node=node)
        float32_bytes = logits.size * 4
    t2 = time.perf_counter()
    metrics = {"train_loss": float(np.mean(losses[-10:])) if losses else float("nan"), "t_train": t1 - t0,
               "resumed_from": state.step if state else 0, "t_logits": t2 - t1,
               "payload_bytes": len(payload), "float32_bytes": float32_bytes}
    t3 = time.perf_counter()
    if eval_windows is not None:
        metrics["local_ppl"] = perplexity(model, eval_windows)
        metrics["t_eval"] = time.perf_counter() - t3
    # CPU seconds next to wall seconds: on an oversubscribed machine wall time overstates the work.
    metrics["cpu_s"] = time.process_time() - cpu0
    return NodeOutput(payload, logits if cfg.measure_teacher_kl and logits is not None else None, metrics)


def merge_and_distill(cfg: FPLDConfig, *, job: str, rnd: int, student: bytes, teacher: np.ndarray,
                      probe: torch.Tensor, eval_windows: torch.Tensor, full_teacher: np.ndarray | None = None,
                      progress: Progress | None = None, device: str = "cpu") -> tuple[bytes, dict[str, float]]:
    """Distill the next student from the previous one towards `teacher`, the mean of the merged
    nodes' dequantized logits (pipeline.aggregate.RunningMean, folded in as they decode)."""
    t0 = time.perf_counter()
    metrics: dict[str, float] = {}
    if full_teacher is not None:
        # What quantization cost: KL(full-precision teacher || B-bit teacher), same nodes.
        metrics["teacher_kl"] = mean_kl(full_teacher, teacher)
    model = load_state_bytes(cfg.model_spec(), student, device)
    losses = distill(model, probe, teacher, steps=cfg.distill_steps, batch_size=cfg.batch_size,
                     lr=cfg.distill_lr, seed=derive_seed(job, rnd, "distill"), progress=progress)
    t1 = time.perf_counter()
    metrics.update(distill_kl=float(np.mean(losses[-10:])), t_distill=t1 - t0,
                   student_ppl=perplexity(model, eval_windows))
    metrics["t_eval"] = time.perf_counter() - t1
    return state_bytes(model), metrics


def reference_logits(cfg: FPLDConfig, student: bytes, probe: torch.Tensor, device: str = "cpu") -> np.ndarray:
    """The broadcast student's own probe logits: what shapes a sparse payload's tail at the receiver."""
    return probe_logits(load_state_bytes(cfg.model_spec(), student, device), probe)


def average_weights(cfg: FPLDConfig, student: bytes, mean: dict[str, torch.Tensor], eval_windows: torch.Tensor,
                    device: str = "cpu") -> tuple[bytes, dict[str, float]]:
    """FedAvg's merge: the student is the nodes' mean weights (or mean LoRA adapters)."""
    t0 = time.perf_counter()
    blob = with_tensors(student, mean)
    ppl = perplexity(load_state_bytes(cfg.model_spec(), blob, device), eval_windows)
    return blob, {"student_ppl": ppl, "t_eval": time.perf_counter() - t0}
