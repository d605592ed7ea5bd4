"""Profiles stored in Redis, and the anomaly stream, file and handler."""

from __future__ import annotations

import json

import pytest

from pactown_redis import (
    AnomalyType,
    InvalidInputError,
    Severity,
    TIER_LIMITS,
    UserProfile,
    UserTier,
)


@pytest.mark.parametrize("tier", list(UserTier))
def test_from_tier_fills_the_table(tier):
    """from_tier copies the tier's row of the limits table."""
    profile = UserProfile.from_tier("u", tier)
    for name, value in TIER_LIMITS[tier].items():
        assert getattr(profile, name) == value
    assert profile.allowed_ports is None and not profile.blocked


def test_tier_table_matches_the_documented_numbers():
    """The tier table is exactly the documented one."""
    rows = {
        tier.name: tuple(TIER_LIMITS[tier].values()) for tier in UserTier
    }
    assert rows == {
        "FREE": (2, 256, 25, 20, 5),
        "BASIC": (5, 512, 50, 60, 20),
        "PRO": (10, 2048, 80, 120, 50),
        "ENTERPRISE": (50, 8192, 100, 500, 200),
        "ADMIN": (100, 16384, 100, 1000, 1000),
    }


async def test_profile_round_trips(policy):
    """Every field of a stored profile reads back unchanged."""
    profile = UserProfile(
        user_id="u:1",
        tier=UserTier.ENTERPRISE,
        max_concurrent_services=7,
        max_memory_mb=1000,
        max_cpu_percent=70,
        max_requests_per_minute=33,
        max_services_per_hour=9,
        allowed_ports=[443, 80, 80],
        blocked=True,
        reason="review",
    )
    await policy.set_user_profile(profile)
    assert await policy.get_user_profile("u:1") == profile
    assert profile.allowed_ports == [80, 443]


async def test_missing_profile_is_the_default_tier(make_policy):
    """A user without a profile gets the configured default tier."""
    policy = make_policy(default_tier=UserTier.BASIC)
    assert (await policy.get_user_profile("x")).tier is UserTier.BASIC
    assert (await policy.check_rate_limit("x")).limit == 60


async def test_delete_profile_falls_back(policy):
    """Deleting a profile returns the user to the default tier."""
    await policy.set_user_profile(UserProfile.from_tier("u", UserTier.PRO))
    assert await policy.delete_user_profile("u")
    assert (await policy.check_rate_limit("u")).limit == 20


@pytest.mark.parametrize(
    "change",
    [
        {"max_requests_per_minute": 0},
        {"max_concurrent_services": -1},
        {"max_memory_mb": 1 << 40},
        {"max_cpu_percent": 2.5},
        {"max_services_per_hour": "5"},
        {"allowed_ports": [0]},
        {"allowed_ports": [70000]},
        {"reason": "x" * 501},
        {"tier": "platinum"},
        {"user_id": ""},
    ],
)
def test_absurd_profiles_are_rejected(change):
    """Negative, absurd or mistyped limits never make a profile."""
    data = {**UserProfile.from_tier("u", UserTier.FREE).model_dump(), **change}
    with pytest.raises(InvalidInputError):
        UserProfile.parse(data)


async def test_set_user_profile_rejects_other_types(policy, redis_client):
    """Only a UserProfile can be stored, and nothing is written otherwise."""
    with pytest.raises(InvalidInputError):
        await policy.set_user_profile({"user_id": "u"})
    assert await redis_client.dbsize() == 0


async def test_anomalies_go_to_stream_file_and_handler(make_policy, tmp_path):
    """Each anomaly reaches the stream, the JSON-lines file and on_anomaly."""
    seen = []
    log = tmp_path / "anomalies.jsonl"
    policy = make_policy(anomaly_log_path=log, on_anomaly=seen.append)
    for i in range(3):
        await policy.check_can_start_service("u", f"s{i}")
    await policy.anomalies.flush()
    (event,) = await policy.anomalies.recent()
    assert event.anomaly_type is AnomalyType.CONCURRENT_LIMIT_EXCEEDED
    assert seen == [event]
    line = json.loads(log.read_text().strip())
    assert line["anomaly_type"] == "concurrent_limit_exceeded"
    assert line["user_id"] == "u" and line["service_id"] == "s2"


async def test_async_handler_is_awaited(make_policy):
    """An async on_anomaly handler is awaited."""
    seen = []

    async def handler(event):
        seen.append(event.anomaly_type)

    policy = make_policy(on_anomaly=handler)
    await policy.block_user("u", "x")
    await policy.check_can_start_service("u", "s")
    await policy.anomalies.flush()
    assert seen == [AnomalyType.UNAUTHORIZED_ACCESS]


async def test_anomalies_by_user_and_type(policy):
    """Events can be read back by user and by type, oldest first."""
    for _ in range(21):
        await policy.check_rate_limit("a")
    await policy.block_user("b", "spam")
    await policy.check_can_start_service("b", "s")
    by_a = await policy.anomalies.by_user("a")
    assert [e.user_id for e in by_a] == ["a"]
    blocked = await policy.anomalies.by_type(AnomalyType.UNAUTHORIZED_ACCESS)
    assert [e.user_id for e in blocked] == ["b"]
    assert len(await policy.anomalies.recent(count=1)) == 1


async def test_summary_counts_by_type_severity_and_user(policy):
    """The summary totals the period's events."""
    for _ in range(22):
        await policy.check_rate_limit("a")
    await policy.block_user("b", "spam")
    await policy.check_can_start_service("b", "s")
    summary = await policy.get_anomaly_summary(hours=1)
    assert summary["total_anomalies"] == 3
    assert summary["by_type"] == {
        "rate_limit_exceeded": 2,
        "unauthorized_access": 1,
    }
    assert summary["by_severity"] == {"medium": 2, "high": 1}
    assert summary["top_users"] == {"a": 2, "b": 1}
    assert summary["recent_critical"] == []


async def test_stream_is_capped(make_policy, redis_client):
    """The stream stays near its cap however many anomalies occur."""
    policy = make_policy(stream_maxlen=50)
    for _ in range(400):
        await policy.check_rate_limit("u", cost=100)
    await policy.anomalies.flush()
    # MAXLEN ~ trims whole macro nodes (100 entries by default) at a time.
    assert await redis_client.xlen(policy.keys.anomalies) <= 50 + 100


def test_event_fields_round_trip():
    """An event survives its stream encoding unchanged."""
    from pactown_redis import AnomalyEvent
    from pactown_redis.models import utcnow

    event = AnomalyEvent(
        timestamp=utcnow(),
        anomaly_type=AnomalyType.PORT_SCAN_DETECTED,
        user_id="u",
        service_id=None,
        details="d",
        severity=Severity.CRITICAL,
        metadata={"ports": [1, 2]},
    )
    assert AnomalyEvent.from_fields(event.to_fields()) == event
