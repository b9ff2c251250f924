"""The one model interface of a job: the model of a ModelSpec on a device, its tokenizer, and
the bytes of its state.

Every other module asks this one for these, so none of them branches on the kind of model (the
built-in byte-level GPT or any Hugging Face causal LM, with or without LoRA).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.models.checkpoint import _read_metadata_raw, model_from_bytes, model_to_bytes
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.spec import ModelError, ModelSpec, local_source
from pipeline.models.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

HF_STATE_FORMAT = "lmteam-hf-state-v1"


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device}: CUDA is not available on this machine")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("--device mps: MPS is not available on this machine")
    if device not in ("cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ModelError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    return device


def build_model(spec: ModelSpec, device: str = "cpu") -> nn.Module:
    """The job's initial model P(0), identical on every worker for the spec's seed."""
    if spec.is_builtin:
        torch.manual_seed(spec.seed)
        return GPT(GPTConfig.from_dict(spec.builtin)).to(device)
    from pipeline.models.hf import load_hf

    try:
        return load_hf(local_source(spec), block_size=spec.block_size, lora_rank=spec.lora_rank,
                       seed=spec.seed, device=device)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {spec.source}: {str(e).splitlines()[0]}") from None


def tokenizer_for(spec: ModelSpec) -> Tokenizer:
    if spec.is_builtin:
        return ByteTokenizer()
    return _hf_tokenizer(local_source(spec), spec.sha or spec.source)


@cache
def _hf_tokenizer(folder: str, identity: str) -> HFTokenizer:
    return HFTokenizer(folder, identity=identity)


def vocab_size(spec: ModelSpec) -> int:
    """The model's output width (may exceed the tokenizer's length when the embedding is padded)."""
    if spec.is_builtin:
        return int(spec.builtin.get("vocab_size", 256))
    folder = local_source(spec)
    cfg = json.loads((Path(folder) / "config.json").read_text()) if Path(folder).is_dir() else {}
    if "vocab_size" in cfg:
        return int(cfg["vocab_size"])
    return tokenizer_for(spec).vocab_size


def state_bytes(model: nn.Module) -> bytes:
    """What a round changes, as safetensors: the whole built-in model, or an HF model's trainable
    parameters (all of them, or its LoRA adapters), never pickle."""
    if isinstance(model, GPT):
        return model_to_bytes(model)
    return st_save(model.trainable_state(), metadata={"format": HF_STATE_FORMAT, "lora_rank": str(model.lora_rank)})


def load_state_bytes(spec: ModelSpec, data: bytes, device: str = "cpu") -> nn.Module:
    """The model whose state `state_bytes` wrote: the spec's base with that state applied."""
    if spec.is_builtin:
        return model_from_bytes(data).to(device)
    meta = _read_metadata_raw(data)
    if meta.get("format") != HF_STATE_FORMAT:
        raise ValueError(f"not an {HF_STATE_FORMAT} blob (metadata {sorted(meta)})")
    if meta.get("lora_rank") != str(spec.lora_rank):
        raise ValueError(f"state of LoRA rank {meta.get('lora_rank')} does not fit a model of LoRA rank {spec.lora_rank}")
    model = build_model(spec, device)
    model.load_trainable_state({k: v.to(device) for k, v in st_load(data).items()})
    return model


def with_tensors(like: bytes, tensors: dict[str, torch.Tensor]) -> bytes:
    """A state blob of the same kind as `like` holding `tensors` (FedAvg's averaged weights)."""
    meta = _read_metadata_raw(like)
    return st_save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
