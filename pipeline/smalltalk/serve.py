"""Serving a SmallTalk mixture: which run, routing prompts by prefix loss, batched generation.

The fleet's side of serving (requests and answers in Redis, failover) is in serve_driver.py
and workers/serve.py; this module is the math both ends share and needs no fleet:

- the submitter tokenizes each prompt with the experts' tokenizer and scores its first M tokens
  (fewer if the prompt is shorter) with every router; the lowest loss picks the one expert that
  runs (pipeline/smalltalk/routing.py), the next lowest is the fallback order;
- a replica generates the prompts it claimed at once: prompts of the same token length and
  sampling settings share one forward per new token. Neither model family here takes an
  attention mask, and left padding would change what a causal model sees, so prompts of other
  lengths run as their own group, exactly as they would alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data import CorpusError
from pipeline.models.checkpoint import model_from_bytes
from pipeline.models.gpt import GPT
from pipeline.models.lm import model_device, tokenizer_for
from pipeline.models.tokenizer import Tokenizer
from pipeline.smalltalk.config import SmallTalkConfig
from pipeline.smalltalk.data import RunDir
from pipeline.smalltalk.routing import prefix_losses
from pipeline.smalltalk.steps import expert_from_bytes


@dataclass
class ServedRun:
    """A finished SmallTalk run wherever it lives (a run dir, or a job in the fleet's store).

    `run_id` is the training job's id: a replica refuses requests for another run's experts.
    """

    run_id: str
    cfg: SmallTalkConfig
    router_bytes: Callable[[int], bytes]
    expert_bytes: Callable[[int], bytes]
    source: str

    def routers(self) -> list[GPT]:
        return [model_from_bytes(self.router_bytes(e)) for e in range(self.cfg.experts)]

    def expert(self, i: int, device: str = "cpu") -> torch.nn.Module:
        self.check_expert(i)
        return expert_from_bytes(self.cfg, self.expert_bytes(i), device)

    def tokenizer(self) -> Tokenizer:
        return tokenizer_for(self.cfg.expert_spec())

    def check_expert(self, i: int) -> None:
        if not 0 <= i < self.cfg.experts:
            raise CorpusError(f"--expert {i}: run {self.run_id} has experts 0..{self.cfg.experts - 1}")


def run_from_dir(path: Path) -> ServedRun:
    """A finished run dir (routers/ and experts/ complete), or CorpusError saying what is missing."""
    run = RunDir(path)
    if not run.exists():
        raise CorpusError(f"{path} is not a SmallTalk run dir (no config.json) nor a SmallTalk job in the "
                          "fleet's store; train one with `lmteam smalltalk train`")
    meta, cfg = run.load_config()
    files = [run.router_file(e) for e in range(cfg.experts)] + [run.expert_file(e) for e in range(cfg.experts)]
    missing = [p for p in files if not p.exists()]
    if missing:
        raise CorpusError(f"run {path} is unfinished ({missing[0].relative_to(run.path)} missing): "
                          f"finish it with `lmteam smalltalk train --resume {path}`")
    return ServedRun(str(meta.get("job") or path), cfg, lambda e: run.router_file(e).read_bytes(),
                     lambda i: run.expert_file(i).read_bytes(), str(path))


def encode_prompts(tok: Tokenizer, prompts: list[str]) -> list[np.ndarray]:
    """Token ids of each prompt; the routers need a prefix of at least 2 tokens."""
    out = []
    for p in prompts:
        ids = tok.encode(p)
        if len(ids) < 2:
            raise CorpusError(f"prompt {p[:40]!r} needs at least 2 tokens of text: the routers score a prefix")
        out.append(np.asarray(ids, dtype=np.int64))
    return out


@torch.no_grad()
def route_prompts(routers: list[GPT], prompts: list[np.ndarray], prefix: int) -> np.ndarray:
    """(n, E) mean prefix loss of every router on each prompt's first min(prefix, len) tokens.

    Prompts with the same scored length are scored together (one forward per router)."""
    losses = np.empty((len(prompts), len(routers)), dtype=np.float32)
    lengths = np.array([min(prefix, len(p)) for p in prompts])
    for m in np.unique(lengths):
        rows = np.nonzero(lengths == m)[0]
        seqs = torch.from_numpy(np.stack([prompts[i][:m] for i in rows]))  # (b, m)
        losses[rows] = prefix_losses(routers, seqs, int(m))
    return losses


def expert_order(losses: np.ndarray) -> np.ndarray:
    """(n, E) experts by increasing router loss: column 0 is the routed expert, the rest the fallbacks."""
    return np.argsort(losses, axis=1, kind="stable")


@dataclass(frozen=True)
class Sampling:
    max_new: int = 200
    temperature: float = 0.8
    top_k: int | None = 40
    seed: int = 0


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[np.ndarray], sampling: list[Sampling],
                   max_batch: int) -> tuple[list[np.ndarray], list[int]]:
    """The new tokens of each prompt, and the size of the forward batch each one was generated in.

    Groups are (token length, sampling settings), at most `max_batch` prompts each. A group
    samples from one generator seeded by its prompts' seeds, so a sampled answer depends on the
    prompts it shared a forward with; at temperature 0 (greedy) it is the same in any batch.
    """
    device = model_device(model)
    out: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(prompts)
    sizes = [0] * len(prompts)
    groups: dict[tuple, list[int]] = {}
    for i, (p, s) in enumerate(zip(prompts, sampling, strict=True)):
        groups.setdefault((len(p), s.max_new, s.temperature, s.top_k), []).append(i)
    for (length, max_new, temperature, top_k), rows in groups.items():
        for at in range(0, len(rows), max_batch):
            chunk = rows[at:at + max_batch]
            idx = torch.from_numpy(np.stack([prompts[i] for i in chunk])).to(device)  # (b, T)
            seeds = [sampling[i].seed for i in chunk]  # one prompt alone samples as `generate --local` does
            seed = seeds[0] if len(seeds) == 1 else int.from_bytes(hashlib.sha256(repr(seeds).encode()).digest()[:7], "big")
            gen = torch.Generator(device=device).manual_seed(seed)
            new = model.generate(idx, max_new, temperature=temperature, top_k=top_k, generator=gen)  # (b, T + new)
            new = new[:, length:].cpu().numpy()
            for j, i in enumerate(chunk):
                out[i], sizes[i] = new[j], len(chunk)
    return out, sizes
