"""Real Redis failures: every decision stays bounded and says how it was
made, nothing is applied twice or half, and sharing resumes on recovery.

Each test starts its own redis-server (or Sentinel setup) and breaks it for
real: SIGKILL, SIGSTOP, ``CLIENT PAUSE``, ``SCRIPT FLUSH``, a tiny
``maxmemory``, a failover, and a proxy that loses one reply. The breaker's
clock is a second ``Clock`` the test moves; the Redis clock is the ``clock``
fixture, so buckets and leases do not move with real time.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest
import redis

from pactown_redis import (
    AnomalyType,
    RedisUnavailableError,
    SecurityPolicy,
    UserProfile,
    UserTier,
    _core,
)
from pactown_redis.keys import KeySpace
from pactown_redis.resilience import (
    BreakerState,
    Resilience,
    SyncGuard,
    client_options,
)
from conftest import Clock
from servers import HOST, LocalSentinel, RedisServer, ReplyDropper, free_port

pytestmark = pytest.mark.slow

TIMEOUT = 0.25
# The one timing assert of the suite: a decision against a frozen server
# returns within the deadline plus this margin.
MARGIN = 0.15
COOLDOWN = 5.0
# No test here may run longer than this, whatever the servers do.
TEST_BOUND = 60.0


def bounded(test: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
    """End the test with a failure if it runs past ``TEST_BOUND``."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        await asyncio.wait_for(test(*args, **kwargs), TEST_BOUND)

    return run


def build(
    url_or_client: Any, clock: Clock, ticker: Clock, **options: Any
) -> SecurityPolicy:
    """A policy with the deadline under test and overload checks off."""
    options.setdefault("timeout", TIMEOUT)
    options.setdefault("breaker_cooldown", COOLDOWN)
    return SecurityPolicy(
        url_or_client,
        clock=clock,
        monotonic=ticker,
        cpu_threshold=None,
        memory_threshold=None,
        **options,
    )


async def unavailable_events(policy: SecurityPolicy) -> list[Any]:
    await policy.anomalies.flush()
    return await policy.anomalies.by_type(AnomalyType.REDIS_UNAVAILABLE)


def snapshot(server: RedisServer) -> dict[bytes, bytes]:
    """Every key with its serialized value."""
    client = server.client(socket_timeout=5.0)
    try:
        return {key: client.dump(key) for key in client.keys("*")}
    finally:
        client.close()


# -- restarts -----------------------------------------------------------------


@bounded
async def test_restart_without_persistence_restores_leases(clock):
    """Killed: decisions degrade; restarted empty: the next call is shared,
    one REDIS_UNAVAILABLE is recorded, and the held lease comes back with
    the next renewal."""
    ticker = Clock(start=500.0)
    with RedisServer() as server:
        async with build(server.url, clock, ticker) as policy:
            granted = await policy.check_can_start_service("u", "s1")
            assert granted.allowed and not granted.degraded
            assert (await policy.check_rate_limit("u")).remaining == 19

            server.kill()
            rate = await policy.check_rate_limit("u")
            start = await policy.check_can_start_service("u", "s2")
            assert (rate.allowed, rate.degraded) == (True, True)
            assert (start.allowed, start.degraded, start.fence) == (
                False, True, None
            )
            with pytest.raises(RedisUnavailableError):
                await policy.renew_leases()

            server.start()
            ticker.advance(COOLDOWN)
            shared = await policy.check_rate_limit("u")
            assert (shared.degraded, shared.remaining) == (False, 19)
            assert await policy.get_user_service_count("u") == 0

            (renewed,) = await policy.renew_leases()
            assert (renewed.service_id, renewed.status) == ("s1", "restored")
            assert renewed.fence == granted.fence
            assert await policy.get_user_service_count("u") == 1

            (event,) = await unavailable_events(policy)
            assert event.metadata["degraded_decisions"] == 2
            assert (event.metadata["allowed"], event.metadata["denied"]) == (1, 1)
            assert event.metadata["started_at"] <= event.metadata["ended_at"]


@bounded
async def test_restart_with_persistence_keeps_every_count(clock):
    """A persisted server comes back with the bucket and the lease as they
    were: the lease renews, nothing is restored or counted twice."""
    ticker = Clock(start=500.0)
    with RedisServer(persistence=True) as server:
        async with build(server.url, clock, ticker) as policy:
            assert (await policy.check_can_start_service("u", "s1")).allowed
            for _ in range(2):
                await policy.check_rate_limit("u")

            server.kill()
            assert (await policy.check_rate_limit("u")).degraded
            server.start()
            ticker.advance(COOLDOWN)

            shared = await policy.check_rate_limit("u")
            assert (shared.degraded, shared.remaining) == (False, 17)
            (renewed,) = await policy.renew_leases()
            assert renewed.status == "ok"
            state = await policy.get_user_state("u")
            assert (state.running, state.started_last_hour) == (1, 1)
            assert len(await unavailable_events(policy)) == 1


# -- a server that stops answering --------------------------------------------


@bounded
async def test_frozen_server_bounds_every_decision(clock):
    """SIGSTOP: each decision returns within the deadline (plus a margin),
    the breaker opens, and after SIGCONT the probe closes it."""
    ticker = Clock(start=500.0)
    with RedisServer() as server:
        async with build(server.url, clock, ticker, breaker_threshold=3) as policy:
            assert not (await policy.check_rate_limit("u")).degraded
            breaker = policy.resilience.breaker

            server.freeze()
            try:
                for i in range(6):
                    began = time.perf_counter()
                    if i % 2:
                        result: Any = await policy.check_can_start_service(
                            "u", f"s{i}"
                        )
                    else:
                        result = await policy.check_rate_limit("u")
                    took = time.perf_counter() - began
                    assert result.degraded, i
                    assert took < TIMEOUT + MARGIN, (i, took)
                    if i >= 3:
                        # The breaker is open: no call waits for Redis.
                        assert took < TIMEOUT, (i, took)
                assert breaker.state is BreakerState.OPEN
                assert breaker.failures == 3
            finally:
                server.thaw()

            ticker.advance(COOLDOWN)
            shared = await policy.check_rate_limit("u")
            assert not shared.degraded
            assert breaker.state is BreakerState.CLOSED
            (event,) = await unavailable_events(policy)
            assert event.metadata["degraded_decisions"] == 6


@pytest.mark.parametrize("mode", ["WRITE", "ALL"])
@bounded
async def test_client_pause_is_decided_by_fail_mode(clock, mode):
    """CLIENT PAUSE: decisions fall back within the deadline, the paused
    calls are dropped rather than applied late, and sharing resumes."""
    ticker = Clock(start=500.0)
    pause_ms = 10_000 if mode == "WRITE" else 1500
    with RedisServer() as server:
        async with build(server.url, clock, ticker) as policy:
            assert (await policy.check_rate_limit("u")).remaining == 19
            admin = server.client()
            admin.execute_command("CLIENT", "PAUSE", pause_ms, mode)
            try:
                rate = await policy.check_rate_limit("u")
                start = await policy.check_can_start_service("u", "s")
                assert (rate.degraded, start.degraded) == (True, True)
                assert not start.allowed
            finally:
                if mode == "WRITE":
                    admin.execute_command("CLIENT", "UNPAUSE")
                else:
                    # UNPAUSE is paused too: wait until the pause runs out.
                    server.wait_ready(timeout=10)
                admin.close()

            ticker.advance(COOLDOWN)
            shared = await policy.check_rate_limit("u")
            assert (shared.degraded, shared.remaining) == (False, 18)
            state = await policy.get_user_state("u")
            assert (state.running, state.started_last_hour) == (0, 0)
            assert len(await unavailable_events(policy)) == 1


# -- lost scripts, full memory ------------------------------------------------


@bounded
async def test_script_flush_is_recovered_without_counting_twice(clock):
    """After SCRIPT FLUSH every call reloads its script and is counted once;
    Redis never looked unavailable."""
    ticker = Clock(start=500.0)
    with RedisServer() as server:
        async with build(server.url, clock, ticker) as policy:
            admin = server.client()
            try:
                assert (await policy.check_rate_limit("u")).remaining == 19
                admin.script_flush()
                second = await policy.check_rate_limit("u")
                assert (second.degraded, second.remaining) == (False, 18)
                admin.script_flush()
                granted = await policy.check_can_start_service("u", "s")
                assert granted.allowed and not granted.degraded
                admin.script_flush()
                (renewed,) = await policy.renew_leases()
                assert renewed.status == "ok"
            finally:
                admin.close()
            state = await policy.get_user_state("u")
            assert (state.tokens, state.running, state.started_last_hour) == (
                18, 1, 1
            )
            assert policy.resilience.breaker.failures == 0
            assert await unavailable_events(policy) == []


@bounded
async def test_out_of_memory_writes_all_or_nothing(clock):
    """Under maxmemory with noeviction every script is refused at its first
    write, before which it has changed nothing, and its decision follows
    the fail mode. Refusals open the breaker; lifting the limit closes it."""
    ticker = Clock(start=500.0)
    with RedisServer() as server:
        async with build(
            server.url, clock, ticker, breaker_threshold=3
        ) as policy:
            await policy.set_user_profile(UserProfile(user_id="u"))
            assert (await policy.check_can_start_service("u", "s1")).allowed
            await policy.check_rate_limit("u")
            admin = server.client()
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            try:
                # Every script checks before its first write, so a full
                # Redis refuses each one whole and the fail mode decides.
                before = snapshot(server)
                rate = await policy.check_rate_limit("u")
                assert rate.degraded
                fresh = await policy.check_can_start_service("u", "s2")
                assert (fresh.allowed, fresh.degraded) == (False, True)
                again = await policy.check_can_start_service("u", "s1")
                assert (again.allowed, again.degraded) == (False, True)
                with pytest.raises(RedisUnavailableError):
                    await policy.renew_leases()
                with pytest.raises(RedisUnavailableError):
                    await policy.block_user("u", "x")
                assert policy.resilience.breaker.state is BreakerState.OPEN
                assert (await policy.check_rate_limit("u")).degraded
                assert snapshot(server) == before
            finally:
                admin.config_set("maxmemory", 0)
                admin.close()

            ticker.advance(COOLDOWN)
            shared = await policy.check_rate_limit("u")
            assert (shared.degraded, shared.remaining) == (False, 18)
            (event,) = await unavailable_events(policy)
            assert event.metadata["degraded_decisions"] == 4
            assert "OutOfMemoryError" in event.metadata["last_error"]


# -- retries ------------------------------------------------------------------


@pytest.fixture
def dropper() -> Iterator[tuple[RedisServer, ReplyDropper]]:
    """A private redis-server behind a ReplyDropper."""
    with RedisServer() as server:
        with ReplyDropper(server.port) as proxy:
            yield server, proxy


@bounded
async def test_a_lost_debit_reply_is_never_sent_again(clock, dropper):
    """The debit ran but its reply was lost: it is not sent twice; the fail
    mode decides it, and the bucket is debited once."""
    _, proxy = dropper
    async with build(
        f"redis://{HOST}:{proxy.port}/0", clock, Clock(start=500.0), timeout=2.0
    ) as policy:
        assert (await policy.check_rate_limit("u")).remaining == 19
        proxy.armed = True
        lost = await policy.check_rate_limit("u", cost=5)
        assert proxy.dropped == 1
        assert (lost.allowed, lost.degraded) == (True, True)
        assert (await policy.get_user_state("u")).tokens == 14
        assert (await policy.check_rate_limit("u")).remaining == 13


@bounded
async def test_a_lost_start_reply_reserves_one_slot(clock, dropper):
    """The start ran but its reply was lost: the retry finds the slot held
    ('running'), so one lease, one start and one start token are used."""
    _, proxy = dropper
    async with build(
        f"redis://{HOST}:{proxy.port}/0", clock, Clock(start=500.0), timeout=2.0
    ) as policy:
        # Another user's start loads the script, so the lost reply is the
        # script's answer and not NOSCRIPT.
        assert (await policy.check_can_start_service("w", "s1")).allowed
        proxy.armed = True
        granted = await policy.check_can_start_service("u", "s1")
        assert proxy.dropped == 1
        assert (granted.allowed, granted.already_running) == (True, True)
        state = await policy.get_user_state("u")
        assert (state.running, state.started_last_hour) == (1, 1)
        assert state.leases[0].fence == granted.fence
        assert state.start_tokens == 9
        assert policy.held_leases()["u"]["s1"].fence == granted.fence


@bounded
async def test_the_sync_guard_resends_only_replayable_calls(clock, dropper):
    """After a lost reply the blocking sender sends a read again on a new
    connection, but never a debit, which ran once."""
    _, proxy = dropper
    rules = _core.Rules(
        keys=KeySpace("sync"),
        default_tier=UserTier.FREE,
        lease_ms=30_000,
        start_burst=10,
        start_per_minute=60.0,
        clock=clock,
    )
    client = redis.Redis(
        host=HOST,
        port=proxy.port,
        protocol=3,
        **client_options(2.0, asynchronous=False),
    )
    resilience = Resilience(rules)
    guard = SyncGuard(client, resilience, lambda event: None)

    def debit() -> int:
        call = _core.rate_limit_call(rules, "u", 1)
        return _core.parse_rate_limit("u", guard.run(call)).remaining

    def tokens() -> float:
        reply = guard.run(_core.inspect_call(rules, "u"))
        return _core.parse_inspect("u", reply).tokens

    try:
        assert await asyncio.to_thread(debit) == 19
        proxy.armed = True
        with pytest.raises(RedisUnavailableError):
            await asyncio.to_thread(debit)
        assert proxy.dropped == 1
        proxy.armed = True
        assert await asyncio.to_thread(tokens) == 18
        assert proxy.dropped == 2
        assert await asyncio.to_thread(debit) == 17
    finally:
        client.close()


# -- failover -----------------------------------------------------------------


@bounded
async def test_sentinel_failover_is_followed(clock):
    """Built from Sentinel, the policy degrades while the primary is gone
    and decides on the promoted replica once Sentinel names it."""
    ticker = Clock(start=500.0)
    with LocalSentinel() as setup:
        policy = SecurityPolicy.from_sentinel(
            setup.sentinels,
            setup.service_name,
            clock=clock,
            monotonic=ticker,
            timeout=0.5,
            breaker_cooldown=COOLDOWN,
            cpu_threshold=None,
            memory_threshold=None,
        )
        async with policy:
            assert not (await policy.check_rate_limit("u")).degraded
            setup.kill_primary()
            assert (await policy.check_rate_limit("u")).degraded

            host, port = await asyncio.to_thread(setup.wait_for_new_primary)
            for _ in range(20):
                ticker.advance(COOLDOWN)
                result = await policy.check_rate_limit("v")
                if not result.degraded:
                    break
                await asyncio.sleep(0.2)
            assert not result.degraded

            (promoted,) = [
                s for s in (setup.primary, setup.replica) if s.port == port
            ]
            with promoted.probe() as client:
                assert client.exists(policy.keys.user("v").requests) == 1
            assert len(await unavailable_events(policy)) == 1


@bounded
async def test_sentinel_options_are_checked():
    """A malformed sentinel list is refused before anything connects."""
    with pytest.raises(ValueError):
        SecurityPolicy.from_sentinel([("localhost", "26379")], "mymaster")
    with pytest.raises(ValueError):
        SecurityPolicy.from_sentinel([], "mymaster")
    with pytest.raises(ValueError):
        SecurityPolicy.from_sentinel([(HOST, free_port())], "")
