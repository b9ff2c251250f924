"""Helpers for integration tests: tiny FPLD configs, a corpus in temp files, waiting, a job in a thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from broker.waiting import seconds_left, wait_for
from pipeline.data import default_corpus
from pipeline.fpld.config import FPLDConfig


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


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """True once predicate() holds, False after `timeout` seconds: the product's own wait."""
    return wait_for(lambda: True if predicate() else None, seconds_left(timeout), poll=0.05) is not None


def in_thread(fn: Callable[[], dict]) -> tuple[threading.Thread, dict]:
    """Run a job in a daemon thread; box["report"] or box["error"] holds how it ended."""
    box: dict = {}

    def target() -> None:
        try:
            box["report"] = fn()
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box
