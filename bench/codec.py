"""Benchmark the logit codec: wire size and throughput at B in {2, 4, 8, 16, 32} bits.

Encodes seeded Gaussian logits with a per-row offset (a stand-in for a batch of next-token logits)
in clip mode, the FPLD paper's quantizer (arXiv 2605.09986), and compares the payload with raw
float32 and with Celery's default JSON encoding of the same numbers. Throughput is MB (10**6 bytes)
of float32 input per second, best of --repeat; decoding includes the HMAC check.

    python bench/codec.py [--rows 4096 --cols 256 --repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow running from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

from broker.wire.codec import decode_logits, encode_logits  # noqa: E402

BITS = (2, 4, 8, 16, 32)
SECRET = b"bench-secret"


def make_logits(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 4.0, (rows, cols)) + rng.normal(0.0, 4.0, (rows, 1))).astype(np.float32)


def json_size(x: np.ndarray) -> int:
    """Bytes Celery's default (JSON) serializer would put on the wire for these logits."""
    try:
        from kombu.serialization import dumps
    except ImportError:  # kombu comes with celery; plain json gives the same digits
        return len(json.dumps(x.tolist()).encode())
    data = dumps(x.tolist(), serializer="json")[2]
    return len(data.encode() if isinstance(data, str) else data)


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(rows: int, cols: int, repeat: int, clip: float, seed: int, dither: bool) -> dict[str, Any]:
    x = make_logits(rows, cols, seed)
    mb = x.nbytes / 1e6
    float32_bytes = len(x.astype("<f4").tobytes())
    json_bytes = json_size(x)
    in_range = np.abs(x) <= clip
    results, accuracy = [], {}
    for bits in BITS:
        kw: dict[str, Any] = dict(secret=SECRET, job="bench", round=0, node="n0", bits=bits, clip=clip,
                                  dither_seed=seed if dither else None)
        wire = encode_logits(x, **kw)
        out, _ = decode_logits(wire, secret=SECRET, expect_shape=x.shape)
        enc_s = best_time(lambda kw=kw: encode_logits(x, **kw), repeat)
        dec_s = best_time(lambda wire=wire: decode_logits(wire, secret=SECRET), repeat)
        err = (out.astype(np.float64) - x)[in_range]
        accuracy[str(bits)] = {"rmse": float(np.sqrt(np.mean(err**2))), "max_abs_err": float(np.abs(err).max())}
        results.append({
            "bits": bits,
            "payload_bytes": len(wire),
            "float32_bytes": float32_bytes,
            "json_bytes": json_bytes,
            "encode_mb_s": round(mb / enc_s, 1),
            "decode_mb_s": round(mb / dec_s, 1),
        })
    return {
        "rows": results,
        "shape": [rows, cols],
        "clip": clip,
        "dither": dither,
        "repeat": repeat,
        "accuracy_in_range": accuracy,
        "clipped_fraction": float(1 - in_range.mean()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
    }


def table(report: dict[str, Any]) -> str:
    head = f"{'bits':>4} {'payload':>11} {'vs f32':>7} {'vs json':>8} {'enc MB/s':>9} {'dec MB/s':>9} {'rmse':>10}"
    lines = [f"shape {tuple(report['shape'])}, clip {report['clip']}, dither {report['dither']}, "
             f"float32 {report['rows'][0]['float32_bytes']} B, json {report['rows'][0]['json_bytes']} B", head]
    for r in report["rows"]:
        rmse = report["accuracy_in_range"][str(r["bits"])]["rmse"]
        lines.append(
            f"{r['bits']:>4} {r['payload_bytes']:>11} {r['float32_bytes'] / r['payload_bytes']:>6.2f}x "
            f"{r['json_bytes'] / r['payload_bytes']:>7.1f}x {r['encode_mb_s']:>9.1f} {r['decode_mb_s']:>9.1f} "
            f"{rmse:>10.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--clip", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dither", action="store_true", help="use subtractive dither (seeded)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "codec.json")
    p.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    args = p.parse_args(argv)

    report = run(args.rows, args.cols, max(args.repeat, 1), args.clip, args.seed, args.dither)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
