"""An automatically blocked start says how long the block has left."""

from __future__ import annotations

from typing import Any, Iterator

import fakeredis
import pytest
import redis

from pactown_redis import SyncSecurityPolicy, UserProfile, UserTier

THRESHOLD = 2
DURATION = 300.0
BLOCK_OPTIONS = {
    "auto_block_threshold": THRESHOLD,
    "auto_block_window": 60,
    "auto_block_duration": DURATION,
}

#: (seconds since the block began, retry_after of a start then)
WAITS = [(0.0, 300.0), (1.5, 298.5), (120.0, 180.0), (299.25, 0.75)]


def allowed_8000(user_id: str) -> UserProfile:
    """A PRO profile whose only allowed port is 8000."""
    base = UserProfile.from_tier(user_id, UserTier.PRO)
    return UserProfile.parse({**base.model_dump(), "allowed_ports": [8000]})


@pytest.fixture
def sync_client(backend: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """An empty sync client of the backend under test."""
    if backend == "fake":
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), protocol=3)
    else:
        url = request.getfixturevalue("redis_server").url
        client = redis.Redis.from_url(url, protocol=3)
        client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.mark.parametrize(("elapsed", "expected"), WAITS)
async def test_async_autoblocked_start_has_retry_after(
    make_policy, clock, elapsed, expected
):
    """retry_after and delay_seconds of an auto-blocked start are the
    block's seconds left by the policy's clock."""
    policy = make_policy(**BLOCK_OPTIONS)
    await policy.set_user_profile(allowed_8000("u"))
    for _ in range(THRESHOLD):
        refused = await policy.check_can_start_service("u", "s", port=22)
        assert refused.retry_after is None
    clock.advance(elapsed)

    result = await policy.check_can_start_service("u", "ok", port=8000)

    assert result.reason.startswith("User temporarily blocked")
    assert result.retry_after == pytest.approx(expected, abs=1e-6)
    assert result.delay_seconds == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(("elapsed", "expected"), WAITS)
def test_sync_autoblocked_start_has_retry_after(
    sync_client, clock, elapsed, expected
):
    """The blocking policy reports the same seconds left of the block."""
    policy = SyncSecurityPolicy(
        sync_client, clock=clock, cpu_threshold=None, memory_threshold=None,
        auto_renew=False, timeout=10.0, **BLOCK_OPTIONS,
    )
    try:
        policy.set_user_profile(allowed_8000("u"))
        for _ in range(THRESHOLD):
            refused = policy.check_can_start_service("u", "s", port=22)
            assert refused.retry_after is None
        clock.advance(elapsed)

        result = policy.check_can_start_service("u", "ok", port=8000)
    finally:
        policy.close()

    assert result.reason.startswith("User temporarily blocked")
    assert result.retry_after == pytest.approx(expected, abs=1e-6)
    assert result.delay_seconds == pytest.approx(expected, abs=1e-6)
