"""Policy settings from PACTOWN_* environment variables."""

from __future__ import annotations

import inspect
import os
import uuid
from pathlib import Path

import pytest
import redis.asyncio as aredis

from pactown_redis import InvalidInputError, SecurityPolicy, UserTier
from pactown_redis.settings import PolicySettings, build_policy


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Each test starts with no PACTOWN_* variable and no REDIS_URL."""
    for name in list(os.environ):
        if name.upper().startswith("PACTOWN_") or name.upper() == "REDIS_URL":
            monkeypatch.delenv(name)


def test_defaults_are_the_policy_defaults():
    """Without variables, settings equal SecurityPolicy's own defaults."""
    settings = PolicySettings.load()
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(SecurityPolicy).parameters.items()
        if name in settings.policy_options()
    }
    assert settings.policy_options() == defaults
    assert settings.redis_url.get_secret_value() == "redis://localhost:6379/0"


def test_every_setting_is_a_policy_option():
    """Settings hold only options SecurityPolicy really takes."""
    parameters = inspect.signature(SecurityPolicy).parameters
    assert set(PolicySettings.load().policy_options()) <= set(parameters)


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("PACTOWN_NAMESPACE", "tenant-a", "namespace", "tenant-a"),
        ("pactown_namespace", "lower", "namespace", "lower"),
        ("PACTOWN_LEASE_TTL", "12.5", "lease_ttl", 12.5),
        ("PACTOWN_STREAM_MAXLEN", "500", "stream_maxlen", 500),
        ("PACTOWN_DEFAULT_RATE_LIMIT", "120", "default_rate_limit", 120),
        ("PACTOWN_START_BURST", "3", "start_burst", 3),
        ("PACTOWN_CPU_THRESHOLD", "90", "cpu_threshold", 90.0),
        ("PACTOWN_CPU_THRESHOLD", "none", "cpu_threshold", None),
        ("PACTOWN_CPU_THRESHOLD", "None", "cpu_threshold", None),
        ("PACTOWN_MEMORY_THRESHOLD", "off", "memory_threshold", None),
        ("PACTOWN_MEMORY_THRESHOLD", "", "memory_threshold", None),
        ("PACTOWN_DEFAULT_TIER", "PRO", "default_tier", UserTier.PRO),
        ("PACTOWN_RAPID_RESTART_THRESHOLD", "3", "rapid_restart_threshold", 3),
        (
            "PACTOWN_ANOMALY_LOG_PATH", "/var/log/a.jsonl", "anomaly_log_path",
            Path("/var/log/a.jsonl"),
        ),
        ("PACTOWN_ANOMALY_LOG_PATH", "none", "anomaly_log_path", None),
        ("PACTOWN_TIMEOUT", "0.5", "timeout", 0.5),
        ("PACTOWN_RATE_LIMIT_FAIL_MODE", "open", "rate_limit_fail_mode", "open"),
        ("PACTOWN_RATE_LIMIT_FAIL_MODE", "Closed", "rate_limit_fail_mode",
         "closed"),
        ("PACTOWN_START_FAIL_MODE", "LOCAL", "start_fail_mode", "local"),
        ("PACTOWN_REPLICAS", "3", "replicas", 3),
        ("PACTOWN_BREAKER_THRESHOLD", "5", "breaker_threshold", 5),
        ("PACTOWN_BREAKER_COOLDOWN", "0", "breaker_cooldown", 0.0),
        ("PACTOWN_BREAKER_COOLDOWN", "7.5", "breaker_cooldown", 7.5),
        ("PACTOWN_AUTO_BLOCK_THRESHOLD", "4", "auto_block_threshold", 4),
        ("PACTOWN_AUTO_BLOCK_THRESHOLD", "none", "auto_block_threshold", None),
        ("PACTOWN_AUTO_BLOCK_THRESHOLD", "off", "auto_block_threshold", None),
        ("PACTOWN_AUTO_BLOCK_WINDOW", "60", "auto_block_window", 60.0),
        ("PACTOWN_AUTO_BLOCK_DURATION", "90.5", "auto_block_duration", 90.5),
    ],
)
def test_values_from_the_environment(monkeypatch, variable, value, field, expected):
    """Each variable sets its field; 'none', 'off' or '' turn checks off."""
    monkeypatch.setenv(variable, value)
    assert getattr(PolicySettings.load(), field) == expected


@pytest.mark.parametrize(
    ("variables", "url"),
    [
        ({}, "redis://localhost:6379/0"),
        ({"REDIS_URL": "redis://fallback:6379/1"}, "redis://fallback:6379/1"),
        (
            {"REDIS_URL": "redis://b:1/0", "PACTOWN_REDIS_URL": "redis://a:1/0"},
            "redis://a:1/0",
        ),
        ({"PACTOWN_REDIS_URL": "rediss://tls:6380/0"}, "rediss://tls:6380/0"),
    ],
)
def test_redis_url(monkeypatch, variables, url):
    """PACTOWN_REDIS_URL wins over REDIS_URL, which wins over the default."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert PolicySettings.load().redis_url.get_secret_value() == url


def test_the_url_is_masked(monkeypatch):
    """The URL's password shows neither in repr, str nor a dump."""
    monkeypatch.setenv("PACTOWN_REDIS_URL", "redis://:hunter2@db:6379/0")
    settings = PolicySettings.load()
    shown = [repr(settings), str(settings), settings.model_dump_json()]
    assert not any("hunter2" in text for text in shown)
    assert "**********" in repr(settings)


def test_a_bad_url_is_reported_without_its_password(monkeypatch):
    """A URL of the wrong scheme is refused without echoing it."""
    monkeypatch.setenv("PACTOWN_REDIS_URL", "http://:hunter2@db:6379/0")
    with pytest.raises(InvalidInputError) as caught:
        PolicySettings.load()
    assert "PACTOWN_REDIS_URL" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ValueError) as direct:
        PolicySettings()
    assert "hunter2" not in str(direct.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PACTOWN_LEASE_TTL", "0"),
        ("PACTOWN_LEASE_TTL", "soon"),
        ("PACTOWN_STREAM_MAXLEN", "1.5"),
        ("PACTOWN_STREAM_MAXLEN", "0"),
        ("PACTOWN_START_BURST", "0"),
        ("PACTOWN_DEFAULT_RATE_LIMIT", "0"),
        ("PACTOWN_CPU_THRESHOLD", "150"),
        ("PACTOWN_MEMORY_THRESHOLD", "-1"),
        ("PACTOWN_NAMESPACE", "a b"),
        ("PACTOWN_NAMESPACE", "x" * 65),
        ("PACTOWN_DEFAULT_TIER", "gold"),
        ("PACTOWN_RAPID_RESTART_THRESHOLD", "0"),
        ("PACTOWN_TIMEOUT", "0"),
        ("PACTOWN_TIMEOUT", "61"),
        ("PACTOWN_TIMEOUT", "fast"),
        ("PACTOWN_RATE_LIMIT_FAIL_MODE", "sometimes"),
        ("PACTOWN_START_FAIL_MODE", ""),
        ("PACTOWN_REPLICAS", "0"),
        ("PACTOWN_REPLICAS", "2.5"),
        ("PACTOWN_REPLICAS", "1000001"),
        ("PACTOWN_BREAKER_THRESHOLD", "0"),
        ("PACTOWN_BREAKER_COOLDOWN", "-1"),
        ("PACTOWN_BREAKER_COOLDOWN", "3601"),
        ("PACTOWN_AUTO_BLOCK_THRESHOLD", "0"),
        ("PACTOWN_AUTO_BLOCK_THRESHOLD", "10001"),
        ("PACTOWN_AUTO_BLOCK_WINDOW", "0"),
        ("PACTOWN_AUTO_BLOCK_DURATION", str(30 * 86400 + 1)),
    ],
)
def test_bad_values_name_their_variable(monkeypatch, variable, value):
    """A bad value raises InvalidInputError naming the variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(InvalidInputError, match=variable):
        PolicySettings.load()


def test_load_takes_overrides():
    """Keyword values override the environment; unknown names are refused."""
    assert PolicySettings.load(namespace="given").namespace == "given"
    url = PolicySettings.load(redis_url="redis://given:1/0").redis_url
    assert url.get_secret_value() == "redis://given:1/0"
    with pytest.raises(InvalidInputError, match="LEASE_TLL"):
        PolicySettings.load(lease_tll=5)


async def test_build_policy_connects_to_the_url(monkeypatch, redis_server):
    """build_policy() reads the environment and connects to its URL."""
    namespace = "settings-" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("PACTOWN_REDIS_URL", redis_server.url)
    monkeypatch.setenv("PACTOWN_NAMESPACE", namespace)
    monkeypatch.setenv("PACTOWN_LEASE_TTL", "9")
    monkeypatch.setenv("PACTOWN_DEFAULT_TIER", "basic")
    monkeypatch.setenv("PACTOWN_CPU_THRESHOLD", "none")
    async with build_policy() as policy:
        result = await policy.check_rate_limit("u")
        assert (policy.namespace, policy.lease_ttl) == (namespace, 9.0)
        assert policy.load.cpu_threshold is None
        bucket = policy.keys.user("u").requests
    assert (result.allowed, result.limit, result.degraded) == (True, 60, False)
    client = aredis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await client.exists(bucket)
        assert bucket.startswith(namespace + ":")
    finally:
        await client.aclose()


async def test_build_policy_on_a_given_client(redis_client, clock):
    """build_policy(redis=...) uses that client; options override settings."""
    settings = PolicySettings.load(default_tier="pro", start_burst=2)
    policy = build_policy(
        settings, redis=redis_client, clock=clock, start_burst=4,
        cpu_threshold=None, memory_threshold=None,
    )
    async with policy:
        result = await policy.check_rate_limit("u")
        assert result.limit == 120
        assert policy.rules.start_burst == 4
    assert await redis_client.ping()


async def test_build_policy_passes_the_resilience_settings(redis_client, clock):
    """Timeout, fail modes, replicas, breaker and auto-block reach the policy."""
    settings = PolicySettings.load(
        timeout=0.5, rate_limit_fail_mode="open", start_fail_mode="local",
        replicas=3, breaker_threshold=7, breaker_cooldown=4.5,
        auto_block_threshold=2, auto_block_window=60, auto_block_duration=90,
    )
    async with build_policy(settings, redis=redis_client, clock=clock) as policy:
        resilience = policy.resilience
        assert resilience.timeout == 0.5
        assert resilience.rate_limit_fail_mode == "open"
        assert resilience.start_fail_mode == "local"
        assert resilience.replicas == 3
        breaker = resilience.breaker
        assert (breaker.threshold, breaker.cooldown) == (7, 4.5)
        assert policy.auto_block is not None
        assert (
            policy.auto_block.threshold,
            policy.auto_block.window_ms,
            policy.auto_block.duration_ms,
        ) == (2, 60_000, 90_000)


def test_build_policy_reports_bad_options():
    """An option out of range given to build_policy is InvalidInputError."""
    with pytest.raises(InvalidInputError, match="start_burst"):
        build_policy(PolicySettings.load(), start_burst=0)
