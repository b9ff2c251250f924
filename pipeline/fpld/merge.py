"""The aggregator's merge of one round: decode each arriving payload strictly and fold it into a
running mean at once, so memory does not grow with the number of nodes.

- dense logits: the mean of the dequantized logits (the paper's teacher);
- sparse logits: the mean of each node's rebuilt log-probs (its top-k log-probs, the tail shaped
  by the broadcast student's own probe logits, which both ends hold), folded at O(rows * k) per
  node without rebuilding any (broker/wire/sparse_rebuild.py): a token missing from one node's
  top-k gets that node's tail estimate, never a zero logit;
- FedAvg: the mean of the nodes' weights (or LoRA adapters).
"""

from __future__ import annotations

import threading

import numpy as np

from broker.wire.codec import PayloadError, decode_logits
from broker.wire.partial import decode_partial, encode_partial
from broker.wire.sparse import decode_sparse_logits
from broker.wire.sparse_rebuild import SparseLogprobMean
from broker.wire.weights import decode_weights
from pipeline.aggregate import RunningMean, TensorMeans
from pipeline.fpld.config import FPLDConfig


class RoundMerge:
    def __init__(self, cfg: FPLDConfig, *, job: str, rnd: int, vocab: int, secret: bytes, max_bytes: int,
                 reference: np.ndarray | None = None) -> None:
        if cfg.method == "fpld" and cfg.payload == "sparse" and reference is None:
            raise ValueError("a sparse merge needs the reference (broadcast student's) probe logits")
        self.cfg, self.job, self.rnd, self.secret, self.max_bytes = cfg, job, rnd, secret, max_bytes
        self.shape = (cfg.probe_seqs * cfg.block_size, vocab)
        self.teacher: RunningMean | TensorMeans | SparseLogprobMean
        if cfg.method == "fedavg":
            self.teacher = TensorMeans()
        elif cfg.payload == "sparse":
            self.teacher = SparseLogprobMean(reference)
        else:
            self.teacher = RunningMean()
        self.full = RunningMean()  # --measure-teacher-kl: the float32 side channel, same nodes
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self.teacher.count

    def fold(self, node: str, payload: bytes, diagnostic: bytes | None = None) -> int:
        """Decode and add one node's payload; returns its size on the wire. Raises PayloadError.
        Thread-safe: payloads decode in parallel, and only the additions take turns."""
        expect = {"expect_job": self.job, "expect_round": self.rnd, "expect_node": node}
        if self.cfg.method == "fedavg":
            _, value = decode_weights(payload, secret=self.secret, max_bytes=self.max_bytes, **expect)
            nbytes = len(payload)
        elif self.cfg.payload == "sparse":
            value, meta = decode_sparse_logits(payload, secret=self.secret, max_bytes=self.max_bytes,
                                               expect_shape=self.shape, **expect)
            nbytes = meta.nbytes
        else:
            value, meta = decode_logits(payload, secret=self.secret, max_bytes=self.max_bytes,
                                        expect_shape=self.shape, **expect)
            nbytes = meta.nbytes
        full = decode_logits(diagnostic, secret=self.secret, max_bytes=1 << 40)[0] if diagnostic is not None else None
        with self._lock:
            self.teacher.add(value)
            if full is not None:
                self.full.add(full)
        return nbytes

    def partial(self, group: str) -> bytes:
        """This merge's sums, signed for the root of a two-level merge (a group aggregator's output)."""
        sums = {"teacher": self.teacher.state(), "full": self.full.state()}
        return encode_partial(sums, secret=self.secret, job=self.job, round=self.rnd, group=group)

    def fold_partial(self, group: str, wire: bytes) -> None:
        """Add a group aggregator's sums: the root's merge. Raises PayloadError."""
        sums = decode_partial(wire, secret=self.secret, max_bytes=1 << 40, expect_job=self.job,
                              expect_round=self.rnd, expect_group=group)
        if set(sums) != {"teacher", "full"}:
            raise PayloadError(f"group {group}'s partial holds {sorted(sums)}, not the teacher's and diagnostic's sums")
        with self._lock:
            self.teacher.add_state(*sums["teacher"])
            self.full.add_state(*sums["full"])

    def full_teacher(self) -> np.ndarray | None:
        """The full-precision teacher of the same nodes, when every merged node sent one."""
        return self.full.mean() if self.full.count and self.full.count == self.teacher.count else None
