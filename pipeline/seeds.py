"""Seeds derived from names, so every process that knows the names derives the same seed."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ids, e.g. derive_seed(job, round, node, "dither"): a node's dither and
    the receiver's agree on it without sending it; derive_seed(cfg.seed, "expert", 2) seeds a model."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
