"""Signed weight payloads: FedAvg's uplink (a node's fine-tuned weights, or its LoRA adapters).

The body carries a safetensors blob (a JSON header plus raw tensor bytes, never pickle), signed
with HMAC-SHA256 like every payload (broker/wire/codec.py), and names its job, round and node so
a payload replayed into another round is refused.
"""

from __future__ import annotations

import hmac

import msgpack
import numpy as np

from broker.wire.codec import FORMAT_VERSION, PayloadError, _check_secret, _name_error, _sign, _unpack_map

KIND = "weights"
_OUTER_KEYS = frozenset({"v", "body", "sig"})
_BODY_KEYS = frozenset({"version", "kind", "job", "round", "node", "data"})


def encode_weights(data: bytes, *, secret: bytes, job: str, round: int, node: str) -> bytes:
    """Sign a safetensors blob for (job, round, node)."""
    secret = _check_secret(secret)
    for field, v in (("job", job), ("node", node)):
        if (err := _name_error(field, v)) is not None:
            raise ValueError(err)
    body = msgpack.packb({"version": FORMAT_VERSION, "kind": KIND, "job": job, "round": round, "node": node,
                          "data": bytes(data)}, use_bin_type=True)
    return msgpack.packb({"v": FORMAT_VERSION, "body": body, "sig": _sign(secret, body)}, use_bin_type=True)


def decode_weights(wire: bytes, *, secret: bytes, max_bytes: int, expect_job: str | None = None,
                   expect_round: int | None = None, expect_node: str | None = None
                   ) -> tuple[bytes, dict[str, np.ndarray]]:
    """Verify a weight payload; returns the safetensors blob and its tensors (float32 numpy).

    Every problem with `wire` raises PayloadError: size, signature, fields, a blob that is not
    safetensors, non-finite weights."""
    secret = _check_secret(secret)
    if not isinstance(wire, (bytes, bytearray, memoryview)):
        raise PayloadError(f"wire must be bytes, got {type(wire).__name__}")
    wire = bytes(wire)
    if len(wire) > max_bytes:
        raise PayloadError(f"payload is {len(wire)} bytes, over max_bytes={max_bytes}")
    outer = _unpack_map(wire, "envelope", _OUTER_KEYS)
    body_bytes, sig = outer["body"], outer["sig"]
    if outer["v"] != FORMAT_VERSION or not isinstance(body_bytes, bytes) or not isinstance(sig, bytes):
        raise PayloadError("malformed envelope")
    if not hmac.compare_digest(_sign(secret, body_bytes), sig):
        raise PayloadError("bad signature: wrong secret or tampered payload")
    body = _unpack_map(body_bytes, "body", _BODY_KEYS)
    if body["kind"] != KIND:
        raise PayloadError(f"payload kind is {body['kind']!r}, expected {KIND!r}")
    for name, want in (("job", expect_job), ("round", expect_round), ("node", expect_node)):
        if want is not None and body[name] != want:
            raise PayloadError(f"{name} {body[name]!r} does not match expected {want!r}")
    data = body["data"]
    if not isinstance(data, bytes):
        raise PayloadError("weights data must be bytes")
    from safetensors.numpy import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise PayloadError(f"weights are not a safetensors blob: {str(e).splitlines()[0]}") from None
    for name, t in tensors.items():
        if not np.all(np.isfinite(t)):
            raise PayloadError(f"weight {name} has non-finite values")
    return data, tensors
