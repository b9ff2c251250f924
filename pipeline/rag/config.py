"""RAGConfig: everything that defines an FC-RAG deployment, stored in its job record and run dir."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.faults import parse_fault
from broker.round_gate import default_quorum
from pipeline.job_config import ConfigError, JobConfig
from pipeline.models.spec import ModelSpec

RAW_BITS = 32
PHASES = ("calibrate", "predict")
EMBEDDERS = ("tfidf", "minilm", "auto")


class RAGConfigError(ConfigError):
    """An FC-RAG option is out of range; the message names the option and the allowed values.

    A ConfigError, so cli.one_line_errors reports it as a usage error like every job kind's. Parsing
    keeps its own type check below: pipeline/job_config.has_type has no dict[str, int] (node_budgets).
    """


@dataclass
class RAGConfig(JobConfig):
    """Federated conformal RAG (arXiv 2605.09986 §3.3, Algorithm 2): multiple-choice prediction sets."""

    LABEL = "FC-RAG"
    ERROR = RAGConfigError

    nodes: int = 4
    model: str = ""
    """the scorer every node runs: an HF folder, hub id or alias (smollm2), resolved to a folder at
    submit; "" is filled in at submit (pipeline/rag/driver.py resolve_model)"""
    model_sha: str = ""
    """sha256 of the scorer's weights, filled in at submit: every node proves it loads the same model"""
    block_size: int = 512
    """tokens of [passages, question, option] the scorer sees; the passages are cut first"""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:N or mps; a worker's own --device wins"""
    options: int = 4
    """|Y|: answer options per question; every node scores every option (K_y = K)"""
    budget: int = 32
    """B_i: bits of a node's per-query score summary, spread evenly over its `options` scores
    (must be options x b with b in 1..16, or options x 32 for unquantized float32)"""
    node_budgets: dict[str, int] = field(default_factory=dict)
    """per-node override of `budget`, {node_id: bits}: heterogeneous bandwidth"""
    passages: int = 2
    """k: passages each node retrieves from its own index and puts before the question"""
    passage_bytes: int = 256
    s_max: float = 20.0
    """scores (mean token NLL of an option) are clipped to [0, s_max] before quantizing (the paper's S_max);
    a rare name can cost SmolLM2 over 10 nats a token, and true labels tied at the clip make q_hat = S_max
    and every set all options"""
    dither: bool = True
    alpha: float = 0.1
    delta: float = 0.05
    """the slack's calibration term holds with probability 1 - delta"""
    embedder: str = "tfidf"
    """tfidf (always available), minilm (extra lmteam[embeddings]) or auto"""
    embed_dim: int = 2048
    """TF-IDF hashing dimension"""
    quorum: int | None = None
    """nodes that must merge for a query to be answered; default ceil(0.75 * nodes)"""
    query_timeout: float = 60.0
    """seconds from dispatch to a query round's deadline; later node scores are dropped"""
    calibration_timeout: float = 1800.0
    index_timeout: float = 900.0
    n_cal: int = 200
    n_test: int = 200
    query_batch: int = 200
    """questions per fan-out round (calibration and eval)"""
    corpus: list[str] = field(default_factory=list)
    """text files, one domain per node: node data on an embedded fleet, and the text the questions
    are built from (each node's shard of it); empty: built-in"""
    seed: int = 0
    faults: dict[str, str] = field(default_factory=dict)
    """drills: {"NODE" or "NODE@calibrate" / "NODE@predict": spec}, see broker/faults.py"""

    @property
    def node_ids(self) -> list[str]:
        return [str(i) for i in range(self.nodes)]

    @property
    def effective_quorum(self) -> int:
        return self.quorum if self.quorum is not None else default_quorum(self.nodes)

    def budget_of(self, node: str) -> int:
        return int(self.node_budgets.get(str(node), self.budget))

    def bits_of(self, node: str) -> int:
        """Bits per score: B_i / |Y| (32 means unquantized float32)."""
        return self.budget_of(node) // self.options

    def fault_for(self, node: str, phase: str) -> str | None:
        return self.faults.get(f"{node}@{phase}") or self.faults.get(str(node))

    def validate(self) -> RAGConfig:
        need = self.need
        need(self.nodes >= 1, f"--nodes must be at least 1, got {self.nodes}")
        need(2 <= self.options <= 26, f"options must be 2..26, got {self.options}")
        need(self.block_size >= 16, f"--block-size must be at least 16 tokens, got {self.block_size}")
        for node in self.node_budgets:
            need(node in self.node_ids, f"budget for unknown node {node}; nodes are 0..{self.nodes - 1}")
        for node in self.node_ids:
            b, bits = self.budget_of(node), self.bits_of(node)
            need(b % self.options == 0 and (1 <= bits <= 16 or bits == RAW_BITS),
                 f"budget of node {node} is {b} bits: it must be the options ({self.options}) x b "
                 f"with b in 1..16, or x 32 for float32 (e.g. {self.options * 8})")
        need(self.passages >= 0, f"--passages must be >= 0, got {self.passages}")
        need(self.passage_bytes >= 8, f"--passage-bytes must be at least 8, got {self.passage_bytes}")
        need(0 < self.s_max <= 100, f"--s-max must be in (0, 100], got {self.s_max}")
        need(0 < self.alpha < 1, f"--alpha must be in (0, 1), got {self.alpha}")
        need(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        need(self.embedder in EMBEDDERS, f"--embedder must be one of {', '.join(EMBEDDERS)}, got {self.embedder}")
        need(self.embed_dim >= 16, f"--embed-dim must be at least 16, got {self.embed_dim}")
        need(1 <= self.effective_quorum <= self.nodes,
             f"--quorum must be between 1 and --nodes ({self.nodes}), got {self.effective_quorum}")
        for name in ("query_timeout", "calibration_timeout", "index_timeout"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        for name in ("n_cal", "n_test", "query_batch"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        for key, spec in self.faults.items():
            node, _, phase = key.partition("@")
            need(node in self.node_ids and (not phase or phase in PHASES),
                 f"fault key {key!r}: use NODE or NODE@calibrate / NODE@predict, nodes 0..{self.nodes - 1}")
            try:
                parse_fault(spec)
            except ValueError as e:
                raise RAGConfigError(str(e)) from None
        return self

    def model_spec(self) -> ModelSpec:
        return ModelSpec(self.model, self.model_sha, 0, self.block_size, {}, self.seed)


# --- names shared by the driver (pipeline/rag/driver.py) and the tasks (workers/rag.py) ---------

QUERY_TTL = 3600
"""seconds a served query's blobs, payloads and result stay in Redis (calibration keeps blob_ttl)"""
