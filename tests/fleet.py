"""Helpers for integration tests: tiny FPLD configs and a corpus written to temp files."""

from __future__ import annotations

from pathlib import Path

from pipeline.data import default_corpus
from pipeline.fpld_config import FPLDConfig


def tiny_corpus(directory: Path, domains: int = 4, size: int = 30_000) -> list[str]:
    """Real text (the built-in stdlib corpus), a few KB per domain, one file per domain."""
    paths = []
    for d in default_corpus(max_bytes_per_domain=size)[:domains]:
        path = directory / f"{d.name}.txt"
        path.write_bytes(d.tokens.tobytes())
        paths.append(str(path))
    return paths


def tiny_config(corpus: list[str], **overrides) -> FPLDConfig:
    base = dict(nodes=4, rounds=1, bits=8, local_steps=5, distill_steps=5, probe_seqs=8, eval_seqs=8,
                block_size=16, n_layer=1, n_head=2, n_embd=32, batch_size=8, corpus=corpus, round_timeout=8.0)
    base.update(overrides)
    return FPLDConfig(**base).validate()
