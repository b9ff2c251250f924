"""FPLDConfig: everything that defines an FPLD job, stored in its job record for reproduction."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker.faults import parse_faults
from broker.round_gate import default_quorum
from pipeline.job_config import ConfigError, JobConfig
from pipeline.models.spec import ModelSpec
from pipeline.models.tokenizer import ByteTokenizer


def auto_merge_groups(nodes: int, aggregators: int) -> int:
    """A single merge below AUTO_GROUPS_FROM nodes or with one aggregator worker (group merges that
    take turns on one worker only add work); beyond, about sqrt(K) groups of about sqrt(K) nodes,
    which balances a group's K/G folds against the root's G."""
    return 1 if nodes < AUTO_GROUPS_FROM or aggregators < 2 else round(nodes ** 0.5)


# One aggregator folds a 1 MB payload in ~7 ms: at 128 nodes that is ~0.9 s a round, as long as a
# round of small nodes' own compute (README, "Past one machine").
AUTO_GROUPS_FROM = 128


@dataclass
class FPLDConfig(JobConfig):
    """Federated probe-logit distillation (arXiv 2605.09986, Algorithm 1)."""

    LABEL = "FPLD"
    ERROR = ConfigError

    # federation
    nodes: int = 4
    rounds: int = 3
    bits: int = 8
    """bits per logit coordinate on the wire, 1..16, or 32 for unquantized float32"""
    clip: float = 20.0
    """logits are clipped to [-clip, clip] before quantization (the paper's L)"""
    dither: bool = True
    """subtractive dither: quantization error becomes zero-mean and independent across nodes"""
    compress: bool = False
    """zstd on top of bit-packing"""
    quorum: int | None = None
    """nodes that must merge for a round to count; default ceil(0.75 * nodes)"""
    round_timeout: float = 600.0
    """seconds from dispatch to the round's deadline; later payloads are dropped"""
    merge_groups: int = 0
    """two-level merge: group aggregators each fold a run of nodes' payloads into partial sums and
    the root adds those (broker/round_gate.py); 1 is a single merge, 0 picks by the node count"""
    # training
    local_steps: int = 150
    checkpoint_every: int = 50
    """local training saves node-local state every N steps; a redelivered task resumes there"""
    distill_steps: int = 150
    batch_size: int = 16
    lr: float = 3e-3
    distill_lr: float = 3e-3
    # data
    probe_seqs: int = 64
    """public probe contexts: sequences of block_size tokens, logits at every position"""
    eval_seqs: int = 64
    corpus: list[str] = field(default_factory=list)
    """text files; empty means the built-in standard-library corpus"""
    method: str = "fpld"
    """fpld (probe logits) or fedavg (the baseline: nodes send their weights, the mean is the student)"""
    payload: str = "dense"
    """dense (every logit at B bits) or sparse (top-k log-probs at B bits, the tail shaped by the
    broadcast student both ends hold: broker/wire/sparse.py)"""
    topk: int = 128
    """tokens per position in a sparse payload"""
    # model: "" is the built-in byte-level GPT (pipeline.models.gpt.GPTConfig, sized below);
    # else an HF folder, a hub id or an alias, resolved and hashed at submit (pipeline/models/lm.py)
    model: str = ""
    model_sha: str = ""
    """sha256 of the model folder's weights, filled in at submit: the model's identity"""
    lora_rank: int = 0
    """> 0: fine-tune and distill LoRA adapters of this rank only (HF models); 0: every weight"""
    device: str = "auto"
    """auto (CUDA when available), cpu, cuda, cuda:N or mps; a worker's own --device wins"""
    block_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    seed: int = 0
    measure_teacher_kl: bool = False
    """nodes also upload float32 probe logits (4x an 8-bit payload) so the aggregator can report
    KL(full-precision teacher || B-bit teacher); those bytes are reported beside the uplink"""
    faults: dict[str, str] = field(default_factory=dict)
    """fault injection for drills and tests: {node_id: spec}, see broker/faults.py"""

    @property
    def effective_quorum(self) -> int:
        return self.quorum if self.quorum is not None else default_quorum(self.nodes)

    @property
    def merge_group_count(self) -> int:
        """Groups of a two-level merge (1: one aggregator folds every payload). The submitter
        resolves auto (0) against the live aggregator workers before the job record is written."""
        return min(self.merge_groups, self.nodes) if self.merge_groups else 1

    @property
    def node_ids(self) -> list[str]:
        return [str(i) for i in range(self.nodes)]

    def model_spec(self) -> ModelSpec:
        # vocab_size 256 lives with the byte tokenizer of the built-in model, nowhere else.
        builtin = {"vocab_size": ByteTokenizer.vocab_size, "block_size": self.block_size, "n_layer": self.n_layer,
                   "n_head": self.n_head, "n_embd": self.n_embd}
        if self.model:
            builtin = {}
        return ModelSpec(self.model, self.model_sha, self.lora_rank, self.block_size, builtin, self.seed)

    def validate(self) -> FPLDConfig:
        need = self.need
        need(self.nodes >= 1, f"--nodes must be at least 1, got {self.nodes}")
        need(self.rounds >= 1, f"--rounds must be at least 1, got {self.rounds}")
        need(1 <= self.bits <= 16 or self.bits == 32, f"--bits must be 1..16 or 32, got {self.bits}")
        need(self.clip > 0, f"--clip must be positive, got {self.clip}")
        need(1 <= self.effective_quorum <= self.nodes,
             f"--quorum must be between 1 and --nodes ({self.nodes}), got {self.effective_quorum}")
        need(self.merge_groups >= 0, f"--merge-groups must be 0 (auto) or more, got {self.merge_groups}")
        need(self.round_timeout > 0, f"--round-timeout must be positive, got {self.round_timeout}")
        for name in ("local_steps", "checkpoint_every", "distill_steps", "batch_size", "probe_seqs", "eval_seqs", "block_size",
                     "n_layer", "n_head", "n_embd"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1")
        need(self.n_embd % self.n_head == 0, "--n-embd must be a multiple of --n-head")
        need(self.method in ("fpld", "fedavg"), f"--method must be fpld or fedavg, got {self.method!r}")
        need(self.payload in ("dense", "sparse"), f"--payload must be dense or sparse, got {self.payload!r}")
        need(self.payload == "dense" or 1 <= self.bits <= 16, "a sparse payload needs --bits 1..16")
        need(self.topk >= 1, f"--topk must be at least 1, got {self.topk}")
        need(self.lora_rank >= 0, f"--lora-rank must be >= 0, got {self.lora_rank}")
        need(not self.lora_rank or bool(self.model), "--lora-rank needs an HF model (--model)")
        need(self.lr > 0 and self.distill_lr > 0, "learning rates must be positive")
        try:
            parse_faults(self.faults)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        bad = [n for n in self.faults if n not in self.node_ids]
        need(not bad, f"fault for unknown node(s) {', '.join(bad)}; nodes are 0..{self.nodes - 1}")
        return self

