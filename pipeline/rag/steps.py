"""The two halves of an FC-RAG query round as plain functions: what a node does, what the hub does.

Node i (Algorithm 2 of arXiv 2605.09986): retrieve Z_i = top-k passages of its own index for the
question X, score every option y with the job's scorer LM, s_i(X, y) = mean token NLL of y given
[Z_i, X] (pipeline/rag/scoring.py), clipped to [0, S_max], quantize the |Y| scores with B_i/|Y|
bits each (subtractive dither) and send them, signed. Every node scores every option (K_y = K).
Hub: mean score over the merged nodes; conformal quantile from the calibration round; set =
{y : s <= q_hat}. Celery tasks (workers/rag.py) only do I/O.

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


@dataclass(frozen=True)
class Query:
    """What every node sees of a question: its text, the start of its answer, the options."""

    text: str
    options: tuple[str, ...]
    lead: str = ""
    """words the answer continues (a cloze sentence up to its blank); "" for a free question"""


# --- wire helpers --------------------------------------------------------------------------------

def queries_to_blob(queries: list[Query]) -> bytes:
    return msgpack.packb([[q.text, q.lead, list(q.options)] for q in queries], use_bin_type=True)


def queries_from_blob(data: bytes) -> list[Query]:
    out = msgpack.unpackb(data, raw=False, max_bin_len=0, max_str_len=len(data), max_map_len=0)
    if not isinstance(out, list) or not all(
            isinstance(q, list) and len(q) == 3 and isinstance(q[0], str) and isinstance(q[1], str)
            and isinstance(q[2], list) and all(isinstance(o, str) for o in q[2]) for q in out):
        raise ValueError("query blob must be a msgpack list of [text, lead, [options]]")
    return [Query(t, tuple(o), lead) for t, lead, o in out]


def exclusions_to_blob(data_sha: str, spans: list[tuple[int, int]]) -> bytes:
    """A node's excluded byte spans, with the sha256 of the text they index into."""
    return msgpack.packb({"data_sha": data_sha, "spans": [list(s) for s in spans]}, use_bin_type=True)


def exclusions_from_blob(data: bytes) -> tuple[str, list[tuple[int, int]]]:
    d = msgpack.unpackb(data, raw=False, max_bin_len=0, max_str_len=128, max_map_len=2)
    if not isinstance(d, dict) or set(d) != {"data_sha", "spans"} or not all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s) for s in d["spans"]):
        raise ValueError("exclusion blob must be {data_sha, spans: [[start, end], ...]}")
    return str(d["data_sha"]), [(int(a), int(b)) for a, b in d["spans"]]


# --- node side ------------------------------------------------------------------------------------

@dataclass
class NodeScores:
    scores: np.ndarray  # (n, |Y|) mean token NLL of each option, clipped to [0, s_max]
    retrieved: np.ndarray  # (n, k) passage ids used


def node_scores(model, tokenizer, index, queries: list[Query], cfg: RAGConfig) -> NodeScores:
    """Retrieve from this node's own index, then score every option of every query with the LM."""
    from pipeline.rag.scoring import option_nll, prompt

    if cfg.passages > 0 and index is not None and len(index):
        retrieved, _ = index.search([q.text.encode("utf-8") for q in queries], cfg.passages)
    else:
        retrieved = np.zeros((len(queries), 0), dtype=np.int64)
    scores = np.zeros((len(queries), cfg.options), dtype=np.float32)
    for i, (q, row) in enumerate(zip(queries, retrieved, strict=True)):
        if len(q.options) != cfg.options:
            raise ValueError(f"query {i} has {len(q.options)} options, the job {cfg.options}")
        passages = [index.passages[j].tobytes().decode("utf-8", errors="replace") for j in row[::-1]]
        nll = option_nll(model, tokenizer, prompt(q.text, passages, q.lead), q.options, cfg.block_size)
        scores[i] = np.clip(nll, 0.0, cfg.s_max)
    return NodeScores(scores, retrieved)


def encode_node_payload(out: NodeScores, *, bits: int, cfg: RAGConfig, secret: bytes, job: str, rnd: int,
                        node: str, dither_seed: int | None) -> bytes:
    """The |Y| scores per query as one signed codec payload at `bits` bits each, shifted by S_max/2
    onto the codec's symmetric clip range. No option ids: every node scores every option in order."""
    half = cfg.s_max / 2.0
    raw = bits == RAW_BITS
    return encode_logits(out.scores - half, secret=secret, job=job, round=rnd, node=node, bits=bits,
                         clip=None if raw else half, dither_seed=None if raw else dither_seed)


def decode_node_payload(wire: bytes, *, secret: bytes, max_bytes: int, job: str, rnd: int, node: str,
                        n: int, cfg: RAGConfig) -> tuple[np.ndarray, int]:
    """(scores (n, |Y|), wire bytes) from a node's payload; PayloadError for anything off-protocol,
    including more bits per score than the node's budget allows."""
    if not isinstance(wire, bytes) or len(wire) > max_bytes:
        raise PayloadError("payload missing or over max_bytes")
    scores, meta = decode_logits(wire, secret=secret, max_bytes=max_bytes, expect_shape=(n, cfg.options),
                                 expect_job=job, expect_round=rnd, expect_node=node)
    bits = cfg.bits_of(node)
    half = cfg.s_max / 2.0
    if meta.bits != bits or (bits != RAW_BITS and meta.clip != half):
        raise PayloadError(f"scores sent at {meta.bits} bits (clip {meta.clip}); the budget of node {node} "
                           f"is {bits} bits per score on [0, {cfg.s_max}]")
    return scores.astype(np.float64) + half, len(wire)


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


def stack_nodes(decoded: dict[str, np.ndarray], node_ids: list[str], n: int,
                m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, K, |Y|) option ids and scores of all nodes, and the (K,) mask of those that were merged.

    The ids are 0..|Y|-1 in every row (each node scores every option); they keep the conformal
    code's general form, in which a node may propose only some labels.
    """
    ids = np.broadcast_to(np.arange(m), (n, len(node_ids), m)).copy()
    scores = np.full((n, len(node_ids), m), np.inf)
    mask = np.zeros(len(node_ids), dtype=bool)
    for i, node in enumerate(node_ids):
        if node in decoded:
            scores[:, i] = decoded[node]
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
    swarm = conformal.swarm_scores(ids, scores, use, vocab=ids.shape[2])  # (n, |Y|)
    bounds = {str(a): calib.bound(a, use) for a in alphas}
    queries = []
    for row in swarm:
        cand = np.nonzero(np.isfinite(row))[0]
        cand = cand[np.argsort(row[cand], kind="stable")]
        sets = {a: [int(y) for y in cand if row[y] <= b["qhat"]] for a, b in bounds.items()}
        queries.append({"cands": [[int(y), round(float(row[y]), 6)] for y in cand], "sets": sets})
    return {"bounds": bounds, "queries": queries, "used_nodes": [int(i) for i in np.nonzero(use)[0]],
            "uncalibrated": [int(i) for i in np.nonzero(mask & ~calib.node_mask)[0]]}
