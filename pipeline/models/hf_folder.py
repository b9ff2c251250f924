"""Hugging Face model folders on disk: where they live, how they are written, what is in them.

A model folder is what `save_pretrained` writes (config.json, *.safetensors, tokenizer files)
plus an optional lmteam.json that records where it came from. Everything here reads files
directly (safetensors headers, JSON), so `lmteam model info` answers without importing torch or
transformers; hf_init.py and hf_pull.py make folders, through atomic_folder().
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

# `lmteam model pull NAME` -> folder name under the cache.
KNOWN_MODELS = {"smollm2": "smollm2-135m-instruct"}
PROVENANCE = "lmteam.json"
_CHUNK = 1 << 20
# A safetensors header is a few KB to a few MB; a larger length means the file is not safetensors.
_MAX_HEADER = 100 << 20
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
           "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


class ModelFolderError(click.ClickException):
    """A model folder cannot be made, found or read. Click prints it as one line, exit 1.

    A ClickException so that every caller (the CLI, a test, a worker) gets the readable line
    without pipeline/cli_errors.py having to know this module.
    """


class ModelArgError(ModelFolderError, ValueError):
    """Bad input from the user (arguments, an occupied output folder): exit 2 like a usage error."""

    exit_code = 2


def default_cache_dir() -> Path:
    """$LMTEAM_CACHE if set, else ~/.cache/lmteam/models: pulled models live directly under it."""
    env = os.environ.get("LMTEAM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmteam" / "models"


def resolve_model(path_or_id: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """A model folder from a path, or from a known name (`smollm2`) already pulled into the cache."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".safetensors":
            path = path.parent
        if not (path / "config.json").is_file():
            raise ModelArgError(f"{path} is not a model folder (no config.json)")
        return path
    name = str(path_or_id)
    if name in KNOWN_MODELS:
        folder = (cache_dir or default_cache_dir()) / KNOWN_MODELS[name]
        if (folder / "config.json").is_file():
            return folder
        raise ModelArgError(f"{name} is not pulled yet (looked in {folder}): run `lmteam model pull {name}`")
    raise ModelArgError(f"no model folder {path}; known names: {', '.join(sorted(KNOWN_MODELS))}")


def is_hf_folder(path: Path) -> bool:
    """A transformers model folder (not, say, a SmallTalk run dir, which has its own config.json)."""
    try:
        return "model_type" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_free(out_dir: Path) -> None:
    """Refuse an output folder that already holds something: a model is never written over files."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelArgError(f"{out_dir} already exists and is not an empty folder; choose a new path")


@contextlib.contextmanager
def atomic_folder(out_dir: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside out_dir; it becomes out_dir in one rename on success.

    On any failure (Ctrl-C included) the temporary folder is removed, so out_dir is either
    absent, the old one, or complete. replace=True swaps out an existing out_dir (a cache entry
    being rebuilt); otherwise out_dir must be absent or empty.
    """
    out_dir = Path(out_dir)
    if not replace:
        check_free(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent, so the final rename never crosses a filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
    try:
        yield tmp
        # mkdtemp (and transformers' shard writer) make owner-only modes; a model folder is shared.
        tmp.chmod(0o755)
        for f in tmp.rglob("*"):
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out_dir.exists() and replace:
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            if out_dir.is_dir():
                out_dir.rmdir()  # empty (check_free); rename cannot replace a directory portably
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def hf_bars_off() -> Iterator[None]:
    """Silence transformers' tqdm bars (loading, "Writing model shards"): the CLI prints its own stage lines."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    if edit(data) is not False:
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def portable_folder(folder: Path, *, model_max_length: int | None = None) -> None:
    """Make a folder just written by transformers 5 load the same under 4.x, minus this load's options.

    - tokenizer_class TokenizersBackend (5.x only) -> PreTrainedTokenizerFast (both load tokenizer.json);
    - is_local / local_files_only are options of the load that made it, not facts of the tokenizer;
    - 5.x nests rope_theta in rope_parameters; 4.x reads it top-level and would silently fall
      back to 10,000, so a model trained with another theta would give wrong logits there.
    """
    def tokenizer(cfg: dict[str, Any]) -> None:
        for key in ("is_local", "local_files_only"):
            cfg.pop(key, None)
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if model_max_length:
            cfg["model_max_length"] = model_max_length

    def config(cfg: dict[str, Any]) -> bool:
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in rope or "rope_theta" in cfg or rope.get("rope_type", "default") != "default":
            return False
        cfg["rope_theta"] = rope["rope_theta"]
        return True

    if (folder / "tokenizer_config.json").is_file():
        _edit_json(folder / "tokenizer_config.json", tokenizer)
    _edit_json(folder / "config.json", config)


def write_provenance(folder: Path, record: dict[str, Any]) -> None:
    (folder / PROVENANCE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_provenance(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def weights_hash(folder: str | os.PathLike[str]) -> str:
    """sha256 over the folder's *.safetensors files in name order (each file's name, then its
    bytes, streamed): the model's identity, the `sha` a job records in pipeline/models/spec.py.

    Names are hashed too, so moving bytes between shards changes the identity. Tokenizer and
    config files are left out on purpose: the hash names the weights, which is what federated
    nodes must agree on.
    """
    files = weight_files(Path(folder))
    if not files:
        raise ModelFolderError(f"{folder} has no *.safetensors weights")
    h = hashlib.sha256()
    for f in files:
        # Same bytes in the same order as spec.weights_hash: one identity whichever module computes it.
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, offsets), without the data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        if not 2 <= n <= _MAX_HEADER:
            raise ModelFolderError(f"{path} is not a safetensors file (header length {n})")
        try:
            return json.loads(f.read(n))
        except ValueError:
            raise ModelFolderError(f"{path} has a corrupt safetensors header") from None


def _tensor_stats(files: list[Path]) -> tuple[int, Counter[str]]:
    params = 0
    per_dtype: Counter[str] = Counter()
    for f in files:
        for name, t in safetensors_header(f).items():
            if name == "__metadata__":
                continue
            n = math.prod(t["shape"])
            params += n
            per_dtype[_DTYPES.get(t["dtype"], t["dtype"].lower())] += n
    return params, per_dtype


def _tokenizer_vocab(folder: Path) -> int | None:
    # len(tokenizer) is the number of distinct ids: the model's vocabulary plus added special tokens.
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    vocab = spec.get("model", {}).get("vocab") or {}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))  # Unigram: a list
    ids |= {t["id"] for t in spec.get("added_tokens", [])}
    return len(ids)


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def model_info(path_or_id: str | os.PathLike[str], *, cache_dir: Path | None = None) -> dict[str, Any]:
    """What a model folder holds, read from its files without loading the weights.

    Keys: path, architecture, model_type, parameters (counted from the safetensors headers;
    tied embeddings are stored and counted once), layers, hidden_size, heads, vocab_size (the
    tokenizer's, None without tokenizer.json), config_vocab_size, context_length, dtype,
    size_bytes (all files of the folder), weights_sha256 (weights_hash) and source (lmteam.json).
    """
    folder = resolve_model(path_or_id, cache_dir)
    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as e:
        raise ModelFolderError(f"{folder / 'config.json'} is not valid JSON: {e}") from None
    files = weight_files(folder)
    if not files:
        raise ModelFolderError(f"{folder} has no *.safetensors weights (only safetensors folders are supported)")
    params, per_dtype = _tensor_stats(files)
    archs = config.get("architectures") or []
    return {
        "path": str(folder.resolve()),
        "architecture": archs[0] if archs else None,
        "model_type": config.get("model_type"),
        "parameters": params,
        "layers": _first(config, "num_hidden_layers", "n_layer"),
        "hidden_size": _first(config, "hidden_size", "n_embd", "d_model"),
        "heads": _first(config, "num_attention_heads", "n_head"),
        "vocab_size": _tokenizer_vocab(folder),
        "config_vocab_size": config.get("vocab_size"),
        "context_length": _first(config, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"),
        "dtype": "+".join(d for d, _ in per_dtype.most_common()) or None,
        "size_bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        "weights_sha256": weights_hash(folder),
        "source": read_provenance(folder),
    }
