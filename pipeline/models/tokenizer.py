"""Tokenizers behind one small interface: text <-> int32 token ids, and the vocabulary size.

The built-in models read raw UTF-8 bytes (ByteTokenizer, vocabulary 256); a Hugging Face model
brings its own tokenizer (HFTokenizer, any vocabulary). Everything downstream sees int32 ids and
takes the vocabulary size from here, never from a literal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    identity: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: np.ndarray | list[int]) -> str: ...

    def byte_lengths(self) -> np.ndarray: ...


class ByteTokenizer:
    """One token per UTF-8 byte: no file to ship, nothing to download."""

    vocab_size = 256
    identity = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_bytes(self, data: np.ndarray) -> np.ndarray:
        return np.asarray(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= 256):
            raise ValueError(f"token ids must be in [0, 256), got {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a model folder (tokenizer.json and friends)."""

    def __init__(self, folder: str | Path, identity: str = "") -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder))
        # Corpora are tokenized whole and cut into windows later: the model's context is not a limit here.
        self.hf.model_max_length = 1 << 60
        # len() counts added special tokens; the model's embedding may be larger (padded), never smaller.
        self.vocab_size = len(self.hf)
        self.identity = identity or str(folder)

    def encode(self, text: str) -> np.ndarray:
        # No BOS/EOS: corpora are cut into windows, and a special token every window would be noise.
        return np.asarray(self.hf.encode(text, add_special_tokens=False), dtype=np.int32)

    def encode_bytes(self, data: np.ndarray) -> np.ndarray:
        text = np.asarray(data, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")
        # Long texts in pieces: fast tokenizers are quadratic-ish on one huge string with no breaks.
        pieces = [self.encode(text[i : i + 100_000]) for i in range(0, len(text), 100_000)]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)

    def decode(self, ids: np.ndarray | list[int]) -> str:
        return self.hf.decode(np.asarray(ids).tolist(), skip_special_tokens=True)

    def byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for (special tokens: 0), so that losses can be
        compared per byte across tokenizers. Exact for byte-level BPE; for other tokenizers
        (SentencePiece) a token decoded alone may lose its leading space, so the count is close."""
        from tokenizers import pre_tokenizers

        vocab = self.hf.get_vocab()
        out = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
        special = set(self.hf.all_special_ids)
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        byte_level = all(set(t) <= alphabet for t, i in vocab.items() if i not in special)
        for token, i in vocab.items():
            if i in special:
                continue
            # Byte-level BPE (GPT-2 style): one alphabet character per byte, and a token may hold
            # part of a UTF-8 character, which decoding it alone would turn into U+FFFD.
            out[i] = len(token) if byte_level else len(self.hf.convert_tokens_to_string([token]).encode("utf-8"))
        return out
