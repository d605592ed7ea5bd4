"""Service starts: the order of checks, reasons, anomalies and leases."""

from __future__ import annotations

import pytest

from pactown_redis import (
    AnomalyType,
    LeaseLostError,
    LoadSample,
    TIER_LIMITS,
    UserProfile,
    UserTier,
)


async def start(policy, service, user="u", **kwargs):
    return await policy.check_can_start_service(user, service, **kwargs)


@pytest.mark.parametrize("tier", list(UserTier))
async def test_each_tier_caps_running_services(make_policy, tier):
    """A tier runs exactly max_concurrent_services services at once."""
    policy = make_policy(start_burst=1000)
    profile = UserProfile.from_tier("u", tier)
    profile.max_services_per_hour = 1000
    await policy.set_user_profile(profile)
    limit = TIER_LIMITS[tier]["max_concurrent_services"]
    allowed = 0
    for i in range(limit + 1):
        allowed += (await start(policy, f"s{i}")).allowed
    assert allowed == limit
    assert await policy.get_user_service_count("u") == limit


async def test_free_tier_denials_in_order(policy, clock):
    """Concurrent, then hourly limits, each with pactown's reason."""
    assert (await start(policy, "a")).allowed
    assert (await start(policy, "b")).allowed
    third = await start(policy, "c")
    assert not third.allowed
    assert third.reason == (
        "Max concurrent services reached (2/2). Stop a service first."
    )
    assert third.anomaly.anomaly_type is AnomalyType.CONCURRENT_LIMIT_EXCEEDED

    for name in ("a", "b"):
        await policy.unregister_service("u", name)
    for name in ("c", "d", "e"):
        assert (await start(policy, name)).allowed
        await policy.unregister_service("u", name)
    sixth = await start(policy, "f")
    assert sixth.reason == "Hourly service limit reached (5/5). Try again later."
    assert sixth.anomaly.anomaly_type is AnomalyType.HOURLY_LIMIT_EXCEEDED
    assert sixth.retry_after == pytest.approx(3600.0)

    clock.advance(3600)
    assert (await start(policy, "f")).allowed


async def test_blocked_user_is_denied_first(policy):
    """A block beats every other check and carries its reason."""
    await policy.block_user("u", "abuse")
    result = await start(policy, "a", port=22)
    assert not result.allowed
    assert result.reason == "User blocked: abuse"
    assert result.anomaly.anomaly_type is AnomalyType.UNAUTHORIZED_ACCESS
    await policy.unblock_user("u")
    assert (await start(policy, "a")).allowed


async def test_block_keeps_an_existing_profile(policy):
    """Blocking changes only blocked and reason of a stored profile."""
    await policy.set_user_profile(UserProfile.from_tier("u", UserTier.PRO))
    await policy.block_user("u", "chargeback")
    profile = await policy.get_user_profile("u")
    assert (profile.tier, profile.blocked, profile.reason) == (
        UserTier.PRO,
        True,
        "chargeback",
    )
    await policy.unblock_user("u")
    assert not (await policy.get_user_profile("u")).blocked


async def test_start_rate_is_its_own_bucket(make_policy, clock):
    """Ten starts at once, then one per second at 60 per minute."""
    policy = make_policy()
    await policy.set_user_profile(UserProfile.from_tier("u", UserTier.ADMIN))
    results = [await start(policy, f"s{i}") for i in range(11)]
    assert [r.allowed for r in results] == [True] * 10 + [False]
    assert results[-1].reason == "Rate limit exceeded. Wait 1.0s"
    assert results[-1].anomaly.anomaly_type is AnomalyType.RATE_LIMIT_EXCEEDED
    assert (await policy.check_rate_limit("u")).remaining == 999
    clock.advance(1)
    assert (await start(policy, "s10")).allowed


async def test_start_bucket_after_a_far_clock_step_back(make_policy, clock):
    """A server clock stepping back by more than the start bucket's refill
    empties it from then: the next start waits one refill of a start."""
    policy = make_policy()
    await policy.set_user_profile(UserProfile.from_tier("u", UserTier.ADMIN))
    assert (await start(policy, "s0")).allowed
    clock.advance(-60)
    denied = await start(policy, "s1")
    assert denied.reason == "Rate limit exceeded. Wait 1.0s"
    assert (await policy.get_user_state("u")).start_tokens == 0
    clock.advance(1)
    assert (await start(policy, "s1")).allowed


@pytest.mark.parametrize(
    ("ports", "port", "allowed"),
    [
        (None, 22, True),
        ([80, 443], 443, True),
        ([80, 443], 22, False),
        ([], 80, False),
        ([80], None, True),
    ],
)
async def test_port_allow_list(policy, ports, port, allowed):
    """Only listed ports pass; None allows any; no port skips the check."""
    profile = UserProfile.from_tier("u", UserTier.BASIC)
    profile.allowed_ports = ports
    await policy.set_user_profile(profile)
    result = await start(policy, "a", port=port)
    assert result.allowed is allowed
    if not allowed:
        assert result.reason == f"Port {port} not allowed for your account"


@pytest.mark.parametrize(
    ("first", "second", "reason"),
    [
        ({"memory_mb": 200}, {"memory_mb": 56}, None),
        (
            {"memory_mb": 200},
            {"memory_mb": 57},
            "Memory limit exceeded (200 + 57 > 256 MB). Stop a service first.",
        ),
        ({"cpu_percent": 20}, {"cpu_percent": 5}, None),
        (
            {"cpu_percent": 20},
            {"cpu_percent": 5.5},
            "CPU limit exceeded (20 + 5.5 > 25%). Stop a service first.",
        ),
    ],
)
async def test_memory_and_cpu_quotas(policy, first, second, reason):
    """Sums over running services may not pass the profile's quotas."""
    assert (await start(policy, "a", **first)).allowed
    result = await start(policy, "b", **second)
    assert result.allowed is (reason is None)
    assert result.reason == reason


async def test_quota_frees_when_a_service_stops(policy):
    """Stopping a service returns its memory to the quota."""
    assert (await start(policy, "a", memory_mb=256)).allowed
    assert not (await start(policy, "b", memory_mb=1)).allowed
    assert await policy.unregister_service("u", "a")
    assert (await start(policy, "b", memory_mb=256)).allowed


async def test_starting_a_running_service_reserves_nothing_twice(policy):
    """The same service id twice holds one slot and one hourly start."""
    first = await start(policy, "a")
    again = await start(policy, "a")
    assert again.allowed and again.already_running
    assert again.fence == first.fence
    assert await policy.get_user_service_count("u") == 1
    assert await policy.get_services_started_last_hour("u") == 1


async def test_leases_expire_without_renewal(make_policy, clock):
    """A dead replica's slots come back after lease_ttl, not before."""
    dead = make_policy(lease_ttl=30)
    other = make_policy(lease_ttl=30)
    await start(dead, "a")
    await start(dead, "b")
    clock.advance(29.9)
    assert not (await start(other, "c")).allowed
    clock.advance(0.2)
    assert (await start(other, "c")).allowed
    assert await other.get_user_service_count("u") == 1


async def test_renewal_keeps_leases_alive(make_policy, clock):
    """Renewing every lease_ttl / 3 keeps a slot for as long as needed."""
    holder = make_policy(lease_ttl=30)
    other = make_policy(lease_ttl=30)
    await start(holder, "a")
    await start(holder, "b")
    for _ in range(10):
        clock.advance(10)
        outcomes = await holder.renew_leases()
        assert {o.status for o in outcomes} == {"ok"}
    assert not (await start(other, "c")).allowed


async def test_register_confirms_and_unregister_frees(policy):
    """register_service renews a reserved slot and returns its fence."""
    result = await start(policy, "a")
    assert await policy.register_service("u", "a") == result.fence
    assert await policy.register_service("u", "a") == result.fence
    assert await policy.unregister_service("u", "a")
    assert not await policy.unregister_service("u", "a")
    with pytest.raises(LeaseLostError):
        await policy.register_service("u", "a")


async def test_register_from_another_replica(make_policy):
    """A replica may confirm a slot that another replica reserved."""
    first, second = make_policy(), make_policy()
    result = await start(first, "a")
    assert await second.register_service("u", "a") == result.fence
    assert "a" in second.held_leases()["u"]


async def test_fences_grow(make_policy, clock):
    """Each reservation gets a larger fencing token than the last."""
    # A start bucket that a 100 s step back leaves far from empty.
    policy = make_policy(start_burst=1000)
    fences = []
    for name in ("a", "b"):
        fences.append((await start(policy, name)).fence)
        await policy.unregister_service("u", name)
        clock.advance(1)
    clock.advance(-100)
    fences.append((await start(policy, "c")).fence)
    assert fences == sorted(fences) and len(set(fences)) == 3


async def test_rapid_restart_is_logged_but_allowed(policy):
    """The fifth start within a minute is allowed and logged."""
    profile = UserProfile.from_tier("u", UserTier.PRO)
    await policy.set_user_profile(profile)
    results = []
    for i in range(5):
        results.append(await start(policy, f"s{i}"))
        await policy.unregister_service("u", f"s{i}")
    assert all(r.allowed for r in results)
    assert results[-1].anomaly.anomaly_type is AnomalyType.RAPID_RESTART
    assert all(r.anomaly is None for r in results[:-1])


@pytest.mark.parametrize(
    ("tier", "allowed"), [(UserTier.FREE, False), (UserTier.PRO, True)]
)
async def test_overload_denies_free_and_delays_paid(make_policy, tier, allowed):
    """Over a threshold, the default tier is refused and others delayed."""
    policy = make_policy(
        cpu_threshold=80.0,
        memory_threshold=85.0,
        load_probe=lambda: LoadSample(cpu_percent=95.0, memory_percent=10.0),
    )
    await policy.set_user_profile(UserProfile.from_tier("u", tier))
    result = await start(policy, "a")
    assert result.allowed is allowed
    assert result.anomaly.anomaly_type is AnomalyType.SERVER_OVERLOADED
    if allowed:
        assert 0.5 <= result.delay_seconds <= 5.0
        assert result.reason.startswith("Server under load")
    else:
        assert result.reason == (
            "Server is currently overloaded. Please try again later."
        )


async def test_no_overload_below_thresholds(make_policy):
    """Under both thresholds nothing is delayed or logged."""
    policy = make_policy(
        cpu_threshold=80.0,
        memory_threshold=85.0,
        load_probe=lambda: LoadSample(cpu_percent=79.0, memory_percent=84.0),
    )
    result = await start(policy, "a")
    assert result.allowed and result.delay_seconds == 0 and result.anomaly is None


async def test_user_state_lists_leases(policy, clock):
    """get_user_state reports tokens, leases with expiry and fences."""
    result = await start(policy, "a", memory_mb=64, cpu_percent=5)
    await policy.check_rate_limit("u", cost=4)
    clock.advance(10)
    state = await policy.get_user_state("u")
    assert state.tokens == pytest.approx(16 + 10 / 3)
    assert state.started_last_hour == 1
    (lease,) = state.leases
    assert (lease.service_id, lease.fence) == ("a", result.fence)
    assert (lease.memory_mb, lease.cpu_percent) == (64, 5)
    assert lease.expires_in == pytest.approx(20.0)
