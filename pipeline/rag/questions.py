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
_SENT = re.compile(rb"[^.!?]*?(?:[.!?]+[\"')\]]*(?=\s)|\n\s*\n|$)", re.S)  # a sentence or a paragraph's end
_WORD = re.compile(rb"[A-Za-z][A-Za-z'-]*[A-Za-z]|[A-Za-z]|\d+")
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

    Question sentences are at least 3 sentences apart, so no two windows overlap; a word's
    recurrence is looked for outside every candidate window, which is a superset of the windows
    finally excluded, so it stays valid for the index the node really builds.
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
    for i, ws in enumerate(words):
        for w in set(ws):
            where.setdefault(w, []).append(i)

    ok = [i for i, (s, e) in enumerate(sents) if min_bytes <= e - s <= max_bytes and len(words[i]) >= 6]
    rng.shuffle(ok)
    chosen: list[int] = []
    taken: set[int] = set()
    for i in ok:
        if len(chosen) >= 4 * n:
            break
        if not taken & set(range(i - 3, i + 4)):
            chosen.append(i)
            taken.add(i)
    windows = {j for i in chosen for j in (i - 1, i, i + 1)}

    out: list[Question] = []
    for i in chosen:
        q = _question(text, node, i, sents, words, counts, lower, pools, where, windows, rng, options)
        if q is not None:
            out.append(q)
        if len(out) >= n:
            break
    return out


def _question(text: bytes, node: int, i: int, sents, words, counts, lower, pools, where, windows, rng,
              n_options: int) -> Question | None:
    ws = words[i]
    content = {w for w in ws if kind_of(w, counts, lower, first=False) or (len(w) >= 5 and w.lower() not in _STOP)}
    cands = []
    for pos, w in enumerate(ws):
        k = kind_of(w, counts, lower, first=pos == 0)
        if k is None or ws.count(w) != 1 or sum(x.lower() == w.lower() for x in ws) != 1:
            continue
        # recurrence: another sentence, outside every window, holding w and another content word of ours
        support = [j for j in where.get(w, []) if j not in windows and content - {w} & set(words[j])]
        if support and len(pools.get(shape(w, k), ())) > n_options:
            cands.append((len(support), w, k))
    if not cands:
        return None
    best = max(c[0] for c in cands)  # the best-supported word: the likeliest to be retrievable
    top = [c for c in cands if c[0] == best]
    _, answer, kind = top[int(rng.integers(len(top)))]
    present = {w.lower() for w in ws}
    pool = [w for w in pools[shape(answer, kind)] if w.lower() not in present]
    if len(pool) < n_options - 1:
        return None
    distractors = [pool[j] for j in rng.choice(len(pool), n_options - 1, replace=False)]
    opts = [answer, *distractors]
    order = rng.permutation(n_options)
    s, e = sents[i]
    sentence = text[s:e].decode("utf-8", errors="replace")
    blanked = re.sub(rf"(?<![A-Za-z0-9]){re.escape(answer)}(?![A-Za-z0-9])", BLANK, sentence, count=1)
    blanked = " ".join(blanked.split())
    lo = sents[i - 1][0] if i > 0 else s
    hi = sents[i + 1][1] if i + 1 < len(sents) else e
    return Question(node, blanked, tuple(opts[j] for j in order), int(np.nonzero(order == 0)[0][0]), kind, (lo, hi))


def node_questions(texts: Sequence[bytes], per_node: int, seed: int) -> list[Question]:
    """Questions from every node's text, shuffled together (calibration and test stay exchangeable)."""
    out = [q for node, t in enumerate(texts) for q in build_questions(t, node, per_node, seed + node)]
    order = np.random.default_rng(seed).permutation(len(out))
    return [out[j] for j in order]


def excluded_spans(questions: Sequence[Question], node: int) -> list[tuple[int, int]]:
    return sorted(q.span for q in questions if q.node == node)
