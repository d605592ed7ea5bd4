"""The blocking policy: the async policy's behaviour on the sync client.

Runs on the same backend matrix as the async tests (fakeredis and a real
redis-server), with the same controlled clock. Outages are real on both:
fakeredis refuses every command of a disconnected server, and the real
server holds the policy's scripts with ``CLIENT PAUSE WRITE`` until the
client's socket timeout gives up on them. The breaker and the local
buckets read a second ``Clock``, so cool-downs pass without sleeping.
"""

from __future__ import annotations

import contextlib
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
    RedisUnavailableError,
    SecurityPolicy,
    Severity,
    SyncSecurityPolicy,
    UserProfile,
    UserTier,
)
from pactown_redis.resilience import BreakerState, client_options
from conftest import Clock
from servers import free_port

#: Socket timeout of the clients that live through an outage.
OUTAGE_TIMEOUT = 0.2
COOLDOWN = 5.0


class Backend:
    """Makes sync and async clients of one Redis of the backend under test."""

    def __init__(self, name: str, url: str = "") -> None:
        self.name = name
        self.url = url
        self.server = fakeredis.FakeServer() if name == "fake" else None

    def sync_client(self, **options: Any) -> Any:
        if self.server is not None:
            return fakeredis.FakeRedis(server=self.server, protocol=3, **options)
        return redis.Redis.from_url(self.url, protocol=3, **options)

    def async_client(self) -> Any:
        if self.server is not None:
            return fakeredis.FakeAsyncRedis(server=self.server, protocol=3)
        return redis.asyncio.Redis.from_url(self.url, protocol=3)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Make every script call fail until the block ends: refused by a
        disconnected fakeredis, or held by a paused real server until the
        caller's socket times out (a held call is dropped, never run)."""
        if self.server is not None:
            self.server.connected = False
            try:
                yield
            finally:
                self.server.connected = True
            return
        with redis.Redis.from_url(self.url) as admin:
            admin.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
            try:
                yield
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")


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
        options.setdefault("timeout", 10.0)
        policy = SyncSecurityPolicy(sync_client, **options)
        made.append(policy)
        return policy

    yield build
    for policy in made:
        policy.close()


@pytest.fixture
def ticker() -> Clock:
    """The monotonic clock of the breaker and the local buckets."""
    return Clock(start=1000.0)


@pytest.fixture
def make_fragile(
    redis_backend: Backend, clock: Clock, ticker: Clock
) -> Iterator[Callable[..., SyncSecurityPolicy]]:
    """Build sync policies meant to live through ``redis_backend.outage()``:
    each on a client of its own with socket timeouts of
    ``OUTAGE_TIMEOUT``, its breaker on ``ticker``."""
    made: list[tuple[SyncSecurityPolicy, Any]] = []

    def build(**options: Any) -> SyncSecurityPolicy:
        options.setdefault("clock", clock)
        options.setdefault("monotonic", ticker)
        options.setdefault("cpu_threshold", None)
        options.setdefault("memory_threshold", None)
        options.setdefault("auto_renew", False)
        options.setdefault("timeout", OUTAGE_TIMEOUT)
        options.setdefault("breaker_cooldown", COOLDOWN)
        client = redis_backend.sync_client(
            **client_options(OUTAGE_TIMEOUT, asynchronous=False)
        )
        policy = SyncSecurityPolicy(client, **options)
        made.append((policy, client))
        return policy

    yield build
    for policy, client in made:
        policy.close()
        client.close()


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


@pytest.mark.parametrize("how", ["register", "renew"])
def test_stalled_replica_learns_its_lease_was_lost(make_sync, clock, how):
    """After a stall past expiry and a takeover, the loss is reported and
    unregistering the lost service leaves the new holder's slot alone."""
    calls = []
    stalled = make_sync(
        lease_ttl=30, on_lease_lost=lambda u, s: calls.append((u, s))
    )
    other = make_sync(lease_ttl=30)
    stalled.set_user_profile(UserProfile(user_id="u", max_concurrent_services=1))
    old = start(stalled, "svc")
    assert old.allowed

    clock.advance(31)
    new = start(other, "svc")
    assert new.allowed and not new.already_running
    assert new.fence > old.fence

    if how == "register":
        with pytest.raises(LeaseLostError):
            stalled.register_service("u", "svc")
    else:
        outcomes = stalled.renew_leases()
        assert [(o.service_id, o.status) for o in outcomes] == [("svc", "lost")]
    assert stalled.held_leases() == {}
    assert calls == [("u", "svc")]
    lost = stalled.anomalies.by_type(AnomalyType.LEASE_LOST)
    assert [(e.user_id, e.service_id) for e in lost] == [("u", "svc")]
    assert not stalled.unregister_service("u", "svc")
    assert other.register_service("u", "svc") == new.fence
    assert other.get_user_service_count("u") == 1


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
        {"timeout": 0},
        {"timeout": 61},
        {"rate_limit_fail_mode": "maybe"},
        {"start_fail_mode": None},
        {"replicas": 0},
        {"breaker_threshold": 0},
        {"breaker_cooldown": -1},
        {"auto_block_threshold": 0},
        {"auto_block_window": 0},
        {"auto_block_duration": float("nan")},
    ],
)
@pytest.mark.parametrize("build", ["url", "from_url", "nodes"])
def test_bad_options_are_refused(options, build):
    """A policy with a bad option is never built, and no client is made
    (a cluster client would try to connect at once)."""
    with pytest.raises(InvalidInputError):
        if build == "url":
            SyncSecurityPolicy("redis://127.0.0.1:1/0", **options)
        elif build == "from_url":
            SyncSecurityPolicy.from_url("redis://127.0.0.1:1/0", **options)
        else:
            SyncSecurityPolicy([("127.0.0.1", 1)], **options)


@pytest.mark.parametrize(
    ("target", "options"),
    [
        ("redis+cluster://127.0.0.1:7000/1", {}),
        ("redis+cluster:///", {}),
        ("unix:///tmp/redis.sock", {"cluster": True}),
        ([], {}),
        ([("127.0.0.1", 0)], {}),
        ([("", 7000)], {}),
        ("redis://127.0.0.1:7000/0?socket_timeout=soon", {}),
        ("redis://user:pa/ss@127.0.0.1:6379/0", {}),
    ],
)
def test_bad_addresses_are_refused(target, options):
    """A malformed URL or startup node list raises InvalidInputError
    before anything connects."""
    with pytest.raises(InvalidInputError) as caught:
        SyncSecurityPolicy.from_url(target, **options)
    assert "pa/ss" not in str(caught.value)


@pytest.mark.parametrize(
    ("sentinels", "service_name", "options"),
    [
        ([("localhost", "26379")], "mymaster", {}),
        ([], "mymaster", {}),
        ("127.0.0.1:26379", "mymaster", {}),
        ([("127.0.0.1", 26379)], "", {}),
        ([("127.0.0.1", 26379)], "mymaster", {"timeout": 0}),
        ([("127.0.0.1", 26379)], "mymaster", {"start_fail_mode": "maybe"}),
    ],
)
def test_sentinel_options_are_checked(sentinels, service_name, options):
    """A malformed sentinel list, service name or option is refused before
    anything connects."""
    with pytest.raises(InvalidInputError):
        SyncSecurityPolicy.from_sentinel(sentinels, service_name, **options)


def test_unreachable_cluster_is_unavailable():
    """A cluster whose startup nodes all refuse raises RedisUnavailableError
    when the policy is built, since a blocking cluster client maps the
    cluster as it is made."""
    with pytest.raises(RedisUnavailableError) as caught:
        SyncSecurityPolicy([("127.0.0.1", free_port())], timeout=0.5)
    assert isinstance(caught.value.__cause__, redis.RedisClusterException)


@pytest.mark.parametrize("build", ["url", "from_url"])
def test_clients_made_from_a_url_have_the_deadline(build):
    """A client the policy makes times out each socket operation after
    ``timeout`` and leaves retrying to the policy."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    if build == "url":
        policy = SyncSecurityPolicy(url, timeout=0.4)
    else:
        policy = SyncSecurityPolicy.from_url(url, timeout=0.4)
    with policy:
        options = policy._client.get_connection_kwargs()
        assert options["socket_timeout"] == 0.4
        assert options["socket_connect_timeout"] == 0.4
        assert options["retry"].get_retries() == 0
        assert options["protocol"] == 3


def test_unreachable_redis_degrades_decisions_and_fails_other_calls():
    """With nothing listening, decisions are made by the fail modes and
    other calls raise RedisUnavailableError, caused by the refusal."""
    client = redis.Redis(
        port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
    )
    with SyncSecurityPolicy(client, cpu_threshold=None) as policy:
        rate = policy.check_rate_limit("u")
        start = policy.check_can_start_service("u", "s", port=8080)
        with pytest.raises(RedisUnavailableError) as caught:
            policy.get_user_state("u")
    assert (rate.allowed, rate.degraded, rate.limit) == (True, True, 20)
    assert (start.allowed, start.degraded, start.fence) == (False, True, None)
    assert "nothing reserved" in start.reason
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    client.close()


def test_a_misconfigured_client_is_a_backend_error_not_an_outage(redis_server):
    """A refused login is raised by decisions too, and leaves the breaker
    closed: it is a bug to fix, not an outage to ride out."""
    client = redis.Redis(
        port=redis_server.port, username="nobody", password="wrong",
        retry=Retry(NoBackoff(), 0),
    )
    with SyncSecurityPolicy(client, cpu_threshold=None) as policy:
        with pytest.raises(BackendError) as caught:
            policy.check_rate_limit("u")
        assert not isinstance(caught.value, RedisUnavailableError)
        assert policy.resilience.breaker.failures == 0
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


# -- without Redis -------------------------------------------------------------


def test_an_outage_is_decided_locally_and_reported_once(
    make_fragile, redis_backend, ticker
):
    """During an outage requests come from this replica's share and starts
    are refused, all marked degraded and none recorded one by one; the
    first reply after it records one REDIS_UNAVAILABLE, and the shared
    bucket never saw the degraded requests."""
    seen: list[Any] = []
    policy = make_fragile(replicas=2, on_anomaly=seen.append)
    assert policy.check_rate_limit("u").remaining == 19

    with redis_backend.outage():
        rates = [policy.check_rate_limit("u") for _ in range(12)]
        start = policy.check_can_start_service("u", "s")
    assert [r.allowed for r in rates] == [True] * 10 + [False] * 2
    assert {(r.degraded, r.limit) for r in rates} == {(True, 10)}
    assert (start.allowed, start.degraded, start.fence) == (False, True, None)
    assert policy.resilience.breaker.state is BreakerState.OPEN
    assert seen == [] and policy.held_leases() == {}

    ticker.advance(COOLDOWN)
    shared = policy.check_rate_limit("u")
    assert (shared.degraded, shared.remaining) == (False, 18)
    assert policy.check_rate_limit("u").remaining == 17
    (event,) = policy.anomalies.by_type(AnomalyType.REDIS_UNAVAILABLE)
    assert seen == [event]
    assert event.metadata["degraded_decisions"] == 13
    assert (event.metadata["allowed"], event.metadata["denied"]) == (10, 3)
    assert event.metadata["rate_limit_fail_mode"] == "local"
    assert policy.get_user_state("u").running == 0


#: Whether the first decision made without Redis allows, by fail mode.
FIRST_ALLOWED = {"local": True, "open": True, "closed": False}


@pytest.mark.parametrize("start_mode", sorted(FIRST_ALLOWED))
@pytest.mark.parametrize("rate_mode", sorted(FIRST_ALLOWED))
def test_fail_modes_are_chosen_per_check(
    make_fragile, redis_backend, rate_mode, start_mode
):
    """Each check follows its own fail mode, and a start reserves nothing
    whatever its mode says."""
    policy = make_fragile(
        rate_limit_fail_mode=rate_mode,
        start_fail_mode=start_mode,
        breaker_threshold=1,
    )
    with redis_backend.outage():
        rate = policy.check_rate_limit("u")
        start = policy.check_can_start_service("u", "s")
    assert (rate.allowed, rate.degraded) == (FIRST_ALLOWED[rate_mode], True)
    assert (start.allowed, start.degraded, start.fence) == (
        FIRST_ALLOWED[start_mode], True, None
    )
    assert policy.held_leases() == {}


def test_breaker_opens_holds_and_a_probe_closes_it(
    make_fragile, redis_backend, ticker
):
    """After the threshold no call reaches Redis until the cool-down ends;
    a failed probe opens the breaker again, a successful one closes it."""
    policy = make_fragile(breaker_threshold=2)
    breaker = policy.resilience.breaker
    with redis_backend.outage():
        for _ in range(2):
            assert policy.check_rate_limit("u").degraded
        assert (breaker.state, breaker.failures) == (BreakerState.OPEN, 2)

        for _ in range(5):
            assert policy.check_rate_limit("u").degraded
        assert policy.check_can_start_service("u", "s").degraded
        with pytest.raises(RedisUnavailableError, match="next attempt in 5.0s"):
            policy.register_service("u", "s")
        assert breaker.failures == 2

        ticker.advance(COOLDOWN)
        assert policy.check_rate_limit("u").degraded
        assert (breaker.state, breaker.failures) == (BreakerState.OPEN, 3)

    ticker.advance(COOLDOWN - 0.1)
    assert policy.check_rate_limit("u").degraded
    ticker.advance(0.1)
    assert not policy.check_rate_limit("u").degraded
    assert (breaker.state, breaker.failures) == (BreakerState.CLOSED, 0)


def test_local_share_refills_on_the_monotonic_clock(
    make_fragile, redis_backend, ticker
):
    """Four replicas: a FREE user gets 5 requests here, then one per 12 s."""
    policy = make_fragile(replicas=4, breaker_threshold=1)
    with redis_backend.outage():
        results = [policy.check_rate_limit("u") for _ in range(6)]
        assert [r.allowed for r in results] == [True] * 5 + [False]
        assert results[-1].retry_after == pytest.approx(12.0)
        ticker.advance(12.0)
        assert policy.check_rate_limit("u").allowed


def test_local_share_follows_the_limit_redis_last_reported(
    make_fragile, redis_backend
):
    """A PRO user (120 per minute) keeps a PRO share during an outage."""
    policy = make_fragile(replicas=4, breaker_threshold=1)
    policy.set_user_profile(UserProfile.from_tier("u", UserTier.PRO))
    assert policy.check_rate_limit("u").limit == 120
    with redis_backend.outage():
        assert policy.check_rate_limit("u").limit == 30
        assert policy.check_rate_limit("v").limit == 5


# -- automatic blocking --------------------------------------------------------


def with_ports(user_id: str, ports: list[int]) -> UserProfile:
    profile = UserProfile.from_tier(user_id, UserTier.FREE)
    profile.allowed_ports = ports
    return profile


def offend(policy: SyncSecurityPolicy, user_id: str = "u", times: int = 1) -> None:
    """Ask for a port outside the user's list: a high-severity anomaly."""
    for _ in range(times):
        result = policy.check_can_start_service(user_id, "s", port=22)
        assert result.reason == "Port 22 not allowed for your account"


def auto_blocked(policy: SyncSecurityPolicy, user_id: str = "u") -> bool:
    result = policy.check_can_start_service(user_id, "ok", port=8000)
    if result.allowed:
        policy.unregister_service(user_id, "ok")
        return False
    assert result.reason.startswith("User temporarily blocked"), result.reason
    return True


@pytest.fixture
def make_blocking(make_sync):
    """Build sync policies that block after 3 offences within 60 s, for
    300 s, with ``u`` and ``v`` allowed port 8000 only."""

    def build(**options: Any) -> SyncSecurityPolicy:
        options.setdefault("auto_block_threshold", 3)
        options.setdefault("auto_block_window", 60)
        options.setdefault("auto_block_duration", 300)
        policy = make_sync(**options)
        for user in ("u", "v"):
            policy.set_user_profile(with_ports(user, [8000]))
        return policy

    return build


def test_threshold_of_offences_blocks_until_the_duration_passes(
    make_blocking, sync_client, clock
):
    """The third high-severity anomaly within the window blocks the user's
    starts, records USER_AUTO_BLOCKED, and the block ends by the clock."""
    policy = make_blocking()
    offend(policy, times=2)
    assert not auto_blocked(policy)
    offend(policy)
    assert auto_blocked(policy)

    (event,) = policy.anomalies.by_type(AnomalyType.USER_AUTO_BLOCKED)
    assert (event.user_id, event.metadata["strikes"]) == ("u", 3)
    assert event.severity is Severity.HIGH
    keys = policy.keys.user("u")
    assert 0 < sync_client.pttl(keys.auto_block) <= 300_000
    assert not sync_client.exists(keys.strikes)

    clock.advance(299)
    result = policy.check_can_start_service("u", "ok", port=8000)
    assert result.reason == (
        "User temporarily blocked after repeated violations. Retry in 1s"
    )
    clock.advance(1)
    assert not auto_blocked(policy)


@pytest.mark.parametrize(
    ("steps", "blocked"),
    [
        ([2, 61, 1], False),
        ([2, 59, 1], True),
        ([1, 30, 1, 29.9, 1], True),
        ([1, 30, 1, 31, 1], False),
        ([2, 61, 2], False),
        ([2, 61, 3], True),
    ],
)
def test_offences_add_up_within_the_window_only(
    make_blocking, clock, steps, blocked
):
    """Offences (even positions: how many) separated by seconds (odd
    positions) block only when three fall within 60 s."""
    policy = make_blocking()
    for i, step in enumerate(steps):
        if i % 2:
            clock.advance(step)
        else:
            offend(policy, times=step)
    assert auto_blocked(policy) is blocked


def test_unblock_lifts_an_auto_block_and_forgets_strikes(
    make_blocking, sync_client
):
    """unblock_user ends an automatic block and clears the strikes."""
    policy = make_blocking()
    offend(policy, times=3)
    assert auto_blocked(policy)
    policy.unblock_user("u")
    assert not auto_blocked(policy)
    offend(policy, times=2)
    policy.unblock_user("u")
    offend(policy, times=2)
    assert not auto_blocked(policy)
    assert sync_client.zcard(policy.keys.user("u").strikes) == 2


def test_off_by_default(make_sync, sync_client):
    """Without a threshold, offences block nobody and leave no strikes."""
    policy = make_sync()
    policy.set_user_profile(with_ports("u", [8000]))
    offend(policy, times=10)
    assert not auto_blocked(policy)
    keys = policy.keys.user("u")
    assert not sync_client.exists(keys.strikes, keys.auto_block)


def test_attempts_while_blocked_and_system_faults_are_not_strikes(
    make_blocking, sync_client
):
    """Starts tried while blocked, and PROFILE_CORRUPT (high severity, but
    the system's fault) never count toward an automatic block."""
    policy = make_blocking(auto_block_threshold=1)
    policy.block_user("u", "manual")
    for _ in range(3):
        assert not policy.check_can_start_service("u", "s").allowed
    sync_client.hset(policy.keys.user("c").profile, "tier", "bogus")
    for _ in range(3):
        result = policy.check_can_start_service("c", "s")
        assert result.anomaly.anomaly_type is AnomalyType.PROFILE_CORRUPT
    for user in ("u", "c"):
        keys = policy.keys.user(user)
        assert not sync_client.exists(keys.strikes, keys.auto_block)


async def test_sync_and_async_replicas_share_strikes_and_blocks(
    redis_backend, make_blocking, clock
):
    """Strikes counted by a sync and an async replica add up; the block
    holds on both; other users are not touched."""
    sync = make_blocking()
    client = redis_backend.async_client()
    other = SecurityPolicy(
        client,
        clock=clock,
        cpu_threshold=None,
        memory_threshold=None,
        auto_block_threshold=3,
        auto_block_window=60,
        auto_block_duration=300,
    )
    try:
        offend(sync, times=2)
        offend(sync, "v", times=2)
        denied = await other.check_can_start_service("u", "s", port=22)
        assert not denied.allowed
        assert auto_blocked(sync)
        blocked = await other.check_can_start_service("u", "ok", port=8000)
        assert blocked.reason.startswith("User temporarily blocked")
        assert not auto_blocked(sync, "v")
        await other.unblock_user("u")
        assert not auto_blocked(sync)
    finally:
        await other.close()
        await client.aclose()
