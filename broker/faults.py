"""Fault injection for drills and tests: make chosen nodes slow, raise, crash or send bad payloads.

A test hook: workers/base.py calls `before_work` and `before_send`; no task body does.

A job's config carries `faults: {node_id: spec}` so a faulty run is as reproducible as any other.
Specs (`ROUNDS` is optional, e.g. `@0` or `@0,2`; without it the fault fires every round):
  slow:SECONDS[@ROUNDS]    sleep before sending (past the deadline: the node is dropped)
  raise:N[@ROUNDS]         raise on the first N attempts (each retry is one attempt)
  crash[@ROUNDS]           kill the worker process on the first attempt (tests redelivery)
  corrupt[@ROUNDS]         flip a byte of the signed payload (the aggregator must reject it)
  truncate[@ROUNDS]        send half the payload
  forge[@ROUNDS]           sign with the wrong secret
  oversize[@ROUNDS]        send 8x the rows as raw float32 (over the aggregator's size limit)
  reshape[@ROUNDS]         send half the vocabulary columns (wrong shape)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from broker.wire.codec import decode_logits, encode_logits

KINDS = ("slow", "raise", "crash", "corrupt", "truncate", "forge", "oversize", "reshape")
PAYLOAD_KINDS = ("corrupt", "truncate", "forge", "oversize", "reshape")


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    arg: float = 0.0
    rounds: tuple[int, ...] | None = None

    def fires(self, rnd: int) -> bool:
        return self.rounds is None or rnd in self.rounds


def parse_fault(spec: str) -> Fault:
    """'slow:20@0' -> Fault('slow', 20.0, (0,))."""
    body, _, rounds_s = spec.partition("@")
    kind, _, arg_s = body.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise FaultSpecError(f"unknown fault {kind!r} in {spec!r}; one of {', '.join(KINDS)}")
    try:
        arg = float(arg_s) if arg_s else (1.0 if kind == "raise" else 0.0)
        rounds = tuple(int(r) for r in rounds_s.split(",")) if rounds_s else None
    except ValueError:
        raise FaultSpecError(f"bad fault spec {spec!r}: expected KIND[:NUMBER][@ROUND,...]") from None
    if arg < 0:
        raise FaultSpecError(f"bad fault spec {spec!r}: negative number")
    return Fault(kind, arg, rounds)


def parse_faults(items: dict[str, str]) -> dict[str, Fault]:
    return {str(node): parse_fault(spec) for node, spec in items.items()}


def mangle(payload: bytes, fault: Fault, secret: bytes = b"") -> bytes:
    """Damage a signed payload the way a buggy or hostile node would."""
    if fault.kind == "corrupt":
        i = len(payload) // 2
        return payload[:i] + bytes([payload[i] ^ 0x5A]) + payload[i + 1:]
    if fault.kind == "truncate":
        return payload[: len(payload) // 2]
    if fault.kind in ("forge", "oversize", "reshape"):
        x, meta = decode_logits(payload, secret=secret)
        ids = dict(job=meta.job, round=meta.round, node=meta.node)
        if fault.kind == "forge":
            return encode_logits(x, secret=b"not-the-fleet-secret", bits=meta.bits, clip=meta.clip, **ids)
        if fault.kind == "oversize":
            return encode_logits(np.tile(x, (8, 1)), secret=secret, bits=32, **ids)
        return encode_logits(x[:, : x.shape[1] // 2], secret=secret, bits=meta.bits, clip=meta.clip, **ids)
    return payload


def before_work(fault: Fault | None, attempt: int, retries: int) -> None:
    """Drill faults that strike before a task does its work (called by workers/base.py only)."""
    if fault is None:
        return
    if fault.kind == "crash" and attempt == 1:
        os._exit(1)  # the worker process dies mid-task; acks_late + reject_on_worker_lost redeliver it
    if fault.kind == "raise" and retries < fault.arg:
        raise RuntimeError(f"injected fault: raise on attempt {retries + 1}")


def before_send(fault: Fault | None, payload: bytes, secret: bytes) -> bytes:
    """Drill faults that strike as a payload is sent: delay it or damage it."""
    if fault is None:
        return payload
    if fault.kind == "slow":
        time.sleep(fault.arg)
    if fault.kind in PAYLOAD_KINDS:
        return mangle(payload, fault, secret)
    return payload
