"""SmallTalk with a Hugging Face model as the experts' model: a tokenizer of vocabulary > 256 end to
end (EM routers over its token ids, experts fine-tuning it, eval and routed generation)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main
from tests.fleet import tiny_corpus

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


def test_smalltalk_train_eval_generate_on_hf_model(tmp_path, tiny_llama_dir):
    corpus = tiny_corpus(tmp_path, domains=2, size=20_000)
    out = tmp_path / "run"
    args = ["smalltalk", "train", "--model", str(tiny_llama_dir), "--experts", "2",
            "--em-rounds", "1", "--router-seqs", "32", "--router-steps", "5", "--expert-steps", "10",
            "--checkpoint-every", "5", "--block-size", "32", "--prefix", "8", "--batch-size", "4",
            "--eval-seqs", "8", "--out", str(out), "-q"]
    for c in corpus:
        args += ["--corpus", c]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    assert report["config"]["vocab_size"] == vocab > 256 and len(report["config"]["model_sha"]) == 64
    s = report["summary"]
    assert 1 < s["mixture_ppl"] < vocab and 1 < s["dense_ppl"] < vocab
    assert report["flops"]["router_to_expert_params"] < 1.0
    # Per byte, so runs with different tokenizers compare: a BPE token holds more than one byte.
    assert s["bytes_per_token"] > 1 and 1 < s["mixture_ppl_per_byte"] < s["mixture_ppl"]
    assert 1 < s["dense_ppl_per_byte"] < s["dense_ppl"]

    result = CliRunner().invoke(main, ["smalltalk", "eval", str(out), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    ev = json.loads(result.output)
    assert ev["ppl"] == pytest.approx(s["mixture_ppl"], rel=1e-4)
    assert ev["ppl_per_byte"] == pytest.approx(s["mixture_ppl_per_byte"], rel=1e-4)
    result = CliRunner().invoke(main, ["generate", str(out), "--prompt", "def main(self):", "--max-new", "5",
                                       "--temperature", "0"], catch_exceptions=False)
    assert result.exit_code == 0 and "def main(self):" in result.output, result.output
