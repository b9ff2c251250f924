"""A finished SmallTalk run used locally (no fleet): held-out evaluation and routed generation.

Both load the routers and experts from the run dir; evaluation rebuilds the held-out text from the
run's own config (or takes other text), so `lmteam smalltalk eval RUN` works on any machine that
has the run dir and the corpus files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data import CorpusError, load_corpus, windows
from pipeline.models.lm import tokenizer_for
from pipeline.smalltalk.config import SmallTalkConfig
from pipeline.smalltalk.data import RunDir, load_domains, prepare_data
from pipeline.smalltalk.driver import load_models
from pipeline.smalltalk.eval import evaluate_mixture
from pipeline.smalltalk.routing import prefix_losses


def open_run(path: Path) -> tuple[RunDir, dict, SmallTalkConfig]:
    run = RunDir(path)
    if not run.exists():
        raise CorpusError(f"{path} is not a SmallTalk run dir (no config.json); train one with `lmteam smalltalk train`")
    meta, cfg = run.load_config()
    missing = [p for p in [run.router_file(e) for e in range(cfg.experts)] + [run.expert_file(e) for e in range(cfg.experts)]
               if not p.exists()]
    if missing:
        raise CorpusError(f"run {path} is unfinished ({missing[0].relative_to(run.path)} missing): "
                          f"finish it with `lmteam smalltalk train --resume {path}`")
    return run, meta, cfg


def evaluate_run(path: Path, prefix: int | None = None, corpus: list[str] | None = None) -> dict:
    """Held-out perplexity of the routed mixture (and dense model) of a run, at any inference prefix."""
    run, meta, cfg = open_run(path)
    prefix = prefix or cfg.prefix
    if not 2 <= prefix <= cfg.block_size:
        raise CorpusError(f"--prefix must be between 2 and the run's block size {cfg.block_size}, got {prefix}")
    routers, experts, dense = load_models(run, cfg)
    if corpus:
        domains = load_corpus(corpus)
        tok = tokenizer_for(cfg.expert_spec())
        seqs = [windows(tok.encode_bytes(d.tokens), cfg.block_size)[: max(1, cfg.eval_seqs // len(domains))]
                for d in domains]
        names = [d.name for d in domains]
        labels = np.concatenate([np.full(len(s), i) for i, s in enumerate(seqs)])
        evals = torch.cat(seqs)
    else:
        data = prepare_data(cfg, load_domains(cfg))
        if data.fingerprint() != meta.get("fingerprint"):
            raise CorpusError(f"the corpus files of run {path} changed since training; pass --corpus to evaluate "
                              "on other text")
        evals, labels, names = data.eval, data.eval_labels, data.domains
    for r in routers:  # routers were built for the training prefix; longer needs their positions
        if r.config.block_size < prefix - 1:
            raise CorpusError(f"routers of this run score at most {r.config.block_size + 1} tokens; --prefix {prefix} "
                              "is longer")
    out = evaluate_mixture(experts, routers, evals, labels, names, prefix, dense,
                           byte_lengths=tokenizer_for(cfg.expert_spec()).byte_lengths())
    return {"run": str(path), "job": meta.get("job"), "experts": cfg.experts, "train_prefix": cfg.prefix, **out}


def generate(path: Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 40, seed: int = 0) -> dict:
    """Route the prompt by its prefix (first M tokens, or all of it if shorter) and sample from that expert only."""
    run, _, cfg = open_run(path)
    tok = tokenizer_for(cfg.expert_spec())
    tokens = tok.encode(prompt)
    if len(tokens) < 2:
        raise CorpusError("--prompt needs at least 2 tokens of text: the routers score a prefix")
    routers, experts, _ = load_models(run, cfg)
    m = min(cfg.prefix, len(tokens))
    losses = prefix_losses(routers, torch.from_numpy(tokens[None, :m].astype(np.int64)), m)[0]  # (E,)
    e = int(losses.argmin())
    gen = torch.Generator().manual_seed(seed)
    idx = torch.from_numpy(tokens[None, :].astype(np.int64))
    out = experts[e].generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return {"expert": e, "router_losses": [float(x) for x in losses], "prefix_bytes": m,
            "text": tok.decode(out[0, len(tokens):].numpy())}
