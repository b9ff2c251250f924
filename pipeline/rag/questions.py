"""Cloze multiple-choice questions from each node's private text: FC-RAG's evaluation task.

A question is a sentence of node i's private text with one content word blanked out, and four
options: the removed word and three distractors of the same kind (capitalised names with names,
numbers with numbers, rare lowercase words with rare words) drawn from the same node's text.
The answer must be knowable from node i's documents and only from them:

- the removed word occurs exactly once in its sentence (nothing in the question gives it away)
  and recurs in another sentence of the node's text, outside every question's window, next to
  another content word of the question (so a retriever that matches the question can find it);
- the question's sentence and its two neighbours (its window) are excluded from the node's index
  (`Question.span`, passed to PassageIndex.build), so the answer never comes from a copy of the
  question itself.

Pure functions of the text and a seed: no model, no I/O. Byte offsets are into the node's text
as the node holds it (its private shard), so the node can drop exactly those bytes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLANK = "____"
KINDS = ("name", "number", "rare")
MIN_ANCHORS = 2
"""rare words a recurrence of the answer must share with the question: one is too weak a signal
for a retriever among the twenty-odd words of a sentence"""
_SENT = re.compile(rb"[^.!?]*?(?:[.!?]+[\"')\]]*(?=\s)|\n\s*\n|$)", re.S)  # a sentence or a paragraph's end
# Whole tokens only: "1890s" is no number and "x2" no word, so a removed word is always replaced by
# the blank as a whole (the blank's regex in _question uses the same boundaries).
_WORD = re.compile(rb"(?<![A-Za-z0-9])(?:[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]|\d+)(?![A-Za-z0-9])")
_STOP = frozenset(
    "the and that this with from have there their which would could should about them then than were what "
    "when your into will been they these those said shall unto upon thee thou thy thine hath doth very more "
    "some other such only also after before where while being every though through again over under here "
    "king queen lord lady first second third".split())


@dataclass(frozen=True)
class Question:
    node: int
    text: str
    """the sentence with the removed word replaced by BLANK"""
    options: tuple[str, ...]
    answer: int
    """index of the removed word in options"""
    kind: str
    span: tuple[int, int]
    """bytes [start, end) of the node's text left out of its index: the sentence and its neighbours"""

    def to_dict(self) -> dict:
        return {"node": self.node, "text": self.text, "options": list(self.options), "answer": self.answer,
                "kind": self.kind, "span": list(self.span)}

    @classmethod
    def from_dict(cls, d: dict) -> Question:
        return cls(int(d["node"]), str(d["text"]), tuple(str(o) for o in d["options"]), int(d["answer"]),
                   str(d["kind"]), (int(d["span"][0]), int(d["span"][1])))


def sentences(text: bytes) -> list[tuple[int, int]]:
    """[start, end) byte spans of the sentences of text, leading whitespace trimmed."""
    out = []
    for m in _SENT.finditer(text):
        s, e = m.span()
        while s < e and text[s : s + 1].isspace():
            s += 1
        if e > s:
            out.append((s, e))
    return out


def kind_of(word: str, counts: Counter, lower: Counter, first: bool) -> str | None:
    """name / number / rare, or None for a word no question should hinge on.

    A name is capitalised wherever it occurs (its lowercase form is at most a tenth as common) and
    not all capitals (Shakespeare's speaker tags); a rare word is lowercase, 6+ letters, seen 2 to
    30 times in the node's text; a number has 2 to 4 digits (years, counts), so one-digit list
    numbers and long identifiers stay out.
    """
    if word.isdigit():
        return "number" if 2 <= len(word) <= 4 else None
    if word.lower() in _STOP or len(word) < 3:
        return None
    if word[0].isupper():
        if first or word.isupper() or lower[word.lower()] > counts[word] // 10:
            return None
        return "name" if counts[word] >= 2 else None
    if len(word) >= 6 and 2 <= counts[word] <= 30:
        return "rare"
    return None


def shape(word: str, kind: str) -> str:
    """The finer class distractors must share with the answer, so grammar alone cannot rule them out:
    numbers of the same digit count, rare words of the same ending (-ed, -ing, -ly, -s, other)."""
    if kind == "number":
        return f"number{len(word)}"
    if kind == "rare":
        return "rare-" + next((e for e in ("ing", "ed", "ly", "s") if word.endswith(e)), "other")
    return kind


def _words(text: bytes, span: tuple[int, int]) -> list[str]:
    return [w.decode("ascii") for w in _WORD.findall(text[span[0] : span[1]])]


def build_questions(text: bytes, node: int, n: int, seed: int, *, min_bytes: int = 50,
                    max_bytes: int = 300, options: int = 4) -> list[Question]:
    """Up to n cloze questions from one node's text (fewer when the text has too few good ones).

    Sentences are tried in a random order; each question's recurrence is looked for outside the
    windows of the questions accepted so far and its own. A later window can still hide an
    earlier question's only recurrence, so a last pass checks every question against the final
    windows and drops those that lost it (dropping only shrinks the windows: one pass suffices).
    """
    rng = np.random.default_rng(seed)
    sents = sentences(text)
    words = [_words(text, s) for s in sents]
    counts = Counter(w for ws in words for w in ws)
    lower = Counter(w for ws in words for w in ws if w.islower())
    pools: dict[str, list[str]] = {}
    for w in sorted(counts):
        k = kind_of(w, counts, lower, first=False)
        if k is not None:
            pools.setdefault(shape(w, k), []).append(w)
    where: dict[str, list[int]] = {}
    after: dict[str, set[str]] = {}  # word -> the words seen right before it
    for i, ws in enumerate(words):
        for w in set(ws):
            where.setdefault(w, []).append(i)
        for a, b in zip(ws, ws[1:], strict=False):
            after.setdefault(b, set()).add(a.lower())
    ctx = _Text(text, sents, words, counts, lower, pools, where, after, max(4, len(sents) // 200))

    ok = [i for i, (s, e) in enumerate(sents) if min_bytes <= e - s <= max_bytes and len(words[i]) >= 6]
    rng.shuffle(ok)
    accepted: list[tuple[int, Question, str, set[str]]] = []
    windows: set[int] = set()
    for i in ok:
        if len(accepted) >= n + n // 4 + 2:  # a few spare for the last pass
            break
        mine = {i - 1, i, i + 1}
        if windows & {i - 2, i + 2} | windows & mine:
            continue  # windows never overlap or touch
        got = _question(ctx, node, i, windows | mine, rng, options)
        if got is not None:
            accepted.append((i, *got))
            windows |= mine
    out = [q for i, q, w, anchors in accepted if _support(ctx, w, anchors, windows)]
    return out[:n]


@dataclass
class _Text:
    text: bytes
    sents: list[tuple[int, int]]
    words: list[list[str]]
    counts: Counter
    lower: Counter
    pools: dict[str, list[str]]
    where: dict[str, list[int]]
    after: dict[str, set[str]]
    rare_df: int
    """anchors are words in at most this many sentences (1 in 200)"""


def _support(ctx: _Text, w: str, anchors: set[str], windows: set[int]) -> list[int]:
    """For each sentence outside `windows` holding w: how many of the question's anchors it shares."""
    return [len(anchors - {w} & set(ctx.words[j])) for j in ctx.where.get(w, []) if j not in windows
            and len(anchors - {w} & set(ctx.words[j])) >= MIN_ANCHORS]


def _question(ctx: _Text, node: int, i: int, windows: set[int], rng: np.random.Generator,
              n_options: int) -> tuple[Question, str, set[str]] | None:
    ws = ctx.words[i]
    # anchors: words of ours that are rare in this text: a recurrence of the answer sharing
    # MIN_ANCHORS of them is what a retriever matching the question can find
    anchors = {w for w in ws if len(w) >= 4 and w.lower() not in _STOP and len(ctx.where.get(w, ())) <= ctx.rare_df}
    cands = []
    for pos, w in enumerate(ws):
        k = kind_of(w, ctx.counts, ctx.lower, first=pos == 0)
        if k is None or sum(x.lower() == w.lower() for x in ws) != 1:
            continue
        support = _support(ctx, w, anchors, windows)
        if support and len(ctx.pools.get(shape(w, k), ())) > n_options:
            # rank: anchors shared with a recurrence, a name or number (recurs as itself), recurrences
            cands.append(((min(max(support), 3), k != "rare", len(support)), pos, w, k))
    if not cands:
        return None
    best = max(c[0] for c in cands)
    top = [c for c in cands if c[0] == best]
    _, pos, answer, kind = top[int(rng.integers(len(top)))]
    present = {w.lower() for w in ws}
    pool = [w for w in ctx.pools[shape(answer, kind)] if w.lower() not in present]
    if len(pool) < n_options - 1:
        return None
    # Distractors seen after the same word as the answer here ("the ____" -> words that follow
    # "the" in this text) where there are enough: the sentence's grammar alone cannot pick.
    prev = ws[pos - 1].lower() if pos > 0 else None
    fits = [w for w in pool if prev in ctx.after.get(w, ())] if prev else []
    pool = fits if len(fits) >= n_options - 1 else pool
    distractors = [pool[j] for j in rng.choice(len(pool), n_options - 1, replace=False)]
    opts = [answer, *distractors]
    order = rng.permutation(n_options)
    s, e = ctx.sents[i]
    sentence = ctx.text[s:e].decode("utf-8", errors="replace")
    blanked = re.sub(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", BLANK, sentence, count=1)
    blanked = " ".join(blanked.split())
    if blanked.count(BLANK) != 1 or re.search(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", blanked, re.I):
        return None  # never a question without its blank, or with its answer still in it
    lo = ctx.sents[i - 1][0] if i > 0 else s
    hi = ctx.sents[i + 1][1] if i + 1 < len(ctx.sents) else e
    q = Question(node, blanked, tuple(opts[j] for j in order), int(np.nonzero(order == 0)[0][0]), kind, (lo, hi))
    return q, answer, anchors


def node_questions(texts: Sequence[bytes], per_node: int, seed: int, options: int = 4) -> list[Question]:
    """Questions from every node's text, shuffled together (calibration and test stay exchangeable)."""
    out = [q for node, t in enumerate(texts) for q in build_questions(t, node, per_node, seed + node, options=options)]
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[j] for j in order]


def excluded_spans(questions: Sequence[Question], node: int) -> list[tuple[int, int]]:
    return sorted(q.span for q in questions if q.node == node)
