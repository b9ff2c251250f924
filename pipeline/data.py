"""Byte-level text data: corpora, domains, splits, non-IID shards and training windows.

Tokens are raw UTF-8 bytes (vocab 256), so no tokenizer has to be downloaded or shipped to the
workers. A corpus is a list of Domains; each domain is split contiguously into a private training
part, a public probe part (on which nodes publish logits) and a held-out eval part.

The built-in corpus (default_corpus) is made only from text that ships with CPython itself, so
tests and demos work offline on any install.
"""

from __future__ import annotations

import ast
import codecs
import hashlib
import os
import sysconfig
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where windows are made: a worker's supervising parent never loads it
    import torch

VOCAB_SIZE = 256
_SNIFF_BYTES = 64 * 1024
# Below this a default-corpus domain is too small to train and evaluate on meaningfully.
_MIN_DEFAULT_DOMAIN_BYTES = 100_000


class CorpusError(ValueError):
    """A corpus file or directory cannot be used; the message is one readable line."""


# eq=False: the generated __eq__ would compare arrays element-wise and raise on truth testing.
@dataclass(eq=False)
class Domain:
    name: str
    tokens: np.ndarray  # uint8, 1-D

    def __len__(self) -> int:
        return len(self.tokens)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of text as a uint8 array."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def decode(tokens: np.ndarray | torch.Tensor | Iterable[int]) -> str:
    """Inverse of encode(); bytes that are not valid UTF-8 (e.g. a cut multi-byte char) become U+FFFD."""
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# User corpora


def _is_utf8(data: bytes, final: bool) -> bool:
    # final=False tolerates a multi-byte character cut off by the end of the sniffed prefix.
    try:
        codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
    except UnicodeDecodeError:
        return False
    return True


def _check_text_file(path: Path, min_bytes: int) -> np.ndarray:
    data = path.read_bytes()
    if not data:
        raise CorpusError(f"corpus file {path} is empty")
    head = data[:_SNIFF_BYTES]
    if b"\x00" in head or not _is_utf8(head, final=len(data) <= _SNIFF_BYTES):
        raise CorpusError(f"corpus file {path} looks binary (NUL bytes or not UTF-8 text)")
    if len(data) < min_bytes:
        raise CorpusError(f"corpus file {path} has only {len(data)} bytes; need at least {min_bytes}")
    return np.frombuffer(data, dtype=np.uint8).copy()


def load_corpus(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, min_bytes: int = 4096
) -> list[Domain]:
    """Load text files as domains, one per file, named by file stem.

    A directory stands for its *.txt files (sorted by name). Raises CorpusError for a missing
    path, a directory without .txt files, an empty, binary or too-small file, or two files
    with the same stem (domain names must be unique).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CorpusError(f"corpus path {p} does not exist")
        if p.is_dir():
            txt = sorted(f for f in p.glob("*.txt") if f.is_file())
            if not txt:
                raise CorpusError(f"corpus directory {p} contains no .txt files")
            files.extend(txt)
        else:
            files.append(p)
    if not files:
        raise CorpusError("no corpus files given")
    domains: list[Domain] = []
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise CorpusError(f"corpus files {seen[f.stem]} and {f} would both be domain {f.stem!r}")
        seen[f.stem] = f
        domains.append(Domain(f.stem, _check_text_file(f, min_bytes)))
    return domains


# ---------------------------------------------------------------------------------------------
# Built-in corpus from CPython's own files


def _stdlib_dir() -> Path:
    p = Path(sysconfig.get_paths()["stdlib"])
    # Some relocated or embedded installs report a stale path; os.py always lives in the stdlib.
    return p if (p / "os.py").is_file() else Path(os.__file__).parent


def _stdlib_modules() -> list[Path]:
    # Top-level modules only: packages hold test data with deliberately broken syntax or
    # encodings, and top-level modules alone give several MB of source.
    return sorted(_stdlib_dir().glob("*.py"))


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _docs_text() -> str:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data; builtins' own docs always exist
        import builtins
        import pydoc

        return pydoc.plain(pydoc.render_doc(builtins))
    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def _code_text(files: list[Path]) -> Iterable[str]:
    for f in files:
        src = _read_source(f)
        if src is not None:
            yield f"# ==== {f.name} ====\n{src}\n"


def _docstrings_text(files: list[Path]) -> Iterable[str]:
    for f in files:
        src = _read_source(f)
        if src is None:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        yield from _walk_docstrings(tree, f.stem)


def _walk_docstrings(node: ast.AST, qualname: str) -> Iterable[str]:
    doc = ast.get_docstring(node)  # type: ignore[arg-type]
    if doc:
        yield f"{qualname}\n{doc}\n\n"
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _walk_docstrings(child, f"{qualname}.{child.name}")


def _unicode_text() -> Iterable[str]:
    # The Unicode character database is compiled into every CPython; its table is structured,
    # multilingual (many multi-byte UTF-8 glyphs) and unlike prose or code.
    cps = []
    for cp in range(0x20, 0x110000):
        name = unicodedata.name(chr(cp), None)
        # Skip unnamed code points and algorithmically named runs (CJK ideographs, Hangul syllables...):
        # tens of thousands of near-identical lines would swamp the domain.
        if name is None or name.endswith(f"-{cp:04X}") or name.startswith("HANGUL SYLLABLE"):
            continue
        cps.append(cp)
    # Code-point order would make the contiguous probe/eval tail one script range the private part
    # never saw; a fixed hash order keeps the domain stationary and deterministic on every platform.
    cps.sort(key=lambda cp: hashlib.blake2b(cp.to_bytes(4, "little"), digest_size=8).digest())
    for cp in cps:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        # Combining marks, separators and format characters would garble the line if printed bare.
        glyph = ch if cat[0] not in "MZC" else "-"
        yield f"U+{cp:04X}\t{glyph}\t{cat}\t{unicodedata.name(ch)}\n"


def _take(chunks: Iterable[str], max_bytes: int) -> np.ndarray:
    """Concatenate UTF-8 chunks until max_bytes, cutting on a character boundary."""
    parts: list[bytes] = []
    total = 0
    for chunk in chunks:
        b = chunk.encode("utf-8")
        parts.append(b)
        total += len(b)
        if total >= max_bytes:
            break
    data = b"".join(parts)[: max_bytes + 1]
    if len(data) > max_bytes:
        cut = max_bytes
        while cut > 0 and (data[cut] & 0xC0) == 0x80:  # don't split a multi-byte character
            cut -= 1
        data = data[:cut]
    return np.frombuffer(data, dtype=np.uint8).copy()


def default_corpus(max_bytes_per_domain: int = 600_000) -> list[Domain]:
    """Four deterministic, stylistically distinct domains built from CPython's own files.

    - docs: the Python language reference topics (pydoc_data), i.e. technical prose.
    - code: stdlib top-level modules' source, docstrings kept; every other module in name order.
    - docstrings: module/class/function docstrings (via ast) of the *other* half of the modules,
      so no text is shared with "code".
    - unicode: lines of the Unicode character table (code point, glyph, category, name) from
      unicodedata, in a fixed pseudo-random order.

    Content depends only on the Python version. Raises CorpusError if this install lacks the
    sources to give a domain min(max_bytes_per_domain, 100 KB) bytes.
    """
    if max_bytes_per_domain < 1:
        raise ValueError(f"max_bytes_per_domain must be >= 1, got {max_bytes_per_domain}")
    modules = _stdlib_modules()
    sources = {
        "docs": [_docs_text()],
        "code": _code_text(modules[0::2]),
        "docstrings": _docstrings_text(modules[1::2]),
        "unicode": _unicode_text(),
    }
    need = min(max_bytes_per_domain, _MIN_DEFAULT_DOMAIN_BYTES)
    domains = []
    for name, chunks in sources.items():
        tokens = _take(chunks, max_bytes_per_domain)
        if len(tokens) < need:
            raise CorpusError(
                f"built-in domain {name!r} has only {len(tokens)} bytes on this Python install "
                f"(stdlib sources at {_stdlib_dir()} missing?); pass your own corpus files instead"
            )
        domains.append(Domain(name, tokens))
    return domains


# ---------------------------------------------------------------------------------------------
# Splits, shards, windows


def split_domain(
    tokens: np.ndarray, probe_frac: float = 0.05, eval_frac: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous (train, probe, eval) split, in that order; the parts are disjoint views of tokens.

    Contiguous rather than random windows so that no probe or eval window shares text with the
    private training part (apart from the one boundary each).
    """
    if probe_frac < 0 or eval_frac < 0 or probe_frac + eval_frac >= 1:
        raise ValueError(f"need probe_frac, eval_frac >= 0 and sum < 1, got {probe_frac}, {eval_frac}")
    n = len(tokens)
    n_probe, n_eval = int(n * probe_frac), int(n * eval_frac)
    a = char_start(tokens, n - n_probe - n_eval)
    b = char_start(tokens, n - n_eval)
    return tokens[:a], tokens[a:b], tokens[b:]


def char_start(data: np.ndarray, i: int) -> int:
    """The first index >= i that starts a UTF-8 character: cutting text there leaves every part
    valid UTF-8 (a node worker refuses a private file that is not)."""
    while 0 < i < len(data) and (int(data[i]) & 0xC0) == 0x80:
        i += 1
    return i


def assign_shards(train_parts: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Non-IID private shards for k nodes, one domain per node where possible.

    Node i gets domain i % D. Nodes sharing a domain get disjoint contiguous pieces of it.
    When D > k, domains k..D-1 are appended round-robin (domain d to node d % k).
    """
    if k < 1:
        raise ValueError(f"need at least one node, got k={k}")
    if not train_parts:
        raise ValueError("no training parts to shard")
    D = len(train_parts)
    shards: list[list[np.ndarray]] = [[] for _ in range(k)]
    for d, part in enumerate(train_parts):
        owners = list(range(d, k, D))  # nodes i < k with i % D == d
        if not owners:
            shards[d % k].append(part)
            continue
        cuts = [char_start(part, len(part) * j // len(owners)) for j in range(1, len(owners))]
        for node, piece in zip(owners, np.split(part, cuts), strict=True):
            shards[node].append(piece)
    return [np.concatenate(s) if len(s) > 1 else s[0] for s in shards]


def windows(
    tokens: np.ndarray, block_size: int, n: int | None = None, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """Windows of block_size + 1 tokens (inputs are [:, :-1], targets [:, 1:]) as a LongTensor (N, block_size+1).

    With rng: n windows at uniformly random offsets (for training batches). Without: all
    contiguous non-overlapping windows in order (for probe and eval sets), the first n if n is given.
    """
    width = block_size + 1
    if len(tokens) < width:
        raise CorpusError(f"text of {len(tokens)} tokens is shorter than one window of {width} tokens")
    tokens = np.asarray(tokens)
    if rng is not None:
        if n is None:
            raise ValueError("random windows need n")
        starts = rng.integers(0, len(tokens) - width + 1, size=n)  # (n,)
    else:
        starts = np.arange(0, len(tokens) - width + 1, width)[:n]  # (N,)
    idx = starts[:, None] + np.arange(width)[None, :]  # (N, width)
    import torch

    return torch.from_numpy(tokens[idx].astype(np.int64))


def windows_to_bytes(windows: torch.Tensor) -> bytes:
    """(N, L+1) token windows as little-endian int32: how probe, eval and training sets travel
    through the store (int32, not uint8: a real tokenizer's ids go far past 255)."""
    arr = windows.cpu().numpy()
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids must fit int32, got {arr.min()}..{arr.max()}")
    return arr.astype("<i4").tobytes()


def windows_from_bytes(data: bytes, block_size: int) -> torch.Tensor:
    if len(data) % (4 * (block_size + 1)):
        raise ValueError(f"window blob of {len(data)} bytes is not a multiple of 4*(block_size+1)={4 * (block_size + 1)}")
    arr = np.frombuffer(data, dtype="<i4")
    import torch

    return torch.from_numpy(arr.reshape(-1, block_size + 1).astype(np.int64))
