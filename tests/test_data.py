"""Tests for pipeline.data: encoding, corpus loading, the built-in corpus, splits, shards, windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import (
    CorpusError,
    Domain,
    assign_shards,
    decode,
    default_corpus,
    encode,
    load_corpus,
    split_domain,
    windows,
)

TEXT = "The quick brown fox jumps over the lazy dog. Grüße, 世界!\n" * 100  # > 4096 bytes


def test_encode_decode_round_trip():
    """encode gives uint8 UTF-8 bytes and decode inverts it; broken bytes become U+FFFD."""
    tokens = encode("héllo")
    assert tokens.dtype == np.uint8 and len(tokens) == 6
    assert decode(tokens) == "héllo"
    assert decode(tokens[:2]) == "h\ufffd"
    assert decode(torch.tensor([104, 105])) == "hi"


def test_load_corpus_file_and_directory(tmp_path):
    """A file is one domain named by stem; a directory yields its sorted .txt files."""
    (tmp_path / "b.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "a.txt").write_text(TEXT.upper(), encoding="utf-8")
    (tmp_path / "skip.md").write_text(TEXT, encoding="utf-8")
    domains = load_corpus(tmp_path)
    assert [d.name for d in domains] == ["a", "b"]
    assert decode(domains[1].tokens) == TEXT
    assert [d.name for d in load_corpus([str(tmp_path / "b.txt")])] == ["b"]


def test_load_corpus_missing(tmp_path):
    """A missing path raises CorpusError naming it."""
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus([tmp_path / "nope.txt"])


def test_load_corpus_empty(tmp_path):
    """An empty file raises CorpusError."""
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(tmp_path / "e.txt")


def test_load_corpus_binary(tmp_path):
    """NUL bytes or invalid UTF-8 are rejected as binary."""
    (tmp_path / "nul.txt").write_bytes(b"abc\x00" * 2000)
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 2000)
    for name in ("nul.txt", "latin1.txt"):
        with pytest.raises(CorpusError, match="binary"):
            load_corpus(tmp_path / name)


def test_load_corpus_utf8_char_across_sniff_boundary(tmp_path):
    """A multi-byte character straddling the 64 KiB sniff window is still valid text."""
    (tmp_path / "t.txt").write_bytes(b"a" * (64 * 1024 - 1) + "é".encode() + b"b" * 10)
    assert len(load_corpus(tmp_path / "t.txt")[0]) == 64 * 1024 + 11


def test_load_corpus_directory_without_text(tmp_path):
    """A directory with no .txt files raises CorpusError."""
    (tmp_path / "x.bin").write_bytes(b"\x00")
    with pytest.raises(CorpusError, match="no .txt"):
        load_corpus(tmp_path)


def test_load_corpus_too_small(tmp_path):
    """Files under min_bytes are rejected, and min_bytes is adjustable."""
    (tmp_path / "s.txt").write_text("short text", encoding="utf-8")
    with pytest.raises(CorpusError, match="at least 4096"):
        load_corpus(tmp_path / "s.txt")
    assert len(load_corpus(tmp_path / "s.txt", min_bytes=1)[0]) == 10


def test_load_corpus_duplicate_names(tmp_path):
    """Two files with the same stem would collide as domain names."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "x.txt").write_text(TEXT, encoding="utf-8")
    with pytest.raises(CorpusError, match="both"):
        load_corpus([tmp_path / "a", tmp_path / "x.txt"])


def test_corpus_error_is_value_error():
    """CorpusError is a ValueError so generic handlers catch it."""
    assert issubclass(CorpusError, ValueError)


def test_default_corpus_four_distinct_domains():
    """The built-in corpus has 4 named, capped, distinct, deterministic domains."""
    cap = 120_000
    domains = default_corpus(max_bytes_per_domain=cap)
    assert [d.name for d in domains] == ["docs", "code", "docstrings", "unicode"]
    for d in domains:
        assert isinstance(d, Domain) and d.tokens.dtype == np.uint8
        assert 100_000 <= len(d) <= cap
        decode(d.tokens).encode("utf-8")  # cut on a character boundary: no U+FFFD needed
        assert "\ufffd" not in decode(d.tokens[-8:])
    heads = {d.tokens[:2000].tobytes() for d in domains}
    assert len(heads) == 4
    again = default_corpus(max_bytes_per_domain=cap)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(domains, again, strict=True))


def test_split_domain_contiguous_disjoint():
    """train, probe and eval are consecutive, disjoint and cover the domain."""
    tokens = np.arange(1000) % 128  # ASCII: every byte starts a character
    train, probe, ev = split_domain(tokens, probe_frac=0.1, eval_frac=0.05)
    assert (len(train), len(probe), len(ev)) == (850, 100, 50)
    assert np.array_equal(np.concatenate([train, probe, ev]), tokens)


def test_split_domain_rejects_bad_fractions():
    """Fractions that leave no training text raise ValueError."""
    with pytest.raises(ValueError):
        split_domain(np.zeros(10, np.uint8), probe_frac=0.5, eval_frac=0.5)


def test_assign_shards_one_domain_per_node():
    """With k == D each node holds exactly its own domain."""
    parts = [np.full(10, i, np.uint8) for i in range(4)]
    shards = assign_shards(parts, 4)
    assert [set(s.tolist()) for s in shards] == [{0}, {1}, {2}, {3}]


def test_assign_shards_shared_domain_disjoint():
    """With k > D nodes sharing a domain get disjoint contiguous pieces covering it."""
    parts = [np.arange(0, 100), np.arange(100, 200)]
    shards = assign_shards(parts, 5)  # domain 0 -> nodes 0, 2, 4; domain 1 -> nodes 1, 3
    assert np.array_equal(np.concatenate([shards[0], shards[2], shards[4]]), parts[0])
    assert np.array_equal(np.concatenate([shards[1], shards[3]]), parts[1])
    assert len(np.unique(np.concatenate(shards))) == 200


def test_assign_shards_extra_domains_round_robin():
    """With D > k the extra domains are appended to nodes round-robin."""
    parts = [np.full(3, i) for i in range(5)]
    shards = assign_shards(parts, 2)
    assert shards[0].tolist() == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert shards[1].tolist() == [1, 1, 1, 3, 3, 3]


def test_assign_shards_rejects_zero_nodes():
    """k < 1 raises ValueError."""
    with pytest.raises(ValueError):
        assign_shards([np.zeros(5)], 0)


def test_windows_contiguous():
    """Without rng, windows are all the non-overlapping windows in order."""
    tokens = np.arange(50, dtype=np.uint8)
    w = windows(tokens, block_size=9)
    assert w.dtype == torch.long and w.shape == (5, 10)
    assert torch.equal(w.flatten(), torch.arange(50))
    assert windows(tokens, 9, n=2).shape == (2, 10)


def test_windows_random_deterministic():
    """With rng, n random windows are valid slices and reproducible for the same seed."""
    tokens = np.arange(200, dtype=np.uint8)
    a = windows(tokens, 15, n=8, rng=np.random.default_rng(7))
    b = windows(tokens, 15, n=8, rng=np.random.default_rng(7))
    assert a.shape == (8, 16) and torch.equal(a, b)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)


def test_windows_too_short():
    """Text shorter than one window raises CorpusError."""
    with pytest.raises(CorpusError, match="shorter"):
        windows(np.zeros(10, np.uint8), block_size=10)


def test_splits_and_shards_cut_between_utf8_characters():
    """Private shards are text files a node worker checks: no cut may fall inside a character."""
    from pipeline.data import assign_shards, encode, split_domain

    tokens = encode("é€😀 " * 3000)  # 2-, 3- and 4-byte characters
    parts = split_domain(tokens)
    for shard in assign_shards([parts[0]], 64) + list(parts):
        shard.tobytes().decode("utf-8")  # raises on a cut character
    assert sum(map(len, parts)) == len(tokens)
