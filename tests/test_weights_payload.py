"""FedAvg's signed weight payloads (broker/wire/weights.py): round trip and every refusal."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save

from broker.wire.envelope import PayloadError
from broker.wire.weights import decode_weights, encode_weights

SECRET = b"s" * 32
BLOB = save({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)})


def _wire(blob: bytes = BLOB, **kw) -> bytes:
    return encode_weights(blob, secret=SECRET, **({"job": "j", "round": 1, "node": "0"} | kw))


def test_round_trip():
    data, tensors = decode_weights(_wire(), secret=SECRET, max_bytes=1 << 20, expect_job="j", expect_round=1,
                                   expect_node="0")
    assert data == BLOB and np.array_equal(tensors["a"], np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("kw,match", [
    ({"secret": b"x" * 32}, "bad signature"),
    ({"max_bytes": 100}, "over max_bytes"),
    ({"expect_node": "1"}, "node"),
    ({"expect_round": 2}, "round"),
])
def test_refusals(kw, match):
    args = {"secret": SECRET, "max_bytes": 1 << 20} | kw
    with pytest.raises(PayloadError, match=match):
        decode_weights(_wire(), **args)


def test_not_safetensors_and_non_finite():
    with pytest.raises(PayloadError, match="not a safetensors"):
        decode_weights(_wire(b"\x00" * 40), secret=SECRET, max_bytes=1 << 20)
    bad = save({"a": np.array([1.0, np.nan], np.float32)})
    with pytest.raises(PayloadError, match="non-finite"):
        decode_weights(_wire(bad), secret=SECRET, max_bytes=1 << 20)


def test_flipped_bytes_only_raise_payload_error():
    wire = bytearray(_wire())
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = bytearray(wire)
        w[rng.integers(len(w))] ^= 1 << rng.integers(8)
        try:
            decode_weights(bytes(w), secret=SECRET, max_bytes=1 << 20)
        except PayloadError:
            pass
