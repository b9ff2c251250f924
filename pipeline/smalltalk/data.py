"""SmallTalk LM data: the sequence pool, the fresh sets of each EM round, held-out text; the run dir.

Sequences are non-overlapping windows of block_size + 1 bytes from each domain's training part.
Each keeps its domain index, used only to report cluster purity: routing never sees it. Held-out
sequences come from the tail of every domain (pipeline.data.split_domain), an equal share each.

A run dir (runs/<job>/) holds everything a later `eval`, `generate` or `--resume` needs:
  config.json                    job id, config, domains, data fingerprint
  state.json                     completed EM rounds, cluster summaries, finished experts
  assignments.safetensors        expert index per pool sequence after each EM round (-1: not in it)
  routers/<e>.safetensors        the routers of the last completed EM round
  checkpoints/<e>.safetensors    an expert's latest resumable training state (model + AdamW + step)
  experts/<e>.safetensors        finished experts; dense.safetensors: the dense baseline
  report.json
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.data import CorpusError, Domain, default_corpus, load_corpus, split_domain, windows
from pipeline.files import write_atomic
from pipeline.models.lm import tokenizer_for
from pipeline.smalltalk.config import SmallTalkConfig

EVAL_FRAC = 0.05


@dataclass
class SmallTalkData:
    train: torch.Tensor  # (N, block_size + 1) int64, shuffled pool of training sequences
    labels: np.ndarray  # (N,) domain index of each training sequence (purity statistics only)
    eval: torch.Tensor  # (n_eval, block_size + 1) held-out sequences
    eval_labels: np.ndarray  # (n_eval,)
    domains: list[str]
    em_sets: list[np.ndarray]  # per EM round: indices into train of the round's fresh sequences

    def fingerprint(self) -> str:
        """Identifies the data a run was trained on, so `--resume` refuses different text."""
        h = hashlib.sha256(self.train.to(torch.int32).numpy().tobytes())
        h.update(self.eval.to(torch.int32).numpy().tobytes())
        return h.hexdigest()[:16]

    def round_set(self, rnd: int) -> np.ndarray:
        """Sequences the routers of EM round `rnd` are trained on; round em_rounds is the whole pool."""
        return self.em_sets[rnd] if rnd < len(self.em_sets) else np.arange(len(self.train))


def load_domains(cfg: SmallTalkConfig) -> list[Domain]:
    domains = load_corpus(cfg.corpus) if cfg.corpus else default_corpus()
    if cfg.domain_bytes:
        domains = [Domain(d.name, d.tokens[: cfg.domain_bytes]) for d in domains]
    return domains


def prepare_data(cfg: SmallTalkConfig, domains: list[Domain]) -> SmallTalkData:
    """Deterministic in (cfg.seed, the text): a resumed or evaluated run rebuilds the same sets.

    Each domain is split on its text, then tokenized with the experts' tokenizer (bytes for the
    built-in model)."""
    width = cfg.block_size + 1
    tok = tokenizer_for(cfg.expert_spec())
    train_parts, eval_parts = [], []
    for d in domains:
        tr, _, ev = (tok.encode_bytes(p) for p in split_domain(d.tokens, probe_frac=0.0, eval_frac=EVAL_FRAC))
        if len(tr) < width or len(ev) < width:
            raise CorpusError(f"domain {d.name!r} has {len(d.tokens)} bytes: too small for sequences of "
                              f"{width} tokens plus a held-out share (need about {int(2 * width / EVAL_FRAC)})")
        train_parts.append(windows(tr, cfg.block_size))
        eval_parts.append(windows(ev, cfg.block_size))
    rng = np.random.default_rng(cfg.seed)
    labels = np.concatenate([np.full(len(w), i) for i, w in enumerate(train_parts)]).astype(np.int64)
    order = rng.permutation(len(labels))
    train = torch.cat(train_parts)[torch.from_numpy(order)]
    labels = labels[order]
    per = max(1, cfg.eval_seqs // len(domains))
    evals = [w[:per] for w in eval_parts]
    eval_labels = np.concatenate([np.full(len(w), i) for i, w in enumerate(evals)]).astype(np.int64)
    n = len(train)
    if n < cfg.experts:
        raise CorpusError(f"only {n} training sequences for {cfg.experts} experts: give more text")
    # Fresh sequences every EM round (the paper's "X <- N new sequences"): disjoint slices of the
    # shuffled pool, shrunk when the corpus cannot give every round router_seqs of its own.
    per_round = max(cfg.experts, min(cfg.router_seqs, n // cfg.em_rounds))
    em_sets = [np.arange(r * per_round, (r + 1) * per_round) % n for r in range(cfg.em_rounds)]
    return SmallTalkData(train, labels, torch.cat(evals), eval_labels, [d.name for d in domains], em_sets)


def assignment_to_bytes(assign: np.ndarray) -> bytes:
    return np.asarray(assign, dtype="<i2").tobytes()  # expert index per pool sequence, -1: not in the set


def assignment_from_bytes(data: bytes, n: int) -> np.ndarray:
    arr = np.frombuffer(data, dtype="<i2").astype(np.int64)
    if arr.size != n:
        raise ValueError(f"assignment holds {arr.size} entries, the pool has {n} sequences")
    return arr


class RunDir:
    """A SmallTalk run on disk (see the module docstring); every write is atomic."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    config_file = property(lambda self: self.path / "config.json")
    state_file = property(lambda self: self.path / "state.json")
    report_file = property(lambda self: self.path / "report.json")
    assignments_file = property(lambda self: self.path / "assignments.safetensors")

    def router_file(self, e: int | str) -> Path:
        return self.path / "routers" / f"{e}.safetensors"

    def expert_file(self, name: int | str) -> Path:
        return self.path / ("dense.safetensors" if str(name) == "dense" else f"experts/{name}.safetensors")

    def checkpoint_file(self, name: int | str) -> Path:
        return self.path / "checkpoints" / f"{name}.safetensors"

    def exists(self) -> bool:
        return self.config_file.exists()

    def read_json(self, path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return {}

    def load_config(self) -> tuple[dict, SmallTalkConfig]:
        meta = self.read_json(self.config_file)
        if not meta:
            raise CorpusError(f"{self.path} is not a SmallTalk run (no config.json)")
        return meta, SmallTalkConfig.from_dict(meta["config"])

    def write(self, path: Path, data: bytes | str) -> None:
        write_atomic(path, data)

    def write_json(self, path: Path, obj: dict) -> None:
        self.write(path, json.dumps(obj, indent=2))

    def update_state(self, **fields: object) -> dict:
        state = {**self.read_json(self.state_file), **fields}
        self.write_json(self.state_file, state)
        return state

    def save_assignments(self, rounds: dict[int, np.ndarray]) -> None:
        tensors = {f"round{r}": torch.from_numpy(np.asarray(a, dtype=np.int64)) for r, a in rounds.items()}
        self.write(self.assignments_file, st_save(tensors))

    def load_assignments(self) -> dict[int, np.ndarray]:
        if not self.assignments_file.exists():
            return {}
        return {int(k[5:]): v.numpy() for k, v in st_load(self.assignments_file.read_bytes()).items()}
