"""A tiny randomly initialised Hugging Face model with its own BPE tokenizer, made offline in seconds.

Tests and demos need a real `transformers` model folder (AutoModelForCausalLM /
AutoTokenizer load it, generate() runs) without downloading anything. The tokenizer is a
byte-level BPE trained here on the given text, so any UTF-8 text round-trips, and the vocabulary
is larger than the 256 bytes of pipeline/data.py: code that assumes vocab 256 fails against it.

transformers, tokenizers and torch are imported inside the functions: importing transformers
alone takes seconds, and `lmteam --help` must not pay for it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.models.hf_folder import (
    ModelArgError,
    atomic_folder,
    check_free,
    hf_bars_off,
    portable_folder,
    weights_hash,
    write_provenance,
)

ARCHS = ("llama", "gpt2")
EOT = "<|endoftext|>"
# 256 byte tokens (ByteLevel's alphabet) + EOT: below this BPE could not encode every byte.
MIN_VOCAB = 257
MAX_VOCAB = 1 << 20


def check_init_args(*, arch: str, layers: int, width: int, heads: int, vocab: int, block_size: int,
                    seed: int) -> None:
    """Raise ModelArgError (one line) for arguments that cannot make a model, before anything is written."""
    if arch not in ARCHS:
        raise ModelArgError(f"--arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    for name, value in (("--layers", layers), ("--width", width), ("--heads", heads)):
        if value < 1:
            raise ModelArgError(f"{name} must be at least 1, got {value}")
    if width % heads:
        raise ModelArgError(f"--width {width} must be a multiple of --heads {heads}")
    if arch == "llama" and (width // heads) % 2:
        # Rotary embeddings rotate pairs of channels, so each head needs an even width.
        raise ModelArgError(f"llama needs an even head width; --width/--heads = {width}/{heads} = {width // heads}")
    if not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise ModelArgError(f"--vocab must be {MIN_VOCAB}..{MAX_VOCAB} (256 bytes + {EOT} at least), got {vocab}")
    if block_size < 2:
        raise ModelArgError(f"--block-size must be at least 2, got {block_size}")
    if not 0 <= seed < 2**63:
        raise ModelArgError(f"--seed must be 0..2**63-1, got {seed}")


def corpus_texts(corpus: Sequence[str | os.PathLike[str]] | None = None,
                 texts: Sequence[str] | None = None) -> list[str]:
    """The training text: given texts, plus files (checked by pipeline.data.load_corpus, CorpusError
    on a missing, empty or binary one); the built-in corpus when neither is given."""
    from pipeline.data import default_corpus, load_corpus

    out = list(texts or [])
    domains = load_corpus(list(corpus), min_bytes=1) if corpus else []
    if not out and not domains:
        # ~1 MB: enough merges for a few thousand tokens, and trains in about a second.
        domains = default_corpus(max_bytes_per_domain=250_000)
    # load_corpus sniffs only a file's head for UTF-8; a bad byte further on becomes U+FFFD.
    out += [d.tokens.tobytes().decode("utf-8", errors="replace") for d in domains]
    if not any(out):
        raise ModelArgError("the corpus is empty: give text to train the tokenizer on")
    return out


def train_bpe(texts: Iterable[str], vocab: int) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with at most `vocab` ids; EOT is id 0.

    Fewer ids come out when the text has too few distinct pairs to merge; the caller reports it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(s)) == s exactly, which the tests and node code rely on.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _swiglu_width(width: int) -> int:
    # SwiGLU has three matrices where a GELU MLP has two: 8/3 * width keeps the parameter count
    # of a 4 * width MLP (LLaMA's choice), rounded up to a multiple of 8 for tidy shapes.
    return -(-8 * width // 3 // 8) * 8


def _build_model(arch: str, *, layers: int, width: int, heads: int, vocab: int, block_size: int, eot: int) -> Any:
    import torch

    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=_swiglu_width(width),
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                             max_position_embeddings=block_size, tie_word_embeddings=True,
                             bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        cls = LlamaForCausalLM
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=block_size,
                            tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        cls = GPT2LMHeadModel
    model = cls(config).to(torch.float32)
    model.generation_config.pad_token_id = eot
    return model.eval()


def init_tiny_model(out_dir: str | os.PathLike[str], *, arch: str = "llama", layers: int = 2, width: int = 64,
                    heads: int = 4, vocab: int = 512, block_size: int = 128,
                    corpus: Sequence[str | os.PathLike[str]] | None = None, texts: Sequence[str] | None = None,
                    seed: int = 0) -> Path:
    """Write a new model folder at out_dir: random `arch` weights (seeded) and a BPE tokenizer
    trained on the corpus files and/or texts (the built-in corpus when neither is given).

    The folder loads with AutoModelForCausalLM / AutoTokenizer.from_pretrained. EOT
    "<|endoftext|>" is bos, eos and pad. out_dir must be absent or empty; it appears complete or
    not at all. If the text allows fewer than `vocab` tokens, the model gets the vocabulary
    reached, a UserWarning says so, and lmteam.json records both numbers. Same arguments and
    text -> same weights_hash.
    """
    out_dir = Path(out_dir)
    check_init_args(arch=arch, layers=layers, width=width, heads=heads, vocab=vocab, block_size=block_size,
                    seed=seed)
    check_free(out_dir)
    train_text = corpus_texts(corpus, texts)
    import torch
    from transformers import PreTrainedTokenizerFast

    bpe = train_bpe(train_text, vocab)
    reached = bpe.get_vocab_size()
    if reached < vocab:
        warnings.warn(f"the corpus gave only {reached} tokens of the {vocab} asked for; the model uses {reached}",
                      stacklevel=2)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                        model_max_length=block_size, clean_up_tokenization_spaces=False)
    eot = bpe.token_to_id(EOT)
    # fork_rng: seeding must not change the random stream of whoever called us (a test, a trainer).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build_model(arch, layers=layers, width=width, heads=heads, vocab=reached, block_size=block_size,
                             eot=eot)
    with atomic_folder(out_dir) as tmp, hf_bars_off():
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        portable_folder(tmp)
        write_provenance(tmp, {
            "source": "init", "arch": arch, "layers": layers, "width": width, "heads": heads,
            "block_size": block_size, "seed": seed, "vocab_requested": vocab, "vocab": reached,
            "corpus_bytes": sum(len(t.encode("utf-8")) for t in train_text),
            "parameters": sum(p.numel() for p in model.parameters()), "weights_sha256": weights_hash(tmp),
        })
    return out_dir
