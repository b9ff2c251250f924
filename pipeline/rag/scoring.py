"""A node's option scores: s_i(X, y) = mean over y's tokens of -log P(token | Z_i, X, earlier tokens of y).

The paper's "fullname" scoring (arXiv 2605.09986, E4): the per-token-averaged NLL of the option
string given [retrieved passages, question], so a long option is not penalised for its length.
Works with any model of pipeline/models/lm.py (`model(idx) -> (logits, loss)`, causal); for a
Hugging Face model the shared prefix runs once and the options reuse its key/value cache, which
on CPU is about the options' count times faster than scoring [prefix, option] rows separately.

torch is imported inside the functions: the query client never loads this module's model code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROMPT_PASSAGES = "{passages}\n\n"
PROMPT_QUESTION = "Question: {question}\nAnswer:"


def prompt(question: str, passages: Sequence[str], lead: str = "") -> str:
    """[Z_i, X]: the node's retrieved passages (most similar last, next to the question), then X.

    `lead` starts the answer: for a cloze question the words of its sentence before the blank, so
    the option is scored as the sentence's own continuation, which a small LM reads far better
    than a bare answer after "Answer:" (the whole sentence, blank included, is in the question).
    """
    head = PROMPT_PASSAGES.format(passages="\n".join(" ".join(p.split()) for p in passages)) if passages else ""
    lead = " ".join(lead.split())
    return head + PROMPT_QUESTION.format(question=" ".join(question.split())) + (" " + lead if lead else "")


def option_ids(tokenizer, options: Sequence[str]) -> list[np.ndarray]:
    """Token ids of each option as it follows "Answer:" (with its leading space); never empty."""
    out = []
    for o in options:
        ids = np.asarray(tokenizer.encode(" " + o.strip()), dtype=np.int64)
        out.append(ids if ids.size else np.asarray(tokenizer.encode(" "), dtype=np.int64))
    return out


def option_nll(model, tokenizer, prefix: str, options: Sequence[str], block_size: int) -> np.ndarray:
    """(len(options),) mean token NLL of each option after prefix; the prefix is cut from the left
    to leave room for the longest option within block_size tokens."""
    import torch

    opts = option_ids(tokenizer, options)
    longest = max(len(o) for o in opts)
    if longest >= block_size:
        raise ValueError(f"an option is {longest} tokens, the scorer's block is {block_size}")
    pre = np.asarray(tokenizer.encode(prefix), dtype=np.int64)[-(block_size - longest):]
    if pre.size == 0:
        raise ValueError("empty prompt")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hf = getattr(model, "hf", None)
            if hf is not None and getattr(model, "lora_rank", 0) == 0:
                return _nll_cached(hf, pre, opts)
            return _nll_rows(model, pre, opts)
    finally:
        model.train(was_training)


def _gather(logp, targets: list[np.ndarray]) -> np.ndarray:
    """logp (m, L, V) log-probs predicting position j's token; mean over each option's own tokens."""
    out = np.zeros(len(targets))
    for j, t in enumerate(targets):
        out[j] = -float(logp[j, np.arange(len(t)), t].mean())
    return out


def _padded(opts: list[np.ndarray]) -> np.ndarray:
    """(m, L) options right-padded with their own last token: a causal model never lets a padded
    position change an earlier one, so the padding needs no attention mask."""
    L = max(len(o) for o in opts)
    return np.stack([np.concatenate([o, np.full(L - len(o), o[-1])]) for o in opts])


def _nll_cached(hf, pre: np.ndarray, opts: list[np.ndarray]):
    import inspect

    import torch
    from torch.nn import functional as F

    m = len(opts)
    params = inspect.signature(hf.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.x
    # Only the last position's logits are needed from the prefix: the lm head over a 49k vocabulary
    # at every prefix position would be a tenth of the forward's cost.
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    out = hf(input_ids=torch.from_numpy(pre)[None], use_cache=True, **keep)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,) predicts each option's first token
    cache = getattr(out, cache_kw)
    pad = _padded(opts)  # (m, L)
    if pad.shape[1] == 1:
        return np.array([-float(first[o[0]]) for o in opts])
    cache.batch_repeat_interleave(m)
    rest = hf(input_ids=torch.from_numpy(pad[:, :-1]), use_cache=True, **{cache_kw: cache}).logits
    logp = torch.cat([first.expand(m, 1, -1), F.log_softmax(rest.float(), dim=-1)], dim=1)  # (m, L, V)
    return _gather(logp.numpy(), opts)


def _nll_rows(model, pre: np.ndarray, opts: list[np.ndarray]):
    import torch
    from torch.nn import functional as F

    pad = _padded(opts)  # (m, L)
    rows = np.concatenate([np.tile(pre, (len(opts), 1)), pad], axis=1)  # (m, P + L)
    logits, _ = model(torch.from_numpy(rows))  # (m, P + L, V)
    logp = F.log_softmax(logits[:, len(pre) - 1 : -1].float(), dim=-1)  # (m, L, V)
    return _gather(logp.numpy(), opts)
