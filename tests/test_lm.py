"""The model interface (pipeline/models/lm.py, spec.py): specs, state bytes, LoRA, devices, tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import windows, windows_from_bytes, windows_to_bytes
from pipeline.models.lm import (
    build_model,
    load_state_bytes,
    resolve_device,
    state_bytes,
    tokenizer_for,
    vocab_size,
)
from pipeline.models.spec import ModelError, local_source, make_spec
from pipeline.models.train import perplexity, train_lm


def test_windows_carry_ids_past_255():
    ids = np.arange(40_000, 40_000 + 99, dtype=np.int32)
    w = windows(ids, 32)
    back = windows_from_bytes(windows_to_bytes(w), 32)
    assert torch.equal(back, w) and int(back.max()) == 40_000 + 98


def test_builtin_spec_is_the_byte_gpt():
    spec = make_spec("", block_size=16, builtin={"vocab_size": 256, "n_layer": 1, "n_head": 2, "n_embd": 32})
    assert spec.is_builtin and vocab_size(spec) == 256 and tokenizer_for(spec).vocab_size == 256
    m = build_model(spec)
    assert torch.equal(load_state_bytes(spec, state_bytes(m)).lm_head.weight, m.lm_head.weight)
    with pytest.raises(ModelError, match="--lora-rank needs an HF model"):
        make_spec("", block_size=16, lora_rank=4)


def test_hf_spec_hashes_weights_and_tokenizes_past_256(tiny_llama_dir):
    spec = make_spec(str(tiny_llama_dir), block_size=32)
    assert len(spec.sha) == 64 and spec.source == str(tiny_llama_dir.resolve())
    tok = tokenizer_for(spec)
    ids = tok.encode("def main():\n    return sorted(items, key=len)\n" * 20)
    assert ids.dtype == np.int32 and int(ids.max()) > 255 and vocab_size(spec) > 256
    assert tok.decode(ids[:12]).startswith("def main")


@pytest.mark.parametrize("text", ["plain ascii, twice: plain ascii", "naïve café 日本語 — ünïcode 🙂 end"])
def test_byte_lengths_add_up_to_the_texts_utf8_bytes(tiny_llama_dir, text):
    """Per-byte perplexity divides by these: a token holding part of a UTF-8 character counts its bytes."""
    for tok in (tokenizer_for(make_spec(str(tiny_llama_dir), block_size=32)), tokenizer_for(make_spec("", block_size=32))):
        lengths = tok.byte_lengths()
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))
        assert len(lengths) >= tok.vocab_size - 1  # special tokens past the last merge may be absent: 0 bytes


def test_full_state_round_trip_and_training_moves_it(tiny_llama_dir):
    spec = make_spec(str(tiny_llama_dir), block_size=32)
    ids = tokenizer_for(spec).encode("the quick brown fox jumps over the lazy dog. " * 200)
    model = build_model(spec)
    before = state_bytes(model)
    train_lm(model, ids, steps=3, batch_size=2)
    after = state_bytes(model)
    assert before != after
    w = windows(ids, 32, n=4)
    assert perplexity(load_state_bytes(spec, after), w) == pytest.approx(perplexity(model, w), rel=1e-5)


def test_lora_state_is_adapters_only(tiny_llama_dir):
    spec = make_spec(str(tiny_llama_dir), block_size=32, lora_rank=2)
    model = build_model(spec)
    blob = state_bytes(model)
    full = build_model(make_spec(str(tiny_llama_dir), block_size=32))
    assert model.trainable_params() < full.num_params() / 5
    assert model.trainable_params() * 4 < len(blob) < model.trainable_params() * 4 + 20_000
    # B starts at zero: the adapted model is the pretrained model until it trains
    w = windows(tokenizer_for(spec).encode("hello world, hello team. " * 100), 32, n=2)
    assert perplexity(model, w) == pytest.approx(perplexity(full, w), rel=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        load_state_bytes(make_spec(str(tiny_llama_dir), block_size=32, lora_rank=4), blob)


def test_worker_refuses_a_model_with_other_weights(tiny_llama_dir, tmp_path, monkeypatch):
    spec = make_spec(str(tiny_llama_dir), block_size=32)
    monkeypatch.setenv("LMTEAM_MODELS", str(tiny_llama_dir))
    assert local_source(spec) == str(tiny_llama_dir.resolve())
    forged = spec.__class__(str(tmp_path / "elsewhere"), "0" * 64, 0, 32, {}, 0)
    with pytest.raises(ModelError, match="start it with `lmteam worker --model DIR`"):
        local_source(forged)


def test_devices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ModelError, match="--device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_block_size_beyond_the_models_context_is_refused_at_submit(tiny_llama_dir):
    with pytest.raises(ModelError, match="exceeds tiny-llama's context of 64 tokens"):
        make_spec(str(tiny_llama_dir), block_size=65)
