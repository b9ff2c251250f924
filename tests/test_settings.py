"""Fleet settings and the FPLD job config."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.settings import FleetSettings, SettingsError, redact_url
from pipeline.fpld.config import ConfigError, FPLDConfig


def test_settings_from_env_and_overrides(monkeypatch):
    """Env vars set defaults, explicit (CLI) values win, None means 'not given'."""
    monkeypatch.setenv("LMTEAM_BROKER_URL", "redis://env:6379/0")
    monkeypatch.setenv("LMTEAM_MAX_RETRIES", "5")
    s = FleetSettings.from_env(broker_url=None, secret="s")
    assert s.broker_url == "redis://env:6379/0" and s.max_retries == 5 and s.secret == "s"
    assert FleetSettings.from_env(broker_url="redis://cli:1/0").broker_url == "redis://cli:1/0"


def test_settings_validate_requires_secret_on_a_fleet():
    """A real fleet without a shared secret could not verify payloads."""
    with pytest.raises(SettingsError, match="LMTEAM_SECRET"):
        FleetSettings(broker_url="redis://h:6379/0").validate()
    with pytest.raises(SettingsError, match="redis://"):
        FleetSettings(broker_url="amqp://h", secret="x").validate()
    FleetSettings(broker_url="rediss://h:6380/0", secret="x").validate()


def test_settings_public_dict_hides_secrets():
    """Job records never hold the secret or the Redis password."""
    d = FleetSettings(broker_url="redis://:hunter2@h:6379/0", secret="x").public_dict()
    assert "secret" not in d and "hunter2" not in str(d)
    assert redact_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert FleetSettings(secret="abc").to_env()["LMTEAM_SECRET"] == "abc"


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 0}, "--bits"), ({"bits": 17}, "--bits"), ({"nodes": 0}, "--nodes"),
    ({"quorum": 5}, "--quorum"), ({"n_embd": 30, "n_head": 4}, "multiple"),
    ({"faults": {"9": "slow:1"}}, "unknown node"), ({"faults": {"0": "boom"}}, "unknown fault"),
])
def test_fpld_config_rejects_bad_values(kwargs, match):
    """Each bad option is named in the error."""
    with pytest.raises(ConfigError, match=match):
        FPLDConfig(**kwargs).validate()


def test_fpld_config_roundtrip_and_strictness():
    """The stored config rebuilds the same job; unknown keys are refused."""
    cfg = FPLDConfig(nodes=3, bits=4, faults={"1": "slow:2"}).validate()
    assert FPLDConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.effective_quorum == 3
    with pytest.raises(ConfigError, match="unknown FPLD option"):
        FPLDConfig.from_dict({"nodez": 3})


@given(st.dictionaries(
    st.sampled_from(sorted(FPLDConfig().to_dict()) + ["bogus"]),
    st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True),
              st.text(max_size=5), st.lists(st.text(max_size=3), max_size=2),
              st.dictionaries(st.text(max_size=2), st.text(max_size=8), max_size=2)),
    max_size=8))
@settings(max_examples=300, deadline=None)
def test_fpld_config_parser_fuzz_only_raises_config_error(d):
    """Any JSON-like mapping either parses to a valid config or raises ConfigError, nothing else."""
    try:
        cfg = FPLDConfig.from_dict(d)
    except ConfigError:
        return
    assert FPLDConfig.from_dict(cfg.to_dict()) == cfg


def test_task_events_travel_to_workers_and_default_by_where_they_run(monkeypatch):
    from broker.app import celery_config

    monkeypatch.delenv("LMTEAM_TASK_EVENTS", raising=False)
    assert FleetSettings.from_env().task_events is None
    assert celery_config(FleetSettings())["worker_send_task_events"] is True  # `lmteam worker`: Flower watches
    off = FleetSettings(task_events=False)
    assert off.to_env()["LMTEAM_TASK_EVENTS"] == "0"
    monkeypatch.setenv("LMTEAM_TASK_EVENTS", "0")
    assert FleetSettings.from_env() == FleetSettings(task_events=False)
    assert celery_config(FleetSettings.from_env())["worker_send_task_events"] is False
    monkeypatch.setenv("LMTEAM_TASK_EVENTS", "maybe")
    with pytest.raises(SettingsError, match="takes 1 or 0"):
        FleetSettings.from_env()


def test_auto_merge_groups_needs_many_nodes_and_two_aggregators():
    from pipeline.fpld.config import auto_merge_groups

    assert auto_merge_groups(64, aggregators=4) == 1  # one aggregator keeps up (bench/results/fleet_scale.json)
    assert auto_merge_groups(1000, aggregators=1) == 1  # groups taking turns on one worker only add work
    assert auto_merge_groups(128, aggregators=2) == 11 and auto_merge_groups(1000, aggregators=2) == 32
    assert FPLDConfig(nodes=8, merge_groups=20).merge_group_count == 8  # never more groups than nodes
    with pytest.raises(ConfigError, match="merge-groups"):
        FPLDConfig(merge_groups=-1).validate()
