"""The two halves of an FC-RAG query round as plain functions: what a node does, what the hub does.

Node i (Algorithm 2 of arXiv 2605.09986): retrieve Z_i = top-k passages of its own index for the
query X, run the student on [Z_i, X] (byte level, cut to its block size), propose the top-k'
next bytes A_i(X), score them s_i = -log P(y | Z_i, X) clipped to [0, S_max], quantize the k'
scores with B_i/k' bits each (subtractive dither) and send them, with the candidate ids, signed.
Hub: mean score over the nodes that proposed y, +inf otherwise; conformal quantile from the
calibration round; set = {y : s <= q_hat}. Celery tasks (workers/rag.py) only do I/O.

Imports of torch stay inside the node-side functions: the query client needs none of them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from broker.wire.codec import PayloadError, decode_logits, encode_logits
from pipeline.rag import conformal
from pipeline.rag.config import RAW_BITS, RAGConfig

ID_CLIP = 127.5  # candidate ids 0..255 travel as id - 127.5 on an 8-bit grid of step 1: exact
SEPARATOR = b"\n"
_EVAL_BATCH = 256


def context_bytes(cfg: RAGConfig, block_size: int) -> int:
    return min(cfg.context_bytes or block_size // 2, block_size)


# --- wire helpers --------------------------------------------------------------------------------

def contexts_to_blob(contexts: list[bytes]) -> bytes:
    return msgpack.packb([bytes(c) for c in contexts], use_bin_type=True)


def contexts_from_blob(data: bytes) -> list[bytes]:
    out = msgpack.unpackb(data, raw=False, max_bin_len=len(data), max_str_len=0, max_map_len=0)
    if not isinstance(out, list) or not all(isinstance(c, bytes) for c in out):
        raise ValueError("query blob must be a msgpack list of byte strings")
    return out


# --- node side ------------------------------------------------------------------------------------

def model_input(context: bytes, passages: list[bytes], block_size: int) -> np.ndarray:
    """[passages..., context] as bytes, cut to the last block_size: the query stays whole and the
    most similar passage (last in `passages`) sits right before it."""
    prefix = SEPARATOR.join(passages) + SEPARATOR if passages else b""
    seq = (prefix + context)[-block_size:] or SEPARATOR  # an empty query still needs one token
    return np.frombuffer(seq, dtype=np.uint8)


def next_byte_logprobs(model, inputs: list[np.ndarray]) -> np.ndarray:
    """log P(next byte | input) for each input: (n, 256). Inputs of one length share a batch."""
    import torch
    from torch.nn import functional as F

    out = np.zeros((len(inputs), 256), dtype=np.float32)
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(inputs):
        by_len.setdefault(len(x), []).append(i)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for idx in by_len.values():
            for j in range(0, len(idx), _EVAL_BATCH):
                rows = idx[j : j + _EVAL_BATCH]
                batch = torch.from_numpy(np.stack([inputs[i] for i in rows]).astype(np.int64))  # (b, T)
                logits, _ = model(batch)  # (b, T, V)
                out[rows] = F.log_softmax(logits[:, -1, :].float(), dim=-1).numpy()
    model.train(was_training)
    return out


@dataclass
class NodeScores:
    ids: np.ndarray  # (n, k') candidate bytes, most probable first
    scores: np.ndarray  # (n, k') -log P, clipped to [0, s_max]
    retrieved: np.ndarray  # (n, k) passage ids used


def node_scores(model, index, contexts: list[bytes], cfg: RAGConfig) -> NodeScores:
    """Retrieve, run the student on [Z_i, X], keep the top-k' next bytes and their scores."""
    block = model.config.block_size
    ctx_len = context_bytes(cfg, block)
    ctxs = [c[-ctx_len:] if ctx_len else b"" for c in contexts]
    if cfg.passages > 0 and index is not None and len(index):
        retrieved, _ = index.search(ctxs, cfg.passages)
    else:
        retrieved = np.zeros((len(ctxs), 0), dtype=np.int64)
    inputs = [model_input(c, [index.passages[j].tobytes() for j in row[::-1]], block)
              for c, row in zip(ctxs, retrieved, strict=True)]
    logp = next_byte_logprobs(model, inputs)
    k = cfg.candidates
    top = np.argpartition(-logp, k - 1, axis=1)[:, :k] if k < logp.shape[1] else np.tile(np.arange(256), (len(ctxs), 1))
    order = np.argsort(-np.take_along_axis(logp, top, axis=1), axis=1, kind="stable")
    ids = np.take_along_axis(top, order, axis=1)
    scores = np.clip(-np.take_along_axis(logp, ids, axis=1), 0.0, cfg.s_max).astype(np.float32)
    return NodeScores(ids.astype(np.int64), scores, retrieved)


def encode_node_payload(out: NodeScores, *, bits: int, cfg: RAGConfig, secret: bytes, job: str, rnd: int,
                        node: str, dither_seed: int | None) -> bytes:
    """Two signed codec payloads in one msgpack map: the scores at `bits` bits each (shifted by
    S_max/2 onto the codec's symmetric clip range) and the candidate ids, exact at 8 bits."""
    half = cfg.s_max / 2.0
    raw = bits == RAW_BITS
    w_scores = encode_logits(out.scores - half, secret=secret, job=job, round=rnd, node=node, bits=bits,
                             clip=None if raw else half, dither_seed=None if raw else dither_seed)
    w_ids = encode_logits(out.ids.astype(np.float32) - ID_CLIP, secret=secret, job=job, round=rnd,
                          node=f"{node}.ids", bits=8, clip=ID_CLIP)
    return msgpack.packb({"v": 1, "scores": w_scores, "ids": w_ids}, use_bin_type=True)


def decode_node_payload(wire: bytes, *, secret: bytes, max_bytes: int, job: str, rnd: int, node: str,
                        n: int, cfg: RAGConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, scores, wire bytes) from a node's payload; PayloadError for anything off-protocol,
    including more bits per score than the node's budget allows."""
    if not isinstance(wire, bytes) or len(wire) > max_bytes:
        raise PayloadError("payload missing or over max_bytes")
    try:
        outer = msgpack.unpackb(wire, raw=False, max_bin_len=len(wire), max_str_len=16, max_map_len=3,
                                max_array_len=0, max_ext_len=0)
    except Exception as e:  # msgpack raises many types
        raise PayloadError(f"node payload is not valid msgpack: {e}") from e
    if not isinstance(outer, dict) or set(outer) != {"v", "scores", "ids"} or outer["v"] != 1:
        raise PayloadError("node payload must be {v: 1, scores, ids}")
    shape = (n, cfg.candidates)
    ids_f, m_ids = decode_logits(outer["ids"], secret=secret, max_bytes=max_bytes, expect_shape=shape,
                                 expect_job=job, expect_round=rnd, expect_node=f"{node}.ids")
    if m_ids.bits != 8 or m_ids.clip != ID_CLIP or m_ids.dither_seed is not None:
        raise PayloadError("candidate ids must be 8-bit codes without dither")
    scores, meta = decode_logits(outer["scores"], secret=secret, max_bytes=max_bytes, expect_shape=shape,
                                 expect_job=job, expect_round=rnd, expect_node=node)
    bits = cfg.bits_of(node)
    half = cfg.s_max / 2.0
    if meta.bits != bits or (bits != RAW_BITS and meta.clip != half):
        raise PayloadError(f"scores sent at {meta.bits} bits (clip {meta.clip}); the budget of node {node} "
                           f"is {bits} bits per score on [0, {cfg.s_max}]")
    ids = np.rint(ids_f + ID_CLIP).astype(np.int64)
    srt = np.sort(ids, axis=1)
    if np.any(srt[:, 1:] == srt[:, :-1]):
        raise PayloadError("a node proposed the same candidate twice for one query")
    return ids, scores.astype(np.float64) + half, len(wire)


# --- hub side -------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """What the hub keeps from the calibration round: per node, the score of the true label.

    label_scores (n_cal, K): +inf where node i did not propose the label, NaN where node i was not
    merged in the calibration round. Keeping them per node (not just q_hat) lets the hub calibrate
    exactly for whichever subset of nodes a later query merges, so a dropped node never breaks
    the exchangeability that split conformal needs.
    """

    label_scores: np.ndarray
    bits: list[int]
    s_max: float
    delta: float
    meta: dict

    @property
    def n_cal(self) -> int:
        return int(self.label_scores.shape[0])

    @property
    def node_mask(self) -> np.ndarray:
        """Nodes merged in the calibration round: the only ones a query may merge."""
        return ~np.isnan(self.label_scores).any(axis=0)

    def scores_for(self, mask: np.ndarray) -> np.ndarray:
        return conformal.merged_label_scores(self.label_scores, mask)

    def bound(self, alpha: float, mask: np.ndarray) -> dict:
        """q_hat for the nodes in mask, and the Theorem 5.4 slack for their budgets."""
        cal = self.scores_for(mask)
        qhat = conformal.conformal_quantile(cal, alpha)
        variances = [conformal.score_variance(b, self.s_max) for b, m in zip(self.bits, mask, strict=True) if m]
        radius = 3.0 * math.sqrt(sum(variances)) / max(len(variances), 1)
        f_max = conformal.estimate_fmax(cal, qhat, radius)
        sl = conformal.slack(self.n_cal, f_max, variances, self.delta)
        return {"alpha": alpha, "qhat": qhat, "merged": int(mask.sum()), "slack": sl,
                "bound": 1.0 - alpha - sl["total"]}

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        meta = {**self.meta, "bits": self.bits, "s_max": self.s_max, "delta": self.delta}
        return save({"label_scores": np.ascontiguousarray(self.label_scores, dtype=np.float64)},
                    metadata={"meta": json.dumps(meta, sort_keys=True)})

    @classmethod
    def from_bytes(cls, data: bytes) -> Calibration:
        from safetensors.numpy import load

        ls = load(data)["label_scores"]  # validates the whole file before we trust its header
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(json.loads(data[8 : 8 + n]).get("__metadata__", {}).get("meta", "{}"))
        return cls(ls, [int(b) for b in meta.pop("bits")], float(meta.pop("s_max")), float(meta.pop("delta")), meta)


def stack_nodes(decoded: dict[str, tuple[np.ndarray, np.ndarray]], node_ids: list[str], n: int,
                k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, K, k') ids and scores of all nodes, and the (K,) mask of those that were merged."""
    ids = np.zeros((n, len(node_ids), k), dtype=np.int64)
    scores = np.full((n, len(node_ids), k), np.inf)
    mask = np.zeros(len(node_ids), dtype=bool)
    for i, node in enumerate(node_ids):
        if node in decoded:
            ids[:, i], scores[:, i] = decoded[node]
            mask[i] = True
    return ids, scores, mask


def calibrate(ids: np.ndarray, scores: np.ndarray, mask: np.ndarray, labels: np.ndarray, cfg: RAGConfig,
              meta: dict) -> Calibration:
    per_node = conformal.label_scores(ids, scores, labels)
    per_node[:, ~mask] = np.nan
    return Calibration(per_node, [cfg.bits_of(n) for n in cfg.node_ids], cfg.s_max, cfg.delta, meta)


def predict(ids: np.ndarray, scores: np.ndarray, mask: np.ndarray, calib: Calibration,
            alphas: list[float]) -> dict:
    """Sets for each alpha from the merged nodes that were also calibrated, with their bound."""
    use = mask & calib.node_mask
    swarm = conformal.swarm_scores(ids, scores, use)  # (n, V)
    bounds = {str(a): calib.bound(a, use) for a in alphas}
    queries = []
    for row in swarm:
        cand = np.nonzero(np.isfinite(row))[0]
        cand = cand[np.argsort(row[cand], kind="stable")]
        sets = {}
        for a, b in bounds.items():
            sets[a] = "all" if math.isinf(b["qhat"]) else [int(y) for y in cand if row[y] <= b["qhat"]]
        queries.append({"cands": [[int(y), round(float(row[y]), 6)] for y in cand], "sets": sets})
    return {"bounds": bounds, "queries": queries, "used_nodes": [int(i) for i in np.nonzero(use)[0]],
            "uncalibrated": [int(i) for i in np.nonzero(mask & ~calib.node_mask)[0]]}
