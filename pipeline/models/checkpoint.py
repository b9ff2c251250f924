"""Serialise GPT models as safetensors bytes, never pickle.

Checkpoints travel between Celery workers through Redis, so loading one must not be able to run
code: safetensors is a JSON header plus raw tensor bytes. The GPTConfig rides along in the
header's metadata, so a checkpoint is self-describing.

The tied embedding matrix is stored once, under ``transformer.wte.weight``; ``lm_head.weight``
is dropped on save and re-tied on load (GPT.__init__ ties them and load_state_dict copies in
place, which keeps the tie).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.files import write_atomic
from pipeline.models.gpt import GPT, GPTConfig

FORMAT = "lmteam-gpt-v1"
_TIED_KEY = "lm_head.weight"


def model_to_bytes(model: GPT) -> bytes:
    """Serialise model weights and config into a safetensors blob."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != _TIED_KEY}
    metadata = {"format": FORMAT, "config": json.dumps(model.config.to_dict(), sort_keys=True)}
    return st_save(tensors, metadata=metadata)


def _read_metadata(data: bytes) -> dict[str, str]:
    meta = _read_metadata_raw(data)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise ValueError(f"checkpoint is not an {FORMAT} model (metadata: {sorted(meta)})")
    return meta


def _read_metadata_raw(data: bytes) -> dict[str, str]:
    # safetensors.torch.load() discards the metadata, so read the header ourselves:
    # an 8-byte little-endian length, then that many bytes of JSON.
    if len(data) < 8:
        raise ValueError("not a safetensors checkpoint: shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError("not a safetensors checkpoint: header length exceeds the data")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not a safetensors checkpoint: bad header ({e})") from None
    return header.get("__metadata__") or {}


def model_from_bytes(data: bytes) -> GPT:
    """Rebuild a GPT from model_to_bytes() output; raises ValueError on a foreign or broken blob."""
    meta = _read_metadata(data)
    config = GPTConfig.from_dict(json.loads(meta["config"]))
    model = GPT(config)
    try:
        state = st_load(data)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # safetensors' own error type, or torch's RuntimeError on a shape mismatch
        raise ValueError(f"corrupt {FORMAT} checkpoint: {str(e).splitlines()[0]}") from e
    if set(missing) != {_TIED_KEY} or unexpected:
        raise ValueError(f"checkpoint does not match its config: missing={missing}, unexpected={unexpected}")
    return model


def save_model(path: str | os.PathLike[str], model: GPT) -> None:
    """Write model to path atomically (a reader never sees a half-written file)."""
    write_atomic(path, model_to_bytes(model))


def load_model(path: str | os.PathLike[str]) -> GPT:
    """Read a model written by save_model()."""
    return model_from_bytes(Path(path).read_bytes())


__all__ = ["model_to_bytes", "model_from_bytes", "save_model", "load_model", "FORMAT"]
