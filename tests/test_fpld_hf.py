"""FPLD and FedAvg with a Hugging Face model end to end: `lmteam fpld --model DIR` on the embedded
fleet (private redis-server, real worker processes), a tokenizer of vocabulary > 256, so any
leftover uint8 window or literal 256 fails here."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli import main
from tests.fleet import tiny_corpus

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SMALL = ["--nodes", "2", "--rounds", "1", "--local-steps", "4", "--distill-steps", "4", "--probe-seqs", "4",
         "--eval-seqs", "4", "--block-size", "32", "--batch-size", "4", "--round-timeout", "120", "-q"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return tiny_corpus(tmp_path_factory.mktemp("corpus"), domains=2, size=20_000)


def _run(tmp_path, model_dir, corpus, *extra: str) -> dict:
    out = tmp_path / "run"
    args = ["fpld", *SMALL, "--model", str(model_dir), "--out", str(out), *extra]
    for c in corpus:
        args += ["--corpus", c]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()) | {"_out": str(out)}


def _vocab(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def _loads_and_generates(folder) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tok("def main", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4


def test_fpld_dense_on_hf_model(tmp_path, tiny_llama_dir, corpus):
    """Full fine-tuning, dense 8-bit payloads of m x V with V > 256; the student is an HF folder."""
    V = _vocab(tiny_llama_dir)
    assert V > 256
    report = _run(tmp_path, tiny_llama_dir, corpus)
    cfg = report["config"]
    assert cfg["model"] == str(tiny_llama_dir.resolve()) and len(cfg["model_sha"]) == 64
    m = 4 * 32
    assert report["summary"]["float32_bytes_per_round"] == m * V * 4
    for n, sent in report["summary"]["bytes_per_node"].items():
        assert m * V < sent < m * V + 512, n  # 8 bits per logit plus a header
    assert report["summary"]["student_ppl"] < V  # better than uniform over the vocabulary
    _loads_and_generates(f"{report['_out']}/student")


def test_fpld_sparse_lora_on_hf_model(tmp_path, tiny_llama_dir, corpus):
    """LoRA adapters only, sparse top-k payloads: far fewer bytes than dense, the job completes."""
    V = _vocab(tiny_llama_dir)
    report = _run(tmp_path, tiny_llama_dir, corpus, "--payload", "sparse", "--topk", "16", "--lora-rank", "4")
    m = 4 * 32
    for sent in report["summary"]["bytes_per_node"].values():
        assert sent < m * V / 4  # well under a dense 8-bit payload
    assert report["rounds"][0]["merged"] == 2
    _loads_and_generates(f"{report['_out']}/student")
    result = CliRunner().invoke(main, ["generate", report["_out"], "--prompt", "def main", "--max-new", "5",
                                       "--temperature", "0"], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.startswith("def main"), result.output


def test_fedavg_lora_on_hf_model(tmp_path, tiny_llama_dir, corpus):
    """FedAvg on the same fleet: nodes send their LoRA adapters, the student is their mean."""
    from transformers import AutoModelForCausalLM

    report = _run(tmp_path, tiny_llama_dir, corpus, "--method", "fedavg", "--lora-rank", "4")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    linear_in_out = sum(mod.in_features + mod.out_features for name, mod in model.named_modules()
                        if type(mod).__name__ == "Linear" and name != "lm_head")
    adapter_bytes = 4 * 4 * linear_in_out  # rank 4, float32: A (r x in) and B (out x r) per linear
    for sent in report["summary"]["bytes_per_node"].values():
        assert adapter_bytes < sent < adapter_bytes + 20_000  # adapters plus safetensors and msgpack headers
    assert report["rounds"][0]["merged"] == 2
    _loads_and_generates(f"{report['_out']}/student")
