"""Local worker processes forked from one warm fork server, so they share what they all import.

A node worker that imports torch itself holds ~210 MB of Python heap after its first optimizer
(torch, then torch._dynamo and sympy, which an optimizer imports on first use); 64 of them would
hold 13 GB of identical pages. The embedded fleet instead starts workers from a
`multiprocessing` fork server that has imported the `PRELOAD` modules once: each worker is a fork of
it, and those pages stay shared (copy-on-write) until written. A worker then runs `cli worker`
in-process, exactly as `python -m cli worker` would: its own session (so teardown reaches its
prefork pool), environment, working directory and log file.

The fork server is one per submitting process and keeps the preload list it started with.
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
from pathlib import Path

# Named, not imported: broker/ never imports workers/ (Celery and the fork server load it by name).
PRELOAD = ("workers.preload",)
ROOT = str(Path(__file__).resolve().parent.parent)


def _run_cli(argv: list[str], env: dict[str, str], log: str, cwd: str) -> None:
    """The forked worker's body: become `python -m cli <argv>` with this env, cwd and log."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    for src, dst in ((null, 0), (out, 1), (out, 2)):
        os.dup2(src, dst)
    os.close(out)
    os.close(null)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    sys.argv = ["cli", *argv]
    runpy.run_module("cli", run_name="__main__", alter_sys=True)


class ForkedWorker:
    """What the fleet uses of subprocess.Popen (pid, poll, wait, returncode), for a forked worker."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid = process.pid
        self.args = process.name

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return self._process.exitcode


def start_forked(argv: list[str], env: dict[str, str], log: Path, cwd: Path,
                 preload: tuple[str, ...] = PRELOAD) -> ForkedWorker:
    """Fork `cli <argv>` from the warm fork server (started, with `preload` imported, on first use)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    process = ctx.Process(target=_run_cli, args=(argv, env, str(log), str(cwd)), name=" ".join(argv[:5]))
    process.start()
    return ForkedWorker(process)
