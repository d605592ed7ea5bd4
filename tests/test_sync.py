"""The blocking policy: the async policy's behaviour on the sync client.

Runs on the same backend matrix as the async tests (fakeredis and a real
redis-server), with the same controlled clock.
"""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any, Callable, Iterator

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pactown_redis import (
    TIER_LIMITS,
    AnomalyType,
    BackendError,
    CorruptProfileError,
    InvalidInputError,
    LeaseLostError,
    LoadSample,
    SecurityPolicy,
    Severity,
    SyncSecurityPolicy,
    UserProfile,
    UserTier,
)
from servers import free_port


class Backend:
    """Makes sync and async clients of one Redis of the backend under test."""

    def __init__(self, name: str, url: str = "") -> None:
        self.name = name
        self.url = url
        self.server = fakeredis.FakeServer() if name == "fake" else None

    def sync_client(self) -> Any:
        if self.server is not None:
            return fakeredis.FakeRedis(server=self.server, protocol=3)
        return redis.Redis.from_url(self.url, protocol=3)

    def async_client(self) -> Any:
        if self.server is not None:
            return fakeredis.FakeAsyncRedis(server=self.server, protocol=3)
        return redis.asyncio.Redis.from_url(self.url, protocol=3)


@pytest.fixture
def redis_backend(backend: str, request: pytest.FixtureRequest) -> Backend:
    """An empty Redis of the backend under test."""
    if backend == "fake":
        return Backend("fake")
    url = request.getfixturevalue("redis_server").url
    with redis.Redis.from_url(url) as client:
        client.flushall()
    return Backend("real", url)


@pytest.fixture
def sync_client(redis_backend: Backend) -> Iterator[Any]:
    """A sync client of the backend under test."""
    client = redis_backend.sync_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def make_sync(
    sync_client: Any, clock: Callable[[], float]
) -> Iterator[Callable[..., SyncSecurityPolicy]]:
    """Build sync policies on the backend under test, closed at the end.

    Overload checks and the renewal thread are off unless a test asks.
    """
    made: list[SyncSecurityPolicy] = []

    def build(**options: Any) -> SyncSecurityPolicy:
        options.setdefault("clock", clock)
        options.setdefault("cpu_threshold", None)
        options.setdefault("memory_threshold", None)
        options.setdefault("auto_renew", False)
        policy = SyncSecurityPolicy(sync_client, **options)
        made.append(policy)
        return policy

    yield build
    for policy in made:
        policy.close()


@pytest.fixture
def sync_policy(make_sync: Callable[..., SyncSecurityPolicy]) -> SyncSecurityPolicy:
    """A sync policy with default options on the backend under test."""
    return make_sync()


def start(policy: SyncSecurityPolicy, service: str, user: str = "u", **kw: Any):
    return policy.check_can_start_service(user, service, **kw)


# -- request rate ------------------------------------------------------------


@pytest.mark.parametrize("tier", list(UserTier))
def test_each_tier_allows_its_burst_then_denies(sync_policy, tier):
    """A fresh bucket allows exactly max_requests_per_minute requests."""
    sync_policy.set_user_profile(UserProfile.from_tier("u", tier))
    limit = TIER_LIMITS[tier]["max_requests_per_minute"]
    for i in range(limit):
        result = sync_policy.check_rate_limit("u")
        assert result.allowed, i
        assert (result.remaining, result.limit) == (limit - i - 1, limit)
    denied = sync_policy.check_rate_limit("u")
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(60 / limit)


def test_refill_follows_the_clock(sync_policy, clock):
    """Tokens come back at rpm/60 per second, never past the capacity."""
    for _ in range(20):
        sync_policy.check_rate_limit("u")
    clock.advance(2.9)
    assert not sync_policy.check_rate_limit("u").allowed
    clock.advance(0.1)
    assert sync_policy.check_rate_limit("u").allowed
    clock.advance(3600)
    result = sync_policy.check_rate_limit("u")
    assert result.remaining == 19
    assert result.reset_after == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("cost", "allowed", "remaining"),
    [(1, True, 19), (0.5, True, 19), (20, True, 0), (21, False, 20)],
)
def test_costs(sync_policy, cost, allowed, remaining):
    """A cost debits that many tokens; more than the capacity never fits."""
    result = sync_policy.check_rate_limit("u", cost=cost)
    assert (result.allowed, result.remaining) == (allowed, remaining)
    assert math.isinf(result.retry_after) is (cost > 20)


def test_denial_is_in_the_stream_when_the_call_returns(sync_policy, sync_client):
    """A denied request's anomaly is appended before the call returns."""
    for _ in range(21):
        sync_policy.check_rate_limit("u")
    (entry_id, fields), = sync_client.xrange(sync_policy.keys.anomalies)
    assert fields[b"type"] == b"rate_limit_exceeded"
    (event,) = sync_policy.anomalies.by_user("u")
    assert event.anomaly_type is AnomalyType.RATE_LIMIT_EXCEEDED


# -- service starts ----------------------------------------------------------


def _block(policy):
    policy.block_user("u", "abuse")


def _fill_slots(policy):
    start(policy, "a")
    start(policy, "b")


def _use_the_hour(policy):
    for name in "abcde":
        start(policy, name)
        policy.unregister_service("u", name)


def _ports_80(policy):
    profile = UserProfile.from_tier("u", UserTier.FREE)
    profile.allowed_ports = [80]
    policy.set_user_profile(profile)


def _admin_burst(policy):
    policy.set_user_profile(UserProfile.from_tier("u", UserTier.ADMIN))
    for i in range(10):
        start(policy, f"s{i}")


@pytest.mark.parametrize(
    ("prepare", "asked", "reason", "anomaly"),
    [
        (_block, {}, "User blocked: abuse", AnomalyType.UNAUTHORIZED_ACCESS),
        (
            _admin_burst,
            {},
            "Rate limit exceeded. Wait 1.0s",
            AnomalyType.RATE_LIMIT_EXCEEDED,
        ),
        (
            _fill_slots,
            {},
            "Max concurrent services reached (2/2). Stop a service first.",
            AnomalyType.CONCURRENT_LIMIT_EXCEEDED,
        ),
        (
            _use_the_hour,
            {},
            "Hourly service limit reached (5/5). Try again later.",
            AnomalyType.HOURLY_LIMIT_EXCEEDED,
        ),
        (
            _ports_80,
            {"port": 22},
            "Port 22 not allowed for your account",
            AnomalyType.UNAUTHORIZED_ACCESS,
        ),
        (
            None,
            {"memory_mb": 300},
            "Memory limit exceeded (0 + 300 > 256 MB). Stop a service first.",
            AnomalyType.MEMORY_LIMIT_EXCEEDED,
        ),
        (
            None,
            {"cpu_percent": 25.5},
            "CPU limit exceeded (0 + 25.5 > 25%). Stop a service first.",
            AnomalyType.CPU_LIMIT_EXCEEDED,
        ),
    ],
)
def test_start_denials(sync_policy, prepare, asked, reason, anomaly):
    """Each failed check denies with its reason and records its anomaly."""
    if prepare is not None:
        prepare(sync_policy)
    result = start(sync_policy, "new", **asked)
    assert not result.allowed and result.fence is None
    assert result.reason == reason
    assert result.anomaly.anomaly_type is anomaly
    assert sync_policy.anomalies.recent(count=1) == [result.anomaly]


def test_start_grants_a_lease_with_a_fence(sync_policy):
    """An allowed start holds a lease this policy knows, with its fence."""
    result = start(sync_policy, "a", port=8080, memory_mb=64, cpu_percent=5)
    assert result.allowed and result.reason is None and result.anomaly is None
    held = sync_policy.held_leases()["u"]["a"]
    assert (held.fence, held.memory_mb, held.cpu_percent) == (result.fence, 64, 5)
    (lease,) = sync_policy.get_user_state("u").leases
    assert (lease.service_id, lease.fence) == ("a", result.fence)


@pytest.mark.parametrize(
    ("tier", "allowed"), [(UserTier.FREE, False), (UserTier.PRO, True)]
)
def test_overload_denies_free_and_delays_paid(make_sync, tier, allowed):
    """Over a threshold, the default tier is refused and others delayed."""
    policy = make_sync(
        cpu_threshold=80.0,
        memory_threshold=85.0,
        load_probe=lambda: LoadSample(cpu_percent=95.0, memory_percent=10.0),
    )
    policy.set_user_profile(UserProfile.from_tier("u", tier))
    result = start(policy, "a")
    assert result.allowed is allowed
    assert result.anomaly.anomaly_type is AnomalyType.SERVER_OVERLOADED
    assert (result.delay_seconds > 0) is allowed


def test_starting_a_running_service_reserves_nothing_twice(sync_policy):
    """The same service id twice holds one slot and one hourly start."""
    first = start(sync_policy, "a")
    again = start(sync_policy, "a")
    assert again.allowed and again.already_running
    assert again.fence == first.fence
    assert sync_policy.get_user_service_count("u") == 1
    assert sync_policy.get_services_started_last_hour("u") == 1


def test_rapid_restart_is_logged_but_allowed(sync_policy):
    """The fifth start within a minute is allowed and logged."""
    sync_policy.set_user_profile(UserProfile.from_tier("u", UserTier.PRO))
    results = []
    for i in range(5):
        results.append(start(sync_policy, f"s{i}"))
        sync_policy.unregister_service("u", f"s{i}")
    assert all(r.allowed for r in results)
    assert results[-1].anomaly.anomaly_type is AnomalyType.RAPID_RESTART
    assert all(r.anomaly is None for r in results[:-1])


# -- leases --------------------------------------------------------------------


def test_leases_expire_via_the_clock(make_sync, clock):
    """A dead replica's slots come back after lease_ttl, not before."""
    dead, other = make_sync(lease_ttl=30), make_sync(lease_ttl=30)
    start(dead, "a")
    start(dead, "b")
    clock.advance(29.9)
    assert not start(other, "c").allowed
    clock.advance(0.2)
    assert start(other, "c").allowed
    assert other.get_user_service_count("u") == 1


def test_renew_leases_keeps_slots(make_sync, clock):
    """Renewing every lease_ttl / 3 keeps a slot for as long as needed."""
    holder, other = make_sync(lease_ttl=30), make_sync(lease_ttl=30)
    start(holder, "a")
    start(holder, "b")
    for _ in range(10):
        clock.advance(10)
        assert {o.status for o in holder.renew_leases()} == {"ok"}
    assert not start(other, "c").allowed


def test_expired_lease_is_reported_lost(make_sync, clock):
    """A renewal after expiry drops the lease, logs it and calls back."""
    lost = []
    policy = make_sync(lease_ttl=30, on_lease_lost=lambda u, s: lost.append((u, s)))
    start(policy, "a")
    clock.advance(31)
    (outcome,) = policy.renew_leases()
    assert outcome.status == "lost"
    assert lost == [("u", "a")]
    assert policy.held_leases() == {}
    (event,) = policy.anomalies.by_type(AnomalyType.LEASE_LOST)
    assert (event.service_id, event.severity) == ("a", Severity.HIGH)


def test_register_confirms_and_unregister_frees(sync_policy):
    """register_service renews a reserved slot and returns its fence."""
    result = start(sync_policy, "a")
    assert sync_policy.register_service("u", "a") == result.fence
    assert sync_policy.unregister_service("u", "a")
    assert not sync_policy.unregister_service("u", "a")
    with pytest.raises(LeaseLostError):
        sync_policy.register_service("u", "a")


def test_renewal_thread_renews_and_stops_on_close(make_sync, clock):
    """With auto_renew the thread renews every lease_ttl / 3 until close."""
    policy = make_sync(lease_ttl=0.3, auto_renew=True)
    start(policy, "a")
    (renewer,) = [
        t for t in threading.enumerate()
        if t.name == "pactown-redis lease renewer" and t.daemon
        and t is policy._renewer
    ]
    clock.advance(0.25)
    deadline = time.monotonic() + 10
    while policy.get_user_state("u").leases[0].expires_in < 0.29:
        assert time.monotonic() < deadline, "no renewal within 10 s"
        time.sleep(0.02)
    policy.close()
    assert not renewer.is_alive()


def test_without_auto_renew_no_thread_starts(sync_policy):
    """auto_renew=False leaves renewing to the caller."""
    before = set(threading.enumerate())
    start(sync_policy, "a")
    assert set(threading.enumerate()) <= before


# -- profiles and anomalies ----------------------------------------------------


def test_profile_round_trips_and_block_keeps_it(sync_policy):
    """A stored profile reads back; blocking changes only block fields."""
    profile = UserProfile.from_tier("u:1", UserTier.PRO)
    profile.allowed_ports = [443, 80]
    sync_policy.set_user_profile(profile)
    assert sync_policy.get_user_profile("u:1") == profile
    sync_policy.block_user("u:1", "chargeback")
    blocked = sync_policy.get_user_profile("u:1")
    assert (blocked.tier, blocked.blocked, blocked.reason) == (
        UserTier.PRO, True, "chargeback",
    )
    sync_policy.unblock_user("u:1")
    assert sync_policy.get_user_profile("u:1") == profile
    assert sync_policy.delete_user_profile("u:1")
    assert sync_policy.get_user_profile("u:1").tier is UserTier.FREE


def test_corrupt_profile_fails_closed(sync_policy, sync_client):
    """An unreadable stored profile denies and records PROFILE_CORRUPT."""
    sync_client.hset(sync_policy.keys.user("u").profile, mapping={"rpm": "x"})
    assert not sync_policy.check_rate_limit("u").allowed
    assert not start(sync_policy, "a").allowed
    with pytest.raises(CorruptProfileError):
        sync_policy.get_user_state("u")
    events = sync_policy.anomalies.by_type(AnomalyType.PROFILE_CORRUPT)
    assert len(events) == 2


def test_anomalies_reach_file_and_handler_inline(make_sync, tmp_path):
    """Each anomaly reaches the JSON-lines file and on_anomaly at once."""
    seen = []
    log = tmp_path / "anomalies.jsonl"
    policy = make_sync(anomaly_log_path=log, on_anomaly=seen.append)
    policy.block_user("u", "spam")
    result = start(policy, "s")
    assert seen == [result.anomaly]
    assert json.loads(log.read_text())["anomaly_type"] == "unauthorized_access"


def test_failing_handler_does_not_fail_the_decision(make_sync):
    """A handler that raises is logged; the decision still returns."""
    def handler(event):
        raise RuntimeError("handler bug")

    policy = make_sync(on_anomaly=handler)
    for _ in range(21):
        result = policy.check_rate_limit("u")
    assert not result.allowed
    assert len(policy.anomalies.recent()) == 1


def test_tail_and_read_after_follow_the_stream(sync_policy):
    """tail returns the newest events and read_after what comes next."""
    sync_policy.block_user("u", "x")
    for name in ("a", "b", "c"):
        start(sync_policy, name)
    events, last = sync_policy.anomalies.tail(2)
    assert [e.service_id for e in events] == ["b", "c"]
    assert sync_policy.anomalies.read_after(last, block_ms=10) == ([], last)
    start(sync_policy, "d")
    more, newer = sync_policy.anomalies.read_after(last, block_ms=10)
    assert [e.service_id for e in more] == ["d"] and newer != last


def test_summary_counts_by_type_and_user(sync_policy):
    """The summary totals the period's events."""
    for _ in range(22):
        sync_policy.check_rate_limit("a")
    sync_policy.block_user("b", "x")
    start(sync_policy, "s", user="b")
    summary = sync_policy.get_anomaly_summary(hours=1)
    assert summary["total_anomalies"] == 3
    assert summary["by_type"] == {
        "rate_limit_exceeded": 2,
        "unauthorized_access": 1,
    }
    assert summary["top_users"] == {"a": 2, "b": 1}


def test_lost_script_cache_is_recovered_once(sync_policy, sync_client):
    """After SCRIPT FLUSH a decision runs once, through EVAL."""
    assert sync_policy.check_rate_limit("u", cost=5).remaining == 15
    sync_client.script_flush()
    assert sync_policy.check_rate_limit("u", cost=5).remaining == 10


# -- sharing and input ---------------------------------------------------------


async def test_async_and_sync_policies_share_one_limit(
    redis_backend, make_sync, clock
):
    """A sync and an async replica together allow one bucket and one set
    of slots."""
    sync = make_sync()
    client = redis_backend.async_client()
    other = SecurityPolicy(
        client, clock=clock, cpu_threshold=None, memory_threshold=None
    )
    try:
        allowed = 0
        for _ in range(20):
            allowed += sync.check_rate_limit("u").allowed
            allowed += (await other.check_rate_limit("u")).allowed
        assert allowed == 20
        assert start(sync, "a").allowed
        assert (await other.check_can_start_service("u", "b")).allowed
        assert not start(sync, "c").allowed
        assert not (await other.check_can_start_service("u", "c")).allowed
        assert await other.unregister_service("u", "a")
        assert start(sync, "c").allowed
    finally:
        await other.close()
        await client.aclose()


@pytest.mark.parametrize(
    "call",
    [
        lambda p: p.check_rate_limit("", 1),
        lambda p: p.check_rate_limit("u", 0),
        lambda p: p.check_rate_limit("u", float("nan")),
        lambda p: p.check_rate_limit("u", True),
        lambda p: p.check_rate_limit("x" * 300),
        lambda p: p.check_can_start_service("u", ""),
        lambda p: p.check_can_start_service("u", "s", port=70000),
        lambda p: p.check_can_start_service("u", "s", port=80.5),
        lambda p: p.check_can_start_service("u", "s", memory_mb=-1),
        lambda p: p.check_can_start_service("u", "s", cpu_percent=math.inf),
        lambda p: p.set_user_profile({"user_id": "u"}),
        lambda p: p.block_user("u", 5),
        lambda p: p.register_service("u", ""),
        lambda p: p.unregister_service("", "s"),
        lambda p: p.get_anomaly_summary(hours=0),
        lambda p: p.anomalies.tail(0),
    ],
)
def test_bad_input_raises_before_anything_is_written(
    sync_policy, sync_client, call
):
    """Invalid arguments raise InvalidInputError and write nothing."""
    with pytest.raises(InvalidInputError):
        call(sync_policy)
    assert sync_client.dbsize() == 0


@pytest.mark.parametrize(
    "options",
    [
        {"namespace": "a b"},
        {"lease_ttl": 0},
        {"start_burst": 0},
        {"default_rate_limit": float("inf")},
        {"stream_maxlen": 1.5},
    ],
)
def test_bad_options_are_refused(options):
    """A policy with a bad option is never built, and no client is made."""
    with pytest.raises(InvalidInputError):
        SyncSecurityPolicy("redis://127.0.0.1:1/0", **options)


def test_unreachable_redis_is_a_backend_error():
    """A failed connection surfaces as BackendError, with its cause."""
    client = redis.Redis(
        port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    with SyncSecurityPolicy(client, cpu_threshold=None) as policy:
        with pytest.raises(BackendError) as caught:
            policy.check_rate_limit("u")
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    client.close()


def test_from_url_builds_and_closes_its_client(redis_server):
    """from_url makes its own client and the with-block closes the policy."""
    with SyncSecurityPolicy.from_url(
        redis_server.url, namespace="fromurl", cpu_threshold=None
    ) as policy:
        assert policy.check_rate_limit("u").allowed
        assert repr(policy) == "SyncSecurityPolicy(namespace='fromurl')"
    policy.close()
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.exists(policy.keys.user("u").requests)
