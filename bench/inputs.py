"""The text a bench runs on: the built-in corpus by default, or files the user gives."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_corpus_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--corpus", type=Path, action="append", default=[],
                    help="a text file per domain (repeat); default: the built-in standard-library corpus")
    ap.add_argument("--corpus-dir", type=Path, default=None,
                    help="every *.txt in a folder, one domain each (the committed result: ../shared/data/corpora)")


def corpus_files(args: argparse.Namespace) -> list[str]:
    """The files given; empty means the built-in corpus."""
    found = sorted(str(p) for p in args.corpus_dir.glob("*.txt")) if args.corpus_dir else []
    return [str(p) for p in args.corpus] + found
