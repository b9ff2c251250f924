"""Shared fixtures: a private redis-server per test session (never the shared one on :6379)."""

from __future__ import annotations

import shutil

import pytest

from broker.embedded import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: .ci/run installs it (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A real transformers model folder, built once per session in about a second: a random 2-layer
    llama (width 64, context 64) with a byte-level BPE tokenizer of 384 tokens, so any code that
    assumes the 256-byte vocabulary fails against it. Treat it as read-only."""
    from pipeline.models.hf_init import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-llama", arch="llama", layers=2, width=64, heads=4,
                           vocab=384, block_size=64, seed=0)
