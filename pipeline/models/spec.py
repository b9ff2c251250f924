"""Which model a job uses, by name and by weights' hash: what the job record stores.

A job names its model once (`ModelSpec`): the built-in byte-level GPT (`source=""`, sized by its
config) or a Hugging Face causal LM (`source` = a local folder, a hub id, or an alias like
`smollm2`), with its weights' sha256 so every worker can prove it loaded the same model, and
optionally LoRA adapters. No torch here: the submitter and `lmteam status` read specs cheaply.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

from pipeline.models.hf_folder import KNOWN_MODELS, default_cache_dir
from pipeline.models.hf_folder import weights_hash as folder_weights_hash


class ModelError(ValueError):
    """A model cannot be found, loaded or matched; the message is one readable line."""


@dataclass(frozen=True)
class ModelSpec:
    source: str = ""
    """"" for the built-in byte-level GPT; else an HF folder, a hub id, or an alias (smollm2)"""
    sha: str = ""
    """sha256 of the folder's weights: the model's identity across machines ("" for built-in)"""
    lora_rank: int = 0
    block_size: int = 64
    builtin: dict = field(default_factory=dict)
    """GPTConfig fields of the built-in model"""
    seed: int = 0

    @property
    def is_builtin(self) -> bool:
        return not self.source

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_source(name: str) -> str:
    """An alias becomes its cache folder; a folder becomes absolute; anything else is a hub id."""
    if name in KNOWN_MODELS:
        folder = default_cache_dir() / KNOWN_MODELS[name]
        if not (folder / "config.json").is_file():
            raise ModelError(f"model {name!r} is not pulled yet: run `lmteam model pull {name}`")
        return str(folder)
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a Hugging Face model folder (no config.json)")
        return str(p.resolve())
    return name


@cache
def weights_hash(folder: str) -> str:
    """The folder's weights' sha256 (hf_folder.weights_hash, as `lmteam model info` prints it),
    computed once per process: workers ask for it on every task."""
    return folder_weights_hash(folder)


def make_spec(model: str, *, block_size: int, lora_rank: int = 0, builtin: dict | None = None,
              seed: int = 0) -> ModelSpec:
    """The job's model, resolved and hashed on the submitting machine."""
    if not model or model == "builtin":
        if lora_rank:
            raise ModelError("--lora-rank needs an HF model (--model); the built-in model trains fully")
        return ModelSpec("", "", 0, block_size, dict(builtin or {}, block_size=block_size), seed)
    source = resolve_source(model)
    sha = ""
    if Path(source).is_dir():
        sha = weights_hash(source)
        cfg = json.loads((Path(source) / "config.json").read_text())
        context = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        if context and block_size > context:
            raise ModelError(f"--block-size {block_size} exceeds {Path(source).name}'s context of {context} tokens")
    return ModelSpec(source, sha, lora_rank, block_size, {}, seed)


def spec_from_dict(d: dict) -> ModelSpec:
    return ModelSpec(**d)


def local_source(spec: ModelSpec) -> str:
    """Where this worker finds the job's model: a folder it was started with (`lmteam worker
    --model`, env LMTEAM_MODELS) whose weights have the job's hash, else the job's own path if its
    hash matches here. A worker never trains a model other than the one the job names."""
    if spec.is_builtin or not spec.sha:
        return spec.source
    for folder in filter(None, os.environ.get("LMTEAM_MODELS", "").split(os.pathsep)):
        try:
            folder = resolve_source(folder)
        except ModelError:
            continue
        if weights_hash(folder) == spec.sha:
            return folder
    if Path(spec.source).is_dir() and weights_hash(spec.source) == spec.sha:
        return spec.source
    raise ModelError(f"this worker has no copy of model {spec.source} (weights sha256 {spec.sha[:12]}…): "
                     "start it with `lmteam worker --model DIR`")
