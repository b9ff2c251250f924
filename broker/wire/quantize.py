"""Uniform (optionally dithered) scalar quantization of logit matrices, plus bit packing.

This is the quantizer of the FPLD paper (arXiv 2605.09986): logits are clipped to a range,
mapped onto a uniform grid of ``2**B`` levels and sent as B-bit integer codes. With subtractive
dither the sender adds a pseudo-random offset ``u ~ U[-1/2, 1/2)`` (in units of the step) before
rounding and the receiver, regenerating ``u`` from the shared seed, subtracts it again. That makes
the reconstruction error uniform on ``[-step/2, step/2]``, mean zero and independent of the signal,
so averaging many nodes' logits averages the quantization noise away instead of accumulating bias.

One deliberate difference from the paper: it uses a step of ``2L / 2**B`` for the range
``[-L, L]``, whose top level sits one step below ``+L``. We use ``(hi - lo) / (2**B - 1)``, a grid
that includes both endpoints, so every in-range value (and its dithered version, which can move at
most half a step) lands within half a step of a representable level: neither plain nor dithered
rounding ever overloads, and the error bound ``|x_hat - x| <= step/2`` holds everywhere in range.

Everything here is pure numpy; the wire format lives in :mod:`broker.wire.codec`.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

MAX_BITS = 16

# Powers of two that divide a byte pack without straddling byte boundaries.
_SUB_BYTE = (2, 4)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def code_dtype(bits: int) -> np.dtype:
    """The smallest unsigned dtype that holds ``bits``-bit codes (uint8 or uint16)."""
    return np.dtype(np.uint8) if _check_bits(bits) <= 8 else np.dtype(np.uint16)


def step_size(lo: ArrayLike, hi: ArrayLike, bits: int) -> np.ndarray | float:
    """Grid spacing for ``2**bits`` levels spanning ``[lo, hi]`` with both endpoints on the grid.

    The paper (arXiv 2605.09986) uses ``2L / 2**B`` for ``[-L, L]``; the endpoint-inclusive
    ``(hi - lo) / (2**B - 1)`` used here is what keeps dithered rounding from overloading.
    """
    qmax = (1 << _check_bits(bits)) - 1
    step = (np.asarray(hi, dtype=np.float64) - np.asarray(lo, dtype=np.float64)) / qmax
    return float(step) if step.ndim == 0 else step


def dither(seed: int, shape: int | tuple[int, ...]) -> np.ndarray:
    """Deterministic float32 dither, uniform in ``[-0.5, 0.5)``, regenerated identically from ``seed``.

    Sender and receiver both call this with the seed from the payload header (subtractive dither),
    so the noise itself never travels over the wire. float32: the receiver makes one per node and
    payload, and float64 draws took 5x as long.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    u = rng.random(shape, dtype=np.float32)
    u -= np.float32(0.5)
    return u


def _range(x_shape: tuple[int, ...], lo: ArrayLike, hi: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    lo_a = np.asarray(lo, dtype=np.float64)
    hi_a = np.asarray(hi, dtype=np.float64)
    try:
        np.broadcast_shapes(x_shape, lo_a.shape, hi_a.shape)
    except ValueError as exc:
        raise ValueError(f"lo/hi of shapes {lo_a.shape}/{hi_a.shape} do not broadcast to {x_shape}") from exc
    if not (np.all(np.isfinite(lo_a)) and np.all(np.isfinite(hi_a))):
        raise ValueError("lo and hi must be finite")
    if np.any(hi_a < lo_a):
        raise ValueError("hi must be >= lo")
    return lo_a, hi_a


def quantize(
    x: ArrayLike, bits: int, lo: ArrayLike, hi: ArrayLike, dither_seed: int | None = None
) -> np.ndarray:
    """Map a 2-D float array onto integer codes in ``[0, 2**bits - 1]`` (uint8 or uint16).

    ``lo``/``hi`` are scalars or per-row arrays of shape ``(rows, 1)``; values are clipped to the
    range first. A row with ``hi == lo`` has step 0 and quantizes to all-zero codes.
    """
    bits = _check_bits(bits)
    # Up to 8 bits in float32, in place: a code is at most 255, so float32's 2**-24 relative error
    # moves t by under 2e-5 of a step, and a node encodes 1 M values a round (float64 with its
    # temporaries was half of a small node's CPU). Finer grids keep float64.
    dtype = np.float32 if bits <= 8 else np.float64
    xa = np.asarray(x)
    if xa.ndim != 2:
        raise ValueError(f"x must be 2-D (rows x cols), got shape {xa.shape}")
    lo_a, hi_a = _range(xa.shape, lo, hi)
    qmax = (1 << bits) - 1
    step = np.asarray(step_size(lo_a, hi_a, bits))
    flat = step == 0
    # Divide by 1 where the range is degenerate; those entries are forced to code 0 below anyway.
    t, lo_t = np.array(xa, dtype=dtype), lo_a.astype(dtype)
    np.clip(t, lo_t, hi_a.astype(dtype), out=t)
    t -= lo_t
    t /= np.where(flat, 1.0, step).astype(dtype)
    if dither_seed is not None:
        t += dither(dither_seed, xa.shape)
    np.rint(t, out=t)
    np.clip(t, 0, qmax, out=t)
    if np.any(flat):
        t = np.where(flat, 0.0, t)
    return t.astype(code_dtype(bits))


def dequantize(
    codes: ArrayLike, bits: int, lo: ArrayLike, hi: ArrayLike, dither_seed: int | None = None
) -> np.ndarray:
    """Reconstruct float32 values ``lo + (code - u) * step`` from codes made by :func:`quantize`.

    Not clipped back into ``[lo, hi]`` on purpose: clipping would bias the dithered error near
    the range edges and break its mean-zero property.
    """
    bits = _check_bits(bits)
    ca = np.asarray(codes)
    if ca.dtype.kind not in "ui":
        raise ValueError(f"codes must be an integer array, got dtype {ca.dtype}")
    lo_a, hi_a = _range(ca.shape, lo, hi)
    step = step_size(lo_a, hi_a, bits)
    # float32, in place: an aggregator dequantizes one payload per node, and float64 temporaries
    # made this 3x slower. (code - u) is exact to 2**-24 of a code: at 16 bits, 0.4% of a step.
    out = ca.astype(np.float32)
    if dither_seed is not None:
        out -= dither(dither_seed, ca.shape)
    out *= np.asarray(step, dtype=np.float32)
    out += lo_a.astype(np.float32)
    return out


def packed_size(count: int, bits: int) -> int:
    """Exact number of bytes :func:`pack_bits` produces for ``count`` values of width ``bits``."""
    return (count * _check_bits(bits) + 7) // 8


def pack_bits(codes: ArrayLike, bits: int) -> bytes:
    """Pack unsigned codes little-endian, LSB first, into exactly ``ceil(count * bits / 8)`` bytes.

    Value ``i`` occupies stream bits ``[i*bits, (i+1)*bits)``, where stream bit ``k`` is bit
    ``k % 8`` of byte ``k // 8``; unused bits of the final byte are zero.
    """
    bits = _check_bits(bits)
    v = np.asarray(codes).ravel()
    if v.size and v.dtype.kind not in "ui":
        raise ValueError(f"codes must be an integer array, got dtype {v.dtype}")
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    if bits == 8:
        return v.astype(np.uint8).tobytes()
    if bits == 16:
        return v.astype("<u2").tobytes()
    if bits == 1:
        return np.packbits(v.astype(np.uint8), bitorder="little").tobytes()
    if bits in _SUB_BYTE:
        per = 8 // bits
        padded = np.zeros(-(-v.size // per) * per, dtype=np.uint8)
        padded[: v.size] = v
        groups = padded.reshape(-1, per)
        out = groups[:, 0].copy()
        for j in range(1, per):
            out |= groups[:, j] << np.uint8(j * bits)
        return out.tobytes()
    # Generic width: spell every value out as `bits` little-endian bits, then pack the bit stream.
    shifts = np.arange(bits, dtype=np.uint16)
    bit_matrix = ((v.astype(np.uint16)[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.ravel(), bitorder="little").tobytes()


def unpack_bits(buf: bytes | bytearray | memoryview, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` codes as uint8 (bits <= 8) or uint16.

    Raises ValueError unless ``buf`` is exactly ``ceil(count * bits / 8)`` bytes long.
    """
    bits = _check_bits(bits)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    count = int(count)
    raw = np.frombuffer(buf, dtype=np.uint8)
    expected = packed_size(count, bits)
    if raw.size != expected:
        raise ValueError(f"{bits}-bit buffer for {count} values must be {expected} bytes, got {raw.size}")
    if bits == 8:
        return raw.copy()
    if bits == 16:
        return raw.view("<u2").astype(np.uint16)
    if bits == 1:
        return np.unpackbits(raw, count=count, bitorder="little")
    if bits in _SUB_BYTE:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
        mask = np.uint8((1 << bits) - 1)
        return ((raw[:, None] >> shifts) & mask).ravel()[:count]
    bit_matrix = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    weights = (1 << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    return (bit_matrix @ weights).astype(code_dtype(bits))
