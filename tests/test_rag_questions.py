"""FC-RAG's multiple-choice task: the cloze question builder, the excluded spans, option scoring."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.rag import questions as qb
from pipeline.rag import scoring
from pipeline.rag.retrieval import PassageIndex, TfidfEmbedder, chunk_passages

NAMES = ["Alaric", "Brunhild", "Casimir", "Dagny", "Edmund", "Fenella", "Gustav", "Hedda", "Ingmar", "Jorunn",
         "Konrad", "Liesel", "Matthias", "Nelka"]
PLACES = ["Ravensburg", "Tollmark", "Eberfeld", "Quellin", "Wendhof", "Marrowby"]
TEMPLATES = [
    "Later {n1} rode to {p} with the {r1} in the year {y}.",
    "There {n1} met {n2} beside the {r1} of {p}, and they spoke of the {r2} for a long while.",
    "In {y} the people of {p} built a {r1} that {n1} had drawn on a {r2}.",
    "Then {n2} said that {n1} kept the {r1} and the {r2} hidden near {p}.",
    "Everyone in {p} remembered how {n1} found the {r1} after the winter of {y}.",
]


def prose(seed: int, sentences: int = 1500) -> bytes:
    """Invented prose made of facts told 3 to 5 times each in different words, in a shuffled order:
    names, places, years and made-up rare words recur together, as they do in a story."""
    rng = np.random.default_rng(seed)
    syll = ["ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "fin", "gra", "bel", "nor"]
    rare = list(dict.fromkeys("".join(rng.choice(syll, 3)) + "an" for _ in range(2000)))
    out = []
    for f in range(sentences // 4):
        n1, n2 = rng.choice(NAMES, 2, replace=False)
        fact = dict(n1=n1, n2=n2, p=rng.choice(PLACES), y=int(rng.integers(1800, 1860)), r1=rare[2 * f % len(rare)],
                    r2=rare[(2 * f + 1) % len(rare)])
        for t in rng.choice(TEMPLATES, int(rng.integers(3, 6)), replace=False):
            out.append(t.format(**fact))
    return " ".join(out[j] for j in rng.permutation(len(out))).encode()


def prose_corpus(directory: Path, domains: int = 4, sentences: int = 1500) -> list[str]:
    """One prose file per domain (node) for fleet tests."""
    paths = []
    for d in range(domains):
        path = directory / f"prose{d}.txt"
        path.write_bytes(prose(d, sentences))
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def text():
    return prose(0)


@pytest.fixture(scope="module")
def built(text):
    return qb.build_questions(text, node=0, n=40, seed=1)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.I) is not None


def test_build_questions_leak_nothing_of_the_answer(built, text):
    """The removed word is nowhere in its question; the blank is where it was."""
    assert len(built) == 40
    for q in built:
        answer = q.options[q.answer]
        assert q.text.count(qb.BLANK) == 1 and not _has_word(q.text, answer)
        assert len(set(q.options)) == 4 and 0 <= q.answer < 4
        sentence = q.text.replace(qb.BLANK, answer)
        window = text[q.span[0] : q.span[1]].decode()
        assert sentence in " ".join(window.split())  # the span covers the question's sentence


def test_build_questions_distractors_are_of_the_same_kind(built, text):
    """Names with names, numbers with numbers of as many digits, rare words with rare words."""
    words = [w.decode() for w in re.findall(rb"[A-Za-z][A-Za-z'-]*[A-Za-z]|\d+", text)]
    counts, lower = Counter(words), Counter(w for w in words if w.islower())
    kinds = Counter(q.kind for q in built)
    assert set(kinds) <= set(qb.KINDS)
    for q in built:
        for o in q.options:
            assert qb.kind_of(o, counts, lower, first=False) == q.kind, (o, q)
            assert qb.shape(o, q.kind) == qb.shape(q.options[q.answer], q.kind)
            assert o.encode() in text  # drawn from the same text
        assert all(not _has_word(q.text, o) for o in q.options)  # no option is in the question


def test_kind_of_and_shape():
    """What counts as a name, a number or a rare word, and the finer class distractors share."""
    counts = Counter({"Gretel": 12, "gretel": 0, "The": 50, "the": 900, "1812": 3, "7": 4, "lantern": 5,
                      "ROMEO": 30, "glimmering": 3, "said": 90, "castle": 400})
    lower = Counter({k: v for k, v in counts.items() if k.islower()})
    kind = {w: qb.kind_of(w, counts, lower, first=False) for w in counts}
    assert kind == {"Gretel": "name", "gretel": None, "The": None, "the": None, "1812": "number", "7": None,
                    "lantern": "rare", "ROMEO": None, "glimmering": "rare", "said": None, "castle": None}
    assert qb.kind_of("Gretel", counts, lower, first=True) is None  # capitalised because it starts a sentence?
    assert qb.shape("glimmering", "rare") == "rare-ing" != qb.shape("lantern", "rare")
    assert qb.shape("1812", "number") != qb.shape("77", "number")
    # whole tokens only: a blank never replaces part of "1890s", so "1890" is no word of it
    text = b"the 1890s and 1890 x2 well-known"
    assert qb._words(text, (0, len(text))) == ["the", "and", "1890", "well-known"]


def test_build_questions_answer_recurs_outside_every_excluded_span(built, text):
    """Retrieval can find the answer: it occurs in text that the node's index keeps."""
    spans = qb.excluded_spans(built, 0)
    keep = bytearray(text)
    for lo, hi in spans:
        keep[lo:hi] = b" " * (hi - lo)
    for q in built:
        assert _has_word(bytes(keep).decode(), q.options[q.answer])
    flat = sorted(spans)
    assert all(a[1] <= b[0] for a, b in zip(flat, flat[1:], strict=False))  # windows never overlap


def test_index_leaves_out_the_question_windows(built, text):
    """No indexed passage touches a question's window: the sentence cannot be retrieved back."""
    tokens = np.frombuffer(text, dtype=np.uint8)
    spans = qb.excluded_spans(built, 0)
    full = chunk_passages(tokens, 256, stride=128)
    index = PassageIndex.build(tokens, 256, TfidfEmbedder(256), exclude=spans, stride=128)
    assert 0 < len(index) < len(full)
    sentences = [q.text.replace(qb.BLANK, q.options[q.answer]).encode() for q in built]
    in_full = b"\x00".join(p.tobytes() for p in full)
    assert sum(s in in_full for s in sentences) > len(sentences) // 2  # the check below can fail
    kept = b"\x00".join(p.tobytes() for p in index.passages)
    assert not any(s in kept for s in sentences)
    with pytest.raises(ValueError, match="every passage"):
        chunk_passages(tokens[:200], 64, [(0, 200)], stride=32)


def test_node_questions_are_deterministic_shuffled_and_disjoint():
    texts = [prose(0, 600), prose(1, 600)]
    a, b = qb.node_questions(texts, 15, seed=3), qb.node_questions(texts, 15, seed=3)
    assert a == b and {q.node for q in a} == {0, 1} and len(a) == 30
    assert [q.node for q in a] != sorted(q.node for q in a)  # both nodes mixed through the order
    for node in (0, 1):
        spans = [q.span for q in a if q.node == node]
        assert len(set(spans)) == len(spans)
    assert qb.Question.from_dict(a[0].to_dict()) == a[0]


# --- option scoring -------------------------------------------------------------------------------

def _manual_nll(model, tok, prefix: str, option: str) -> float:
    pre = tok.encode(prefix).astype(np.int64)
    opt = tok.encode(" " + option).astype(np.int64)
    x = torch.from_numpy(np.concatenate([pre, opt]))[None]
    with torch.no_grad():
        logits, _ = model(x)
    logp = torch.log_softmax(logits[0, len(pre) - 1 : -1].float(), dim=-1)
    return -float(logp[torch.arange(len(opt)), torch.from_numpy(opt)].mean())


def test_option_scoring_is_mean_token_nll_on_an_hf_model(tiny_llama_dir):
    """The cached path (prefix once, options on its KV cache) equals scoring [prefix, option] rows."""
    from pipeline.models.lm import build_model, tokenizer_for
    from pipeline.models.spec import make_spec

    spec = make_spec(str(tiny_llama_dir), block_size=64)
    model, tok = build_model(spec, "cpu").eval(), tokenizer_for(spec)
    p = scoring.prompt("Who rode to Tollmark?", ["Later Alaric rode to Tollmark."], lead="It was")
    assert p.startswith("Later Alaric") and p.endswith("Question: Who rode to Tollmark?\nAnswer: It was")
    options = ["Alaric", "Brunhild of Quellin", "1842", "x"]
    got = scoring.option_nll(model, tok, p, options, block_size=64)
    want = [_manual_nll(model, tok, tok.decode(tok.encode(p)[-(64 - max(len(tok.encode(" " + o)) for o in options)):]),
                        o) for o in options]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert len(tok.encode(" Brunhild of Quellin")) > 1  # a multi-token option is averaged, not summed
    with pytest.raises(ValueError, match="block"):
        scoring.option_nll(model, tok, p, ["word " * 80], block_size=64)


def test_option_scoring_on_the_builtin_byte_model():
    """Any model of the interface works: the built-in byte GPT scores rows without a cache."""
    from pipeline.models.gpt import GPT, GPTConfig
    from pipeline.models.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model, tok = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32)).eval(), ByteTokenizer()
    got = scoring.option_nll(model, tok, "Question: x?\nAnswer:", ["ab", "abcd"], block_size=64)
    want = [_manual_nll(model, tok, "Question: x?\nAnswer:", o) for o in ("ab", "abcd")]
    np.testing.assert_allclose(got, want, rtol=1e-5)
