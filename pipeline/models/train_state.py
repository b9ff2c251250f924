"""Resumable training state (model + AdamW moments + step) as safetensors, never pickle.

A training task checkpoints every N steps to node-local disk; if its worker dies the task is
redelivered and continues from the last checkpoint instead of from scratch. Batches are drawn
from a generator seeded by (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.files import write_atomic
from pipeline.models.checkpoint import _read_metadata_raw, model_from_bytes, model_to_bytes

FORMAT = "lmteam-train-state-v1"


@dataclass
class TrainState:
    step: int
    model: torch.nn.Module
    optimizer: dict  # torch.optim state_dict


def state_to_bytes(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   to_bytes: Callable[[torch.nn.Module], bytes] = model_to_bytes) -> bytes:
    """`to_bytes` writes the model's own safetensors blob (pipeline/models/lm.py's state_bytes
    for any model); its tensors and metadata ride inside this one file."""
    sd = optimizer.state_dict()
    tensors = {f"opt.{idx}.{key}": value.detach().cpu().contiguous()
               for idx, slots in sd["state"].items() for key, value in slots.items()}
    blob = to_bytes(model)
    tensors.update({f"model.{k}": v for k, v in st_load(blob).items()})
    meta = {"format": FORMAT, "step": str(step), "param_groups": json.dumps(sd["param_groups"]),
            "model_meta": json.dumps(_read_metadata_raw(blob), sort_keys=True)}
    return st_save(tensors, metadata=meta)


def state_from_bytes(data: bytes,
                     from_bytes: Callable[[bytes], torch.nn.Module] = model_from_bytes) -> TrainState:
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
    model_blob = st_save(weights, metadata=json.loads(meta["model_meta"]))
    optimizer = {"state": state, "param_groups": json.loads(meta["param_groups"])}
    return TrainState(int(meta["step"]), from_bytes(model_blob), optimizer)


def save_state(path: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               to_bytes: Callable[[torch.nn.Module], bytes] = model_to_bytes) -> None:
    """Atomic write: a process killed mid-write leaves the previous checkpoint intact."""
    write_atomic(path, state_to_bytes(step, model, optimizer, to_bytes))


def load_state(path: Path, from_bytes: Callable[[bytes], torch.nn.Module] = model_from_bytes) -> TrainState | None:
    try:
        return state_from_bytes(path.read_bytes(), from_bytes)
    except FileNotFoundError:
        return None
