"""The lmteam CLI end to end: a tiny real run, and bad input that must fail in one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fleet import tiny_corpus

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--nodes", "2", "--rounds", "1", "--local-steps", "3", "--distill-steps", "3", "--probe-seqs", "4",
        "--eval-seqs", "4", "--quiet"]


def lmteam(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMTEAM_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.e2e
def test_cli_fpld_runs_on_the_embedded_default(tmp_path):
    """`lmteam fpld` with no broker starts its own Redis and workers, writes a report, cleans up."""
    corpus = tiny_corpus(tmp_path, domains=2, size=20_000)
    out = tmp_path / "run"
    res = lmteam("fpld", *TINY, "--corpus", corpus[0], "--corpus", corpus[1], "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["nodes"] == 2 and report["summary"]["student_ppl"] > 1
    assert "student perplexity" in res.stdout
    leftover = subprocess.run(["pgrep", "-f", f"cli worker.*{tmp_path}"], capture_output=True, text=True)
    assert leftover.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--corpus", "does-not-exist.txt"], "does-not-exist.txt"),
    (["--bits", "0"], "--bits must be 1..16 or 32"),
    (["--nodes", "0"], "--nodes must be at least 1"),
    (["--fault", "nonsense"], "--fault takes NODE=SPEC"),
])
def test_cli_bad_input_fails_in_one_line(tmp_path, args, message):
    """Bad input: non-zero exit, the reason in one line, no traceback, nothing written."""
    res = lmteam("fpld", *args, "--quiet", cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [(b"", "empty"), (b"\x00\x01binary\xff" * 1000, "binary")])
def test_cli_rejects_empty_and_binary_corpus(tmp_path, content, message):
    """Empty and binary files are refused before any process starts."""
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    res = lmteam("fpld", "--corpus", str(bad), "--quiet", cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and message in res.stderr.lower() and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]


def test_cli_worker_needs_a_broker(tmp_path):
    """A worker without a broker URL says how to give one."""
    res = lmteam("worker", "--role", "aggregator", cwd=tmp_path, timeout=60)
    assert res.returncode == 2 and "LMTEAM_BROKER_URL" in res.stderr


def test_cli_status_unknown_job(tmp_path, redis_server):
    """An unknown job id is one clear line and exit 1."""
    res = lmteam("status", "fpld-nope", "--broker", redis_server.url, cwd=tmp_path, timeout=60)
    assert res.returncode == 1 and "no job 'fpld-nope'" in res.stderr and "Traceback" not in res.stderr


def test_cli_wrong_redis_password_is_clear(tmp_path, redis_server):
    """A wrong password in the broker URL is refused with a readable message."""
    url = redis_server.url.replace(redis_server.password, "wrong")
    res = lmteam("status", "--broker", url, cwd=tmp_path, timeout=60)
    assert res.returncode == 1 and "password" in res.stderr.lower() and "Traceback" not in res.stderr


def test_cli_without_redis_server_says_how_to_install(tmp_path):
    """No redis-server anywhere: one line with the install command, exit 1."""
    corpus = tiny_corpus(tmp_path, domains=2, size=20_000)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMTEAM_")}
    env.update(PYTHONPATH=str(ROOT), PATH=str(Path(sys.executable).parent))
    res = subprocess.run([sys.executable, "-m", "cli", "fpld", *TINY, "--corpus", corpus[0], "--corpus", corpus[1]],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "no redis-server found" in res.stderr and "apt-get install redis-server" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_worker_wrong_password_is_refused(tmp_path, redis_server):
    """A worker with the wrong Redis password stops at once with one line."""
    url = redis_server.url.replace(redis_server.password, "wrong")
    res = lmteam("worker", "--role", "aggregator", "--broker", url, "--secret", "s", cwd=tmp_path, timeout=60)
    assert res.returncode == 1 and "refused the password" in res.stderr and "Traceback" not in res.stderr


def test_cli_worker_wrong_fleet_secret_is_refused(tmp_path, redis_server, redis_client):
    """A worker whose secret differs from the fleet's is refused before it takes any task."""
    from broker.auth import check_fleet_secret

    check_fleet_secret(redis_client, "the-fleet-secret")
    res = lmteam("worker", "--role", "aggregator", "--broker", redis_server.url, "--secret", "another",
                 cwd=tmp_path, timeout=60)
    assert res.returncode == 1 and "LMTEAM_SECRET differs" in res.stderr and "Traceback" not in res.stderr
