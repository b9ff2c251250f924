"""Any Hugging Face causal LM behind the built-in GPT's interface, optionally with LoRA adapters.

HFCausalLM answers `model(idx, targets) -> (logits, loss)`, `generate`, `num_params` and
`config.vocab_size / config.block_size` like pipeline/models/gpt.py, so the training, probing and
distillation code in pipeline/models/train.py runs on either without knowing which.

What travels between workers is the *trainable* state only: every parameter for full fine-tuning,
the LoRA adapters with `lora_rank > 0` (the base weights stay on each worker's disk, identified
by their hash). transformers and peft are imported here, never at module import of the CLI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class HFShape:
    """The two numbers the training code reads from a model's config."""

    vocab_size: int
    block_size: int


class HFCausalLM(nn.Module):
    def __init__(self, hf: nn.Module, block_size: int, lora_rank: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.lora_rank = lora_rank
        if lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            for p in hf.parameters():
                p.requires_grad_(False)
            torch.manual_seed(seed)  # LoRA's A matrices are random: the same everywhere for a seed
            hf = get_peft_model(hf, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                               target_modules="all-linear"))
        self.hf = hf
        self.config = HFShape(int(hf.get_output_embeddings().weight.shape[0]), block_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        # Parameters once each (tied embeddings count once), adapters included.
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            emb = self._base().get_input_embeddings().weight
            if emb is not self._base().get_output_embeddings().weight:
                n -= emb.numel()  # untied: the input lookup is not compute
        return n

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _base(self) -> nn.Module:
        return self.hf.get_base_model() if self.lora_rank else self.hf

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        self.train(was_training)
        return idx

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a round changes: named parameters with requires_grad (tied weights appear once)."""
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        wanted = {n for n, p in own.items() if p.requires_grad}
        if set(state) != wanted:
            extra, missing = sorted(set(state) - wanted)[:3], sorted(wanted - set(state))[:3]
            raise ValueError(f"state does not fit this model: unexpected {extra}, missing {missing}")
        with torch.no_grad():
            for n, t in state.items():
                if own[n].shape != t.shape:
                    raise ValueError(f"state tensor {n} has shape {tuple(t.shape)}, model has {tuple(own[n].shape)}")
                own[n].copy_(t)

    def save_folder(self, out: Path, tokenizer_folder: Path | None) -> None:
        """A plain HF folder (LoRA merged into the weights) that AutoModelForCausalLM loads anywhere."""
        import copy

        hf = copy.deepcopy(self.hf).cpu()
        if self.lora_rank:
            hf = hf.merge_and_unload()
        hf.save_pretrained(str(out))
        if tokenizer_folder is not None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(tokenizer_folder)).save_pretrained(str(out))


def load_hf(folder: str | Path, *, block_size: int, lora_rank: int = 0, seed: int = 0,
            device: str = "cpu") -> HFCausalLM:
    """Load an HF folder (or a hub id, where the user has network) in float32, onto `device`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a worker's log is not a terminal
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    limit = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise ValueError(f"--block-size {block_size} exceeds the model's context of {limit} tokens")
    return HFCausalLM(hf, block_size, lora_rank, seed).to(device)


def generate_text(folder: str | Path, prompt: str, *, max_new: int, temperature: float, top_k: int | None,
                  seed: int, device: str = "cpu") -> str:
    """Continue `prompt` with the HF model in `folder` (an FPLD student, a pulled model): the new text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = load_hf(folder, block_size=_context(folder), device=device)
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False) or [tok.eos_token_id or 0]], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, max_new, temperature=temperature, top_k=top_k, generator=gen)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def _context(folder: str | Path) -> int:
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 1024)
