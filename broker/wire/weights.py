"""Signed weight payloads: FedAvg's uplink (a node's fine-tuned weights, or its LoRA adapters).

The body carries a safetensors blob (a JSON header plus raw tensor bytes, never pickle), signed
with HMAC-SHA256 like every payload (broker/wire/codec.py), and names its job, round and node so
a payload replayed into another round is refused.
"""

from __future__ import annotations

import numpy as np

from broker.wire.envelope import (
    FORMAT_VERSION,
    PayloadError,
    check_expected,
    check_header_args,
    check_secret,
    open_envelope,
    read_header,
    seal,
)

KIND = "weights"
_BODY_KEYS = frozenset({"version", "kind", "job", "round", "node", "shape", "data"})


def encode_weights(data: bytes, *, secret: bytes, job: str, round: int, node: str) -> bytes:
    """Sign a safetensors blob for (job, round, node); `shape` is [1, its length in bytes]."""
    secret = check_secret(secret)
    check_header_args(job, round, node)
    return seal(secret, {"version": FORMAT_VERSION, "kind": KIND, "job": job, "round": round, "node": node,
                         "shape": [1, len(data)], "data": bytes(data)})


def decode_weights(wire: bytes, *, secret: bytes, max_bytes: int, expect_job: str | None = None,
                   expect_round: int | None = None, expect_node: str | None = None
                   ) -> tuple[bytes, dict[str, np.ndarray]]:
    """Verify a weight payload; returns the safetensors blob and its tensors (numpy).

    Every problem with `wire` raises PayloadError: size, signature, fields, a blob that is not
    safetensors, non-finite weights."""
    body, _ = open_envelope(wire, check_secret(secret), max_bytes, _BODY_KEYS)
    job, rnd, node, _, size = read_header(body, KIND)
    check_expected(((1, size), job, rnd, node), None, expect_job, expect_round, expect_node)
    data = body["data"]
    if not isinstance(data, bytes) or len(data) != size:
        raise PayloadError(f"weights data must be {size} bytes")
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise PayloadError(f"weights are not a safetensors blob: {str(e).splitlines()[0]}") from None
    for name, t in tensors.items():
        if not np.all(np.isfinite(t)):
            raise PayloadError(f"weight {name} has non-finite values")
    return data, tensors
