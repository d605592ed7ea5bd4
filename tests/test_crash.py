"""Clocks, lost scripts, crashes, stalls and lost keys.

The replica-level faults: a replica whose own clock is wrong, a server
that forgets its scripts, a replica killed while holding slots, a replica
that stalls past its leases, and a server that loses a user's keys. The
decisions stay those of one shared, exact policy; fencing tokens tell an
old holder from a new one.

Tests that start processes run on the session's real redis-server; the
others run on both backends with the test clock.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any, Optional

import pytest
import redis.asyncio as aredis

from pactown_redis import (
    AnomalyType,
    LeaseLostError,
    SecurityPolicy,
    UserProfile,
    UserTier,
)
from pactown_redis import _core
from pactown_redis._core import HeldLease

USER = "tenant"
LEASE_S = 30.0
PROCESS_TIMEOUT_S = 20.0

# No overload check, and a deadline no busy machine reaches: every decision
# is the shared one, never a degraded local one.
SHARED_ONLY: dict[str, Any] = dict(
    cpu_threshold=None, memory_threshold=None, timeout=PROCESS_TIMEOUT_S
)


def _profile(**limits: int) -> UserProfile:
    base = UserProfile.from_tier(USER, UserTier.BASIC).model_dump()
    return UserProfile.parse({**base, **limits})


async def _server_us(client: aredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def _stale_renewal(
    policy: SecurityPolicy, client: Any, leases: dict[str, HeldLease]
) -> list[str]:
    """Send the renewal a holder would send for ``leases`` (as a renewer
    racing a release would), and return the statuses."""
    call = _core.renew_call(policy.rules, USER, leases)
    reply = await client.eval(*call.eval_args())
    return [o.status for o in _core.parse_renew(list(leases), reply)]


# -- worker processes ------------------------------------------------------------


async def skewed_replica(config: dict) -> dict:
    """Run a fixed sequence of decisions for ``USER`` and return them."""
    policy = SecurityPolicy(
        config["url"], namespace=config["namespace"], **SHARED_ONLY
    )
    try:
        requests = []
        for _ in range(8):
            result = await policy.check_rate_limit(USER)
            requests.append([result.allowed, result.remaining])
        starts = []
        for service in ("b", "c"):
            result = await policy.check_can_start_service(USER, service)
            starts.append([result.allowed, result.reason])
        renewed = [o.status for o in await policy.renew_leases()]
        running = await policy.get_user_service_count(USER)
        return {
            "process_clock": time.time(),
            "requests": requests,
            "starts": starts,
            "renewed": renewed,
            "running": running,
        }
    finally:
        await policy.close()


async def holder(config: dict) -> None:
    """Start services, report their fences, then keep renewing forever."""
    policy = SecurityPolicy(
        config["url"],
        namespace=config["namespace"],
        lease_ttl=config["lease_ttl"],
        **SHARED_ONLY,
    )
    fences = {}
    for service in config["services"]:
        result = await policy.check_can_start_service(USER, service)
        assert result.allowed, result.reason
        fences[service] = result.fence
    print(json.dumps(fences), flush=True)
    await asyncio.Event().wait()


def _worker_main(config: dict) -> None:
    if config["role"] == "holder":
        asyncio.run(holder(config))
        return
    import time_machine

    with time_machine.travel(timedelta(seconds=config["skew"]), tick=True):
        print(json.dumps(asyncio.run(skewed_replica(config))))


def _spawn(config: dict) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def make_shared(make_policy):
    """``make_policy`` for policies whose decisions are all shared ones."""
    return functools.partial(make_policy, timeout=PROCESS_TIMEOUT_S)


@pytest.fixture
async def real(redis_server):
    """A client of the session's redis-server, emptied first."""
    client = aredis.from_url(redis_server.url, protocol=3)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


# -- a replica with a wrong clock ---------------------------------------------------


@pytest.mark.slow
async def test_replica_with_skewed_clock_decides_like_the_others(
    real, redis_server
):
    """A replica an hour fast or slow grants no extra token and frees no
    one's slot: its decisions equal a correct replica's."""
    namespace = "skew"
    admin = SecurityPolicy(real, namespace=namespace, **SHARED_ONLY)
    decisions = {}
    for skew in (0, 3600, -3600):
        await real.delete(*admin.keys.user(USER).all())
        await admin.set_user_profile(
            _profile(max_concurrent_services=2, max_requests_per_minute=6)
        )
        first = await admin.check_can_start_service(USER, f"a{skew}")
        assert first.allowed

        proc = _spawn(
            dict(role="skewed", skew=skew, url=redis_server.url,
                 namespace=namespace)
        )
        out, err = await asyncio.to_thread(
            proc.communicate, timeout=PROCESS_TIMEOUT_S
        )
        assert proc.returncode == 0, err
        seen = json.loads(out)
        assert abs(seen.pop("process_clock") - time.time() - skew) < 60
        decisions[skew] = seen

        assert not (await admin.check_rate_limit(USER)).allowed
        assert await admin.register_service(USER, f"a{skew}") == first.fence
        assert await admin.get_user_service_count(USER) == 2
        assert await admin.unregister_service(USER, f"a{skew}")

    assert decisions[3600] == decisions[0] == decisions[-3600]
    assert decisions[0] == {
        "requests": [[True, n] for n in (5, 4, 3, 2, 1, 0)]
        + [[False, 0], [False, 0]],
        "starts": [
            [True, None],
            [False, "Max concurrent services reached (2/2). "
                    "Stop a service first."],
        ],
        "renewed": ["ok"],
        "running": 2,
    }
    await admin.close()


# -- a lost script cache -------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 2, 3, 7])
async def test_script_flush_between_decisions(make_shared, redis_client, every):
    """Flushing the script cache between decisions changes no count."""
    policy = make_shared()
    await policy.set_user_profile(_profile(max_services_per_hour=7))
    allowed = starts = 0
    for i in range(140):
        if i % every == 0:
            await redis_client.script_flush()
        if i % 2:
            allowed += (await policy.check_rate_limit(USER)).allowed
        else:
            result = await policy.check_can_start_service(USER, f"s{i}")
            starts += result.allowed
            await policy.unregister_service(USER, f"s{i}")
    state = await policy.get_user_state(USER)
    assert allowed == 60
    assert state.tokens == 0
    assert starts == 7
    assert state.started_last_hour == 7


async def test_script_flush_during_concurrent_decisions(
    make_shared, redis_client
):
    """Decisions racing a loop of SCRIPT FLUSH are each applied once."""
    policies = [
        make_shared(start_burst=100)
        for _ in range(3)
    ]
    await policies[0].set_user_profile(
        _profile(max_concurrent_services=100, max_services_per_hour=9)
    )
    done = asyncio.Event()

    async def flusher() -> int:
        flushes = 0
        while not done.is_set():
            await redis_client.script_flush()
            flushes += 1
            await asyncio.sleep(0)
        return flushes

    # Fewer calls in flight than the client's pool has connections.
    in_flight = asyncio.Semaphore(32)

    async def bounded(decision: Any) -> Any:
        async with in_flight:
            return await decision

    flushing = asyncio.ensure_future(flusher())
    decisions = [
        p.check_rate_limit(USER, 1.5) for p in policies for _ in range(30)
    ] + [
        p.check_can_start_service(USER, f"s{i}-{n}")
        for n, p in enumerate(policies)
        for i in range(6)
    ]
    results = await asyncio.gather(*map(bounded, decisions))
    done.set()
    assert not any(r.degraded for r in results)
    assert await flushing > 0

    requests, starts = results[:90], results[90:]
    assert sum(r.allowed for r in requests) == 40
    assert sum(r.allowed for r in starts) == 9
    state = await policies[0].get_user_state(USER)
    assert (state.tokens, state.started_last_hour, state.running) == (0, 9, 9)


# -- a replica killed while holding slots ----------------------------------------


@pytest.mark.slow
async def test_killed_replica_frees_its_slots_at_lease_expiry(
    real, redis_server
):
    """After kill -9, the dead replica's slots stay taken until their
    leases run out by Redis time, and are free right after."""
    namespace = "crash"
    lease_ttl = 1.0
    services = ["dead-1", "dead-2"]
    policy = SecurityPolicy(
        real, namespace=namespace, lease_ttl=lease_ttl, **SHARED_ONLY
    )
    await policy.set_user_profile(_profile(max_concurrent_services=2))
    proc = _spawn(
        dict(role="holder", url=redis_server.url, namespace=namespace,
             lease_ttl=lease_ttl, services=services)
    )
    try:
        line = await asyncio.wait_for(
            asyncio.to_thread(proc.stdout.readline), PROCESS_TIMEOUT_S
        )
        assert line, proc.stderr.read()
        fences = json.loads(line)
        # Let its renewer run at least once before the crash.
        await asyncio.sleep(lease_ttl / 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_ms = await _server_us(real) // 1000

    keys = policy.keys.user(USER)
    expiry = {
        member.decode(): score
        for member, score in await real.zrange(keys.leases, 0, -1,
                                               withscores=True)
    }
    assert set(expiry) == set(services)
    assert all(killed_ms < e <= killed_ms + lease_ttl * 1000 for e in expiry.values())
    first_free = min(expiry.values())

    held_near_expiry = False
    granted_fence: Optional[int] = None
    deadline = time.monotonic() + 5 * lease_ttl
    while granted_fence is None:
        assert time.monotonic() < deadline, "the dead replica's slots never freed"
        async with real.pipeline(transaction=True) as pipe:
            pipe.time()
            pipe.zrange(keys.leases, 0, -1, withscores=True)
            (seconds, micros), raw = await pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        if now_ms < first_free:
            assert {m.decode(): s for m, s in raw} == expiry
            held_near_expiry |= now_ms >= first_free - 300
        result = await policy.check_can_start_service(USER, "new")
        if result.allowed:
            granted_fence = result.fence
        else:
            await asyncio.sleep(0.01)

    assert held_near_expiry
    # The slot went to the new start only once a lease had run out.
    assert granted_fence >= first_free * 1000
    assert all(f < granted_fence for f in fences.values())
    await asyncio.sleep(max(0.0, (max(expiry.values()) - first_free) / 1000))
    assert (await policy.check_can_start_service(USER, "new-2")).allowed
    assert await policy.get_user_service_count(USER) == 2
    await policy.close()


# -- a replica that stalls past its leases ----------------------------------------


@pytest.mark.parametrize("how", ["register", "renew"])
async def test_stalled_replica_learns_its_lease_was_lost(make_shared, clock, how):
    """After a stall past expiry and a takeover, the next renewal reports
    the loss: LeaseLostError, LEASE_LOST anomaly, on_lease_lost, dropped."""
    calls = []
    stalled = make_shared(
        lease_ttl=LEASE_S, on_lease_lost=lambda u, s: calls.append((u, s))
    )
    other = make_shared(lease_ttl=LEASE_S)
    await stalled.set_user_profile(_profile(max_concurrent_services=1))
    old = await stalled.check_can_start_service(USER, "svc")
    assert old.allowed

    clock.advance(LEASE_S + 1)
    new = await other.check_can_start_service(USER, "svc")
    assert new.allowed and not new.already_running
    assert new.fence > old.fence

    if how == "register":
        with pytest.raises(LeaseLostError):
            await stalled.register_service(USER, "svc")
    else:
        outcomes = await stalled.renew_leases()
        assert [(o.service_id, o.status) for o in outcomes] == [("svc", "lost")]
    assert stalled.held_leases() == {}
    assert calls == [(USER, "svc")]
    lost = await stalled.anomalies.by_type(AnomalyType.LEASE_LOST)
    assert [(e.user_id, e.service_id) for e in lost] == [(USER, "svc")]
    # The stale holder cannot free the new holder's slot.
    assert not await stalled.unregister_service(USER, "svc")
    assert await other.register_service(USER, "svc") == new.fence
    assert await other.get_user_service_count(USER) == 1


# -- fencing tokens ------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(["start a", "stop a", "start a"], id="release"),
        pytest.param(["start a", "expire", "start a"], id="expiry"),
        pytest.param(
            ["start a", "stop a", "forget-counter", "start a"],
            id="counter-expired",
        ),
        pytest.param(["start a", "back", "start b"], id="step-back-live"),
        pytest.param(
            ["start a", "stop a", "back", "start a"], id="step-back-released"
        ),
        pytest.param(
            ["start a", "expire", "start b", "back", "start a"],
            id="step-back-expired",
        ),
        pytest.param(
            ["start a", "lose-keys", "renew", "back", "start b"],
            id="restored-then-step-back",
        ),
        pytest.param(
            ["start a", "start b", "start c", "stop b", "start b"],
            id="same-instant",
        ),
    ],
)
async def test_fences_only_grow(make_shared, redis_client, clock, steps):
    """Each new lease of a user gets a larger fence than every earlier one."""
    # A start bucket that a 600 s step back leaves far from empty.
    policy = make_shared(lease_ttl=LEASE_S, start_burst=10_000)
    await policy.set_user_profile(_profile(max_concurrent_services=3))
    keys = policy.keys.user(USER)
    fences = []
    for step in steps:
        verb, _, service = step.partition(" ")
        if verb == "start":
            result = await policy.check_can_start_service(USER, service)
            assert result.allowed and not result.already_running, step
            fences.append(result.fence)
        elif verb == "stop":
            assert await policy.unregister_service(USER, service)
        elif verb == "expire":
            clock.advance(LEASE_S + 1)
        elif verb == "forget-counter":
            # What the counter's TTL does a grace period after the last lease.
            clock.advance(LEASE_S + 3600 + 1)
            await redis_client.delete(keys.fence)
        elif verb == "back":
            clock.advance(-600)
        elif verb == "lose-keys":
            await redis_client.delete(*keys.all())
        elif verb == "renew":
            outcomes = await policy.renew_leases()
            assert {o.status for o in outcomes} == {"restored"}
    assert fences == sorted(set(fences)), fences


# -- Redis losing a user's keys ------------------------------------------------------


@pytest.mark.parametrize("loss", ["del", "flushall"])
async def test_lost_keys_are_restored_by_the_holder(
    make_shared, redis_client, clock, loss
):
    """A holder's next renewal restores the leases Redis lost, the count is
    right again, and a stale renewal after a release restores nothing."""
    policy = make_shared(lease_ttl=LEASE_S)
    await policy.set_user_profile(_profile(max_concurrent_services=3))
    granted = {}
    for service in ("a", "b"):
        granted[service] = (
            await policy.check_can_start_service(USER, service, memory_mb=64)
        ).fence
        clock.advance(1)
    if loss == "del":
        await redis_client.delete(*policy.keys.user(USER).all())
    else:
        await redis_client.flushall()
    assert await policy.get_user_service_count(USER) == 0

    clock.advance(LEASE_S / 2)
    outcomes = await policy.renew_leases()
    assert [(o.service_id, o.status, o.fence) for o in outcomes] == [
        ("a", "restored", granted["a"]),
        ("b", "restored", granted["b"]),
    ]
    state = await policy.get_user_state(USER)
    assert [(x.service_id, x.fence, x.memory_mb) for x in state.leases] == [
        ("a", granted["a"], 64.0),
        ("b", granted["b"], 64.0),
    ]
    assert [o.status for o in await policy.renew_leases()] == ["ok", "ok"]

    stale = policy.held_leases()[USER]["a"]
    assert await policy.unregister_service(USER, "a")
    assert await _stale_renewal(policy, redis_client, {"a": stale}) == ["lost"]
    assert await policy.get_user_service_count(USER) == 1


async def test_lost_keys_after_an_expiry_are_not_restored(
    make_shared, redis_client, clock
):
    """A lease whose time ran out is lost, not restored, after a key loss."""
    policy = make_shared(lease_ttl=LEASE_S)
    assert (await policy.check_can_start_service(USER, "a")).allowed
    await redis_client.delete(*policy.keys.user(USER).all())
    clock.advance(LEASE_S + 1)
    outcomes = await policy.renew_leases()
    assert [o.status for o in outcomes] == ["lost"]
    assert await policy.get_user_service_count(USER) == 0


async def test_restore_on_a_server_whose_clock_lags(
    make_shared, redis_client, clock
):
    """After a loss on a server whose clock is behind the fences, every
    lease of the holder's renewal is restored, not only the first."""
    policy = make_shared(lease_ttl=LEASE_S)
    await policy.set_user_profile(_profile(max_concurrent_services=4))
    fences = [
        (await policy.check_can_start_service(USER, s)).fence
        for s in ("a", "b", "c")
    ]
    keys = policy.keys.user(USER)
    await redis_client.delete(*(k for k in keys.all() if k != keys.profile))
    clock.advance(-2)
    outcomes = await policy.renew_leases()
    assert [(o.status, o.fence) for o in outcomes] == [
        ("restored", f) for f in fences
    ]
    assert await policy.get_user_service_count(USER) == 3
    assert (await policy.check_can_start_service(USER, "d")).fence > max(fences)


async def test_released_lease_stays_released_after_restore_and_step_back(
    make_shared, redis_client, clock
):
    """A lease started after a restore and a clock step back, then
    released, is not brought back by a stale renewal."""
    policy = make_shared(lease_ttl=LEASE_S)
    await policy.set_user_profile(_profile(max_concurrent_services=3))
    assert (await policy.check_can_start_service(USER, "a")).allowed
    await redis_client.delete(*policy.keys.user(USER).all())
    clock.advance(5)
    assert [o.status for o in await policy.renew_leases()] == ["restored"]

    clock.advance(-10)
    assert (await policy.check_can_start_service(USER, "b")).allowed
    stale = policy.held_leases()[USER]["b"]
    assert await policy.unregister_service(USER, "b")
    assert await _stale_renewal(policy, redis_client, {"b": stale}) == ["lost"]
    assert await policy.get_user_service_count(USER) == 1


if __name__ == "__main__":
    _worker_main(json.loads(sys.argv[1]))
