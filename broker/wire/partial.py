"""Signed partial sums: what a group aggregator hands the root in a two-level merge.

A group aggregator folds its nodes' payloads into running sums (float64) exactly as a single
aggregator would, and sends those sums with their counts; the root adds the groups' sums and
divides once, so the merged mean is the single-level one up to float64 rounding. One partial holds
several named accumulators (e.g. the teacher's sum and the float32 diagnostic's), each a few
arrays and a count.

A mostly-zero sum (a sparse merge's top-k corrections: at most nodes * k of V per row) travels
as flat indices and values, whichever form is smaller. Arrays are a safetensors blob (never
pickle) inside the same signed envelope as every payload (broker/wire/envelope.py).
"""

from __future__ import annotations

import numpy as np

from broker.wire.envelope import (
    FORMAT_VERSION,
    PayloadError,
    check_expected,
    check_header_args,
    check_secret,
    field,
    is_int,
    open_envelope,
    payload_errors,
    read_header,
    seal,
)

KIND = "partial"
_BODY_KEYS = frozenset({"version", "kind", "job", "round", "node", "shape", "counts", "data"})
_SEP = "@"  # between an accumulator's name and an array's name; "@idx"/"@val"/"@shape" for a sparse array

Sums = dict[str, tuple[dict[str, np.ndarray], int]]
"""accumulator name -> (its arrays by name, how many payloads they sum)"""


def _flat_arrays(sums: Sums) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for acc, (arrays, _) in sums.items():
        for name, a in arrays.items():
            if _SEP in acc or _SEP in name:
                raise ValueError(f"names must not contain {_SEP!r}: {acc!r}/{name!r}")
            a = np.ascontiguousarray(a)
            key = f"{acc}{_SEP}{name}"
            nz = np.flatnonzero(a)
            if a.ndim and nz.size * (8 + a.itemsize) < a.nbytes:  # indices + values beat the dense array
                out[f"{key}{_SEP}idx"] = nz.astype(np.int64)
                out[f"{key}{_SEP}val"] = a.reshape(-1)[nz]
                out[f"{key}{_SEP}shape"] = np.asarray(a.shape, dtype=np.int64)
            else:
                out[key] = a
    return out


def encode_partial(sums: Sums, *, secret: bytes, job: str, round: int, group: str) -> bytes:
    """Sign a group's sums for (job, round, group). Counts must be non-negative integers."""
    from safetensors.numpy import save

    secret = check_secret(secret)
    check_header_args(job, round, group)
    counts = {acc: count for acc, (_, count) in sums.items()}
    if not all(is_int(c) and c >= 0 for c in counts.values()) or len(counts) > 16:
        raise ValueError(f"counts must be non-negative integers, at most 16 accumulators: {counts}")
    flat = _flat_arrays(sums)
    data = save(flat) if flat else b""
    return seal(secret, {"version": FORMAT_VERSION, "kind": KIND, "job": job, "round": round, "node": group,
                         "shape": [len(counts), len(data)], "counts": counts, "data": data})


def decode_partial(wire: bytes, *, secret: bytes, max_bytes: int, expect_job: str | None = None,
                   expect_round: int | None = None, expect_group: str | None = None) -> Sums:
    """Verify a partial and return its sums. Every problem with `wire` raises PayloadError."""
    body, _ = open_envelope(wire, check_secret(secret), max_bytes, _BODY_KEYS)
    job, rnd, group, n_acc, size = read_header(body, KIND)
    check_expected(((n_acc, size), job, rnd, group), None, expect_job, expect_round, expect_group)
    counts = field(body, "counts", dict)
    data = field(body, "data", bytes)
    if len(counts) != n_acc or len(data) != size:
        raise PayloadError(f"partial declares {n_acc} accumulators and {size} bytes, holds {len(counts)} and {len(data)}")
    if not all(isinstance(k, str) and _SEP not in k and is_int(c) and c >= 0 for k, c in counts.items()):
        raise PayloadError("partial counts must map names to non-negative integers")
    from safetensors.numpy import load

    try:
        flat = load(data) if data else {}
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise PayloadError(f"partial data is not a safetensors blob: {str(e).splitlines()[0]}") from None
    sums: Sums = {acc: ({}, count) for acc, count in counts.items()}
    with payload_errors():
        for key, a in flat.items():
            acc, name, *form = key.split(_SEP)
            if acc not in sums or form not in ([], ["idx"], ["val"], ["shape"]):
                raise PayloadError(f"partial array {key!r} belongs to no accumulator")
            if form == ["shape"]:
                idx, val = flat.get(f"{acc}{_SEP}{name}{_SEP}idx"), flat.get(f"{acc}{_SEP}{name}{_SEP}val")
                if idx is None or val is None or idx.shape != val.shape or idx.ndim != 1:
                    raise PayloadError(f"partial sparse array {acc}/{name} is incomplete")
                shape = tuple(int(s) for s in a)
                dense = np.zeros(int(np.prod(shape)), dtype=val.dtype)
                if idx.size and (idx.min() < 0 or idx.max() >= dense.size):
                    raise PayloadError(f"partial sparse array {acc}/{name} has indices out of range")
                dense[idx] = val
                sums[acc][0][name] = dense.reshape(shape)
            elif not form:
                sums[acc][0][name] = a
        for acc, (arrays, _) in sums.items():
            # -inf is a masked token's log-prob, a real value; NaN and +inf are not
            if any(np.isnan(a).any() or np.isposinf(a).any() for a in arrays.values() if a.dtype.kind == "f"):
                raise PayloadError(f"partial {acc} has NaN or +inf values")
    return sums
