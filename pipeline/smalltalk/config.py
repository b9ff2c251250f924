"""SmallTalkConfig: everything that defines a SmallTalk LM job, stored in its job record and run dir.

Task names live here too (not in the task module): a submitter sends tasks by name and must not
import the task code, nor torch, to do it. This module imports neither.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.job_config import ConfigError, JobConfig
from pipeline.models.spec import ModelSpec

KIND = "smalltalk"
DENSE = "dense"  # the FLOPs-matched dense baseline trains as one more "expert" task under this name


class SmallTalkConfigError(ConfigError):
    """A SmallTalk option is out of range (a ConfigError, so the CLI prints it as one line)."""


@dataclass
class SmallTalkConfig(JobConfig):
    """SmallTalk LM (arXiv 2410.03529, Algorithm 1) on the fleet."""

    LABEL = "SmallTalk"
    ERROR = SmallTalkConfigError

    # mixture
    experts: int = 4
    prefix: int = 32
    """M: routers score the first M tokens of a sequence (training assignments and inference)"""
    # stage 1: routers by hard EM
    em_rounds: int = 3
    router_seqs: int = 1024
    """fresh sequences assigned per EM round (fewer if the corpus is too small for all rounds)"""
    router_steps: int = 100
    """training steps of each router per EM round"""
    router_lr: float = 3e-3
    router_layer: int = 1
    router_head: int = 2
    router_embd: int = 16
    score_shard: int = 2048
    """sequences per scoring task"""
    score_bits: int = 16
    """bits per loss on the wire (per-row range, 1..16), or 32 for raw float32"""
    order: str = "best"
    """balanced assignment order: 'best' (the paper: ascending best loss) or 'margin'"""
    # stage 2: experts, and the dense baseline
    expert_steps: int = 300
    checkpoint_every: int = 50
    """expert training saves its state to the store every N steps; a redelivered task resumes there"""
    dense: bool = True
    """also train a dense model of one expert's size with the mixture's total training FLOPs"""
    dense_match: str = "steps"
    """how the dense model gets the mixture's training FLOPs: 'steps' = experts x expert_steps at the
    expert batch size; 'batch' = expert_steps at experts x batch_size (the paper's Table 2)"""
    batch_size: int = 16
    lr: float = 3e-3
    # model of each expert: "" is the built-in byte-level GPT (pipeline.models.gpt.GPTConfig, sized
    # below); else an HF causal LM (folder, alias or hub id) that every expert fine-tunes from
    model: str = ""
    model_sha: str = ""
    """sha256 of the model folder's weights, filled in at submit: the model's identity"""
    lora_rank: int = 0
    """> 0: experts train LoRA adapters of this rank only (HF models)"""
    device: str = "auto"
    vocab_size: int = 256
    """the tokenizer's vocabulary (256: bytes); set from --model at submit; routers use it too"""
    block_size: int = 128
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    # data
    corpus: list[str] = field(default_factory=list)
    """text files, one domain each; empty means the built-in standard-library corpus"""
    domain_bytes: int = 0
    """use at most this many bytes of each domain (0: all); equal sizes make purity comparable"""
    eval_seqs: int = 256
    """held-out sequences, an equal share from every domain"""
    seed: int = 0
    stall_timeout: float = 0.0
    """fail when no task makes progress this long (s); 0 means the fleet's visibility timeout + 10 min"""

    @property
    def dense_steps(self) -> int:
        return self.experts * self.expert_steps if self.dense_match == "steps" else self.expert_steps

    @property
    def dense_batch(self) -> int:
        return self.batch_size if self.dense_match == "steps" else self.experts * self.batch_size

    @property
    def expert_names(self) -> list[str]:
        return [str(e) for e in range(self.experts)]

    def expert_model(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "block_size": self.block_size, "n_layer": self.n_layer,
                "n_head": self.n_head, "n_embd": self.n_embd}

    def expert_spec(self) -> ModelSpec:
        builtin = {} if self.model else self.expert_model()
        return ModelSpec(self.model, self.model_sha, self.lora_rank, self.block_size, builtin, self.seed)

    def router_model(self) -> dict[str, int]:
        # A router only ever sees the prefix: M - 1 inputs predict tokens 2..M. Routers are always
        # small built-in models, over the experts' tokenizer so both read the same token ids.
        return {"vocab_size": self.vocab_size, "block_size": self.prefix, "n_layer": self.router_layer,
                "n_head": self.router_head, "n_embd": self.router_embd}

    def validate(self) -> SmallTalkConfig:
        need = self.need
        for name in ("experts", "em_rounds", "router_seqs", "router_steps", "router_layer", "router_head",
                     "router_embd", "score_shard", "expert_steps", "checkpoint_every", "batch_size",
                     "block_size", "n_layer", "n_head", "n_embd", "eval_seqs"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        need(self.experts <= 64, f"--experts must be at most 64, got {self.experts}")
        need(2 <= self.prefix <= self.block_size,
             f"--prefix must be between 2 and --block-size ({self.block_size}), got {self.prefix}")
        need(self.n_embd % self.n_head == 0, "--n-embd must be a multiple of --n-head")
        need(self.router_embd % self.router_head == 0, "--router-embd must be a multiple of --router-head")
        need(1 <= self.score_bits <= 16 or self.score_bits == 32, f"--score-bits must be 1..16 or 32, got {self.score_bits}")
        need(self.order in ("best", "margin"), f"--order must be 'best' or 'margin', got {self.order!r}")
        need(self.lr > 0 and self.router_lr > 0, "learning rates must be positive")
        need(self.dense_match in ("steps", "batch"), f"--dense-match must be 'steps' or 'batch', got {self.dense_match!r}")
        need(self.domain_bytes >= 0, f"--domain-bytes must be >= 0, got {self.domain_bytes}")
        need(self.stall_timeout >= 0, f"stall_timeout must be >= 0, got {self.stall_timeout}")
        need(self.vocab_size >= 2, f"vocab_size must be at least 2, got {self.vocab_size}")
        need(self.lora_rank >= 0, f"--lora-rank must be >= 0, got {self.lora_rank}")
        need(not self.lora_rank or bool(self.model), "--lora-rank needs an HF model (--model)")
        need(bool(self.model) or self.vocab_size == 256, "the built-in expert model reads bytes: vocab_size 256")
        return self

