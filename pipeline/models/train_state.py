"""Resumable training state (model + AdamW moments + step) as safetensors, never pickle.

A training task checkpoints every N steps to node-local disk; if its worker dies the task is
redelivered and continues from the last checkpoint instead of from scratch. Batches are drawn
from a generator seeded by (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.files import write_atomic
from pipeline.models.checkpoint import FORMAT as CHECKPOINT_FORMAT
from pipeline.models.checkpoint import _read_metadata_raw, model_from_bytes, model_to_bytes
from pipeline.models.gpt import GPT

FORMAT = "lmteam-train-state-v1"


@dataclass
class TrainState:
    step: int
    model: GPT
    optimizer: dict  # torch.optim state_dict


def state_to_bytes(step: int, model: GPT, optimizer: torch.optim.Optimizer) -> bytes:
    sd = optimizer.state_dict()
    tensors = {f"opt.{idx}.{key}": value.detach().cpu().contiguous()
               for idx, slots in sd["state"].items() for key, value in slots.items()}
    tensors.update({f"model.{k}": v for k, v in st_load(model_to_bytes(model)).items()})
    meta = {"format": FORMAT, "step": str(step), "param_groups": json.dumps(sd["param_groups"]),
            "config": json.dumps(model.config.to_dict(), sort_keys=True)}
    return st_save(tensors, metadata=meta)


def state_from_bytes(data: bytes) -> TrainState:
    meta = _read_metadata_raw(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} checkpoint")
    state: dict[int, dict[str, torch.Tensor]] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, tensor in st_load(data).items():
        kind, rest = name.split(".", 1)
        if kind == "model":
            weights[rest] = tensor
        else:
            idx, key = rest.split(".", 1)
            state.setdefault(int(idx), {})[key] = tensor
    model_blob = st_save(weights, metadata={"format": CHECKPOINT_FORMAT, "config": meta["config"]})
    optimizer = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    return TrainState(int(meta["step"]), model_from_bytes(model_blob), optimizer)


def save_state(path: Path, step: int, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """Atomic write: a process killed mid-write leaves the previous checkpoint intact."""
    write_atomic(path, state_to_bytes(step, model, optimizer))


def load_state(path: Path) -> TrainState | None:
    try:
        return state_from_bytes(path.read_bytes())
    except FileNotFoundError:
        return None
