"""The request bucket: capacity, refill, costs and the clock."""

from __future__ import annotations

import math

import pytest

from pactown_redis import AnomalyType, TIER_LIMITS, UserProfile, UserTier


@pytest.mark.parametrize("tier", list(UserTier))
async def test_each_tier_allows_its_burst_then_denies(policy, tier):
    """A fresh bucket allows exactly max_requests_per_minute requests."""
    await policy.set_user_profile(UserProfile.from_tier("u", tier))
    limit = TIER_LIMITS[tier]["max_requests_per_minute"]
    for i in range(limit):
        result = await policy.check_rate_limit("u")
        assert result.allowed, i
        assert result.remaining == limit - i - 1
        assert result.limit == limit
    denied = await policy.check_rate_limit("u")
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(60 / limit)


async def test_user_without_profile_gets_the_free_tier(policy):
    """20 requests at once, then one every 3 s, for an unknown user."""
    results = [await policy.check_rate_limit("nobody") for _ in range(21)]
    assert [r.allowed for r in results] == [True] * 20 + [False]
    assert results[-1].retry_after == pytest.approx(3.0)
    assert results[-1].reset_after == pytest.approx(60.0)


async def test_refill_follows_the_clock(policy, clock):
    """Tokens come back at rpm/60 per second, never past the capacity."""
    for _ in range(20):
        await policy.check_rate_limit("u")
    clock.advance(2.9)
    assert not (await policy.check_rate_limit("u")).allowed
    clock.advance(0.1)
    assert (await policy.check_rate_limit("u")).allowed
    clock.advance(3600)
    result = await policy.check_rate_limit("u")
    assert result.remaining == 19
    assert result.reset_after == pytest.approx(3.0)


async def test_clock_stepping_back_far_empties_the_bucket(policy, clock):
    """A server clock that steps back by more than a refill creates no
    tokens: the bucket is empty from then and refills as usual."""
    for _ in range(10):
        await policy.check_rate_limit("u")
    clock.advance(-600)
    denied = await policy.check_rate_limit("u")
    assert (denied.allowed, denied.remaining) == (False, 0)
    assert denied.retry_after == pytest.approx(3.0)
    clock.advance(2.9)
    assert not (await policy.check_rate_limit("u")).allowed
    clock.advance(0.1)
    assert (await policy.check_rate_limit("u")).allowed
    assert (await policy.get_user_state("u")).tokens == 0


async def test_clock_stepping_back_a_little_is_owed(policy, clock):
    """A shorter step is owed by the bucket and paid back as the clock
    runs: ten tokens spent and a 9 s step leave seven, and the ten come
    back once the clock has caught up."""
    for _ in range(10):
        await policy.check_rate_limit("u")
    clock.advance(-9)
    assert (await policy.get_user_state("u")).tokens == 7
    clock.advance(9)
    assert (await policy.get_user_state("u")).tokens == 10
    assert (await policy.check_rate_limit("u")).remaining == 9


@pytest.mark.parametrize(
    ("cost", "allowed", "remaining"),
    [(1, True, 19), (0.5, True, 19), (20, True, 0), (21, False, 20)],
)
async def test_costs(policy, cost, allowed, remaining):
    """A cost debits that many tokens; more than the capacity never fits."""
    result = await policy.check_rate_limit("u", cost=cost)
    assert (result.allowed, result.remaining) == (allowed, remaining)
    if cost > 20:
        assert math.isinf(result.retry_after)


async def test_denial_is_an_anomaly(policy):
    """Each denied request records RATE_LIMIT_EXCEEDED for its user."""
    for _ in range(21):
        await policy.check_rate_limit("u")
    events = await policy.anomalies.by_user("u")
    assert [e.anomaly_type for e in events] == [AnomalyType.RATE_LIMIT_EXCEEDED]


async def test_profile_change_applies_on_every_replica(make_policy):
    """A profile set through one policy is used by another at once."""
    first, second = make_policy(), make_policy()
    await first.set_user_profile(UserProfile.from_tier("u", UserTier.PRO))
    result = await second.check_rate_limit("u")
    assert result.limit == 120
    assert (await second.get_user_profile("u")).tier is UserTier.PRO


async def test_two_policies_share_one_bucket(make_policy):
    """Two replicas together allow one bucket's worth, not two."""
    first, second = make_policy(), make_policy()
    allowed = 0
    for _ in range(20):
        allowed += (await first.check_rate_limit("u")).allowed
        allowed += (await second.check_rate_limit("u")).allowed
    assert allowed == 20
