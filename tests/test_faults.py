"""Fault specs for drills."""

from __future__ import annotations

import pytest

from broker.faults import Fault, FaultSpecError, mangle, parse_fault


def test_parse_fault_forms():
    """Kind, optional number, optional rounds."""
    assert parse_fault("slow:20@0") == Fault("slow", 20.0, (0,))
    assert parse_fault("raise") == Fault("raise", 1.0, None)
    assert parse_fault("corrupt@1,2").fires(2) and not parse_fault("corrupt@1,2").fires(0)


@pytest.mark.parametrize("spec", ["explode", "slow:x", "slow:-1", "raise@a"])
def test_parse_fault_rejects_bad_specs(spec):
    """Unknown kinds and malformed numbers are errors, not silent no-ops."""
    with pytest.raises(FaultSpecError):
        parse_fault(spec)


def test_mangle_changes_payload():
    """corrupt flips one byte, truncate halves."""
    data = bytes(range(100))
    bad = mangle(data, Fault("corrupt"))
    assert len(bad) == len(data) and sum(a != b for a, b in zip(bad, data, strict=True)) == 1
    assert mangle(data, Fault("truncate")) == data[:50]
