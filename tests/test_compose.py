"""The docker-compose file is valid (no Docker engine runs here; `docker-compose config` needs none)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def compose():
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose missing: .ci/run installs it (apt-get install docker-compose)")
        pytest.skip("docker-compose not installed (apt-get install docker-compose)")
    return exe


def _config(compose: str, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "docker-compose.yml", workdir / "docker-compose.yml")
    return subprocess.run([compose, "config", *args], cwd=workdir, capture_output=True, text=True, timeout=60)


def test_compose_config_is_valid_with_the_example_env(compose, tmp_path):
    """With .env made from .env.example, the file validates and has every role."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    res = _config(compose, tmp_path, "--services")
    assert res.returncode == 0, res.stderr
    assert set(res.stdout.split()) == {"redis", "flower", "aggregator", "expert", "node0", "node1", "node2", "node3",
                                       "serve-expert0", "serve-expert1"}
    # expert replicas serve a finished run: they start only with `--profile serve`
    import yaml

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert all(services[f"serve-expert{i}"].get("profiles") == ["serve"] for i in (0, 1))
    assert all("profiles" not in v for k, v in services.items() if not k.startswith("serve-"))
    full = _config(compose, tmp_path)
    assert "--requirepass" in full.stdout and "appendonly" in full.stdout
    assert "FLOWER_BASIC_AUTH" in full.stdout


def test_compose_refuses_to_start_without_secrets(compose, tmp_path):
    """No .env values: compose stops with the name of the missing secret, nothing defaults to empty."""
    (tmp_path / ".env").write_text("")
    res = _config(compose, tmp_path)
    assert res.returncode != 0 and "REDIS_PASSWORD" in res.stderr


def test_no_secret_is_committed():
    """.env is ignored by git; the example holds placeholders only."""
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert all("change-me" in line for line in (ROOT / ".env.example").read_text().splitlines()
               if line and not line.startswith("#"))
