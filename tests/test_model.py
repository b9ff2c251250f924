"""Tests for pipeline.models.gpt (GPT) and pipeline.models.checkpoint (safetensors round trip)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from pipeline.models.checkpoint import load_model, model_from_bytes, model_to_bytes, save_model
from pipeline.models.gpt import GPT, GPTConfig

TINY = GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)


def _model(seed: int = 0, config: GPTConfig = TINY) -> GPT:
    torch.manual_seed(seed)
    return GPT(config)


def test_config_dict_round_trip():
    """GPTConfig survives to_dict/from_dict, ignoring unknown keys."""
    d = TINY.to_dict() | {"future_option": 1}
    assert GPTConfig.from_dict(d) == TINY


def test_model_forward_shapes():
    """Logits cover every position; loss is a scalar only when targets are given."""
    model = _model()
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 256) and loss is None
    logits, loss = model(idx, idx)
    assert loss is not None and loss.ndim == 0


def test_model_forward_rejects_long_input():
    """Sequences longer than block_size raise ValueError."""
    with pytest.raises(ValueError, match="block_size"):
        _model()(torch.zeros(1, 17, dtype=torch.long))


def test_model_causal_masking():
    """Changing a future token leaves the logits of earlier positions unchanged."""
    model = _model().eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_model_weights_tied():
    """lm_head and token embedding share one tensor, counted once in num_params."""
    model = _model()
    assert model.lm_head.weight is model.transformer.wte.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())
    assert model.num_params(non_embedding=True) == model.num_params() - 16 * 32


def test_model_initial_loss_near_uniform():
    """nanoGPT init gives an initial loss on random targets close to ln(256)."""
    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 256, (2, 4, 16), generator=g)
    _, loss = _model()(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.3


def test_model_generate_shape_and_determinism():
    """generate appends tokens, crops long contexts, and is reproducible with a seeded generator."""
    model = _model()
    idx = torch.zeros(2, 20, dtype=torch.long)  # longer than block_size: must be cropped
    a = model.generate(idx, 5, top_k=10, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 5, top_k=10, generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 25) and torch.equal(a, b)
    greedy = model.generate(idx, 3, temperature=0)
    assert torch.equal(greedy, model.generate(idx, 3, temperature=0))
    assert model.training  # mode restored


def test_checkpoint_round_trip_identical_logits():
    """model_from_bytes(model_to_bytes(m)) reproduces the logits bit for bit and stays tied."""
    model = _model(3).eval()
    idx = torch.randint(0, 256, (2, 16))
    restored = model_from_bytes(model_to_bytes(model)).eval()
    assert restored.config == model.config
    assert torch.equal(model(idx)[0], restored(idx)[0])
    assert restored.lm_head.weight is restored.transformer.wte.weight


def test_checkpoint_is_safetensors_not_pickle():
    """The blob starts with a safetensors JSON header, holds the config and one copy of the tied matrix."""
    data = model_to_bytes(_model())
    (n,) = struct.unpack("<Q", data[:8])
    assert data[8:9] == b"{"  # JSON header; a pickle would start with b"\x80"
    header = json.loads(data[8 : 8 + n])
    assert json.loads(header["__metadata__"]["config"]) == TINY.to_dict()
    assert "lm_head.weight" not in header and "transformer.wte.weight" in header
    assert b"\x80\x04" not in data[:16] and b"torch._utils" not in data


def test_checkpoint_file_round_trip(tmp_path):
    """save_model/load_model round-trip through a file with identical logits."""
    model = _model(4).eval()
    path = tmp_path / "m.safetensors"
    save_model(path, model)
    assert not list(tmp_path.glob("*.tmp"))
    idx = torch.randint(0, 256, (1, 16))
    assert torch.equal(model(idx)[0], load_model(path).eval()(idx)[0])


def test_checkpoint_rejects_garbage():
    """Foreign or truncated data raises ValueError rather than loading something wrong."""
    with pytest.raises(ValueError):
        model_from_bytes(b"\x80\x04not a checkpoint")
    with pytest.raises(ValueError):
        model_from_bytes(b"")


def test_checkpoint_rejects_mismatched_config():
    """A blob whose tensors do not fit its declared config raises ValueError."""
    data = model_to_bytes(_model())
    wrong = data.replace(b'\\"n_embd\\": 32', b'\\"n_embd\\": 64')
    assert wrong != data
    with pytest.raises(ValueError, match="corrupt"):
        model_from_bytes(wrong)
