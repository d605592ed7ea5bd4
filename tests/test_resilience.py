"""Deadlines, the circuit breaker, local buckets and fail modes.

The state machines run on a clock the test moves; the policy-level tests
point a policy at a port where nothing listens, a real refused connection,
so they need no extra server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets

import pytest
import redis
from redis import exceptions as rx

from pactown_redis import (
    AnomalyType,
    BackendError,
    InvalidInputError,
    RedisUnavailableError,
    SecurityPolicy,
    UserTier,
)
from pactown_redis import _core
from pactown_redis._core import Rules
from pactown_redis.keys import KeySpace
from pactown_redis.resilience import (
    BreakerState,
    CircuitBreaker,
    Deadline,
    DegradedLog,
    FailMode,
    LocalLimiter,
    Resilience,
    SyncGuard,
    client_options,
    is_unavailable,
    retryable,
)
from conftest import Clock
from servers import free_port


def rules(burst: int = 10, namespace: str = "t") -> Rules:
    return Rules(
        keys=KeySpace(namespace),
        default_tier=UserTier.FREE,
        lease_ms=30_000,
        start_burst=burst,
        start_per_minute=60.0,
    )


# -- deadlines ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "elapsed", "remaining", "retry"),
    [
        (0.25, 0.0, 0.25, True),
        (0.25, 0.1, 0.15, True),
        (0.25, 0.246, 0.004, False),
        (0.25, 0.25, 0.0, False),
        (0.25, 3.0, 0.0, False),
    ],
)
def test_deadline_arithmetic(budget, elapsed, remaining, retry):
    """Time left never goes negative; a retry needs a few ms left."""
    clock = Clock(start=1000.0)
    deadline = Deadline.after(budget, clock)
    clock.advance(elapsed)
    assert deadline.remaining() == pytest.approx(remaining)
    assert deadline.allows_retry() is retry


# -- the circuit breaker ------------------------------------------------------

# Steps: "F" a failure, "S" a success, "+x" the clock moves x seconds,
# "A" / "a" a call is allowed / refused; each step is followed by the
# state it must leave. Threshold 3, cool-down 5 s.
BREAKER_CASES = {
    "below the threshold stays closed": [
        ("F", "closed"), ("F", "closed"), ("A", "closed"),
    ],
    "the threshold opens it": [
        ("F", "closed"), ("F", "closed"), ("F", "open"), ("a", "open"),
    ],
    "a success resets the count": [
        ("F", "closed"), ("F", "closed"), ("S", "closed"),
        ("F", "closed"), ("F", "closed"), ("A", "closed"),
    ],
    "no call before the cool-down ends": [
        ("F", "closed"), ("F", "closed"), ("F", "open"),
        ("+4.999", "open"), ("a", "open"),
    ],
    "one probe after the cool-down": [
        ("F", "closed"), ("F", "closed"), ("F", "open"), ("+5", "open"),
        ("A", "half_open"), ("a", "half_open"),
    ],
    "the probe's success closes it": [
        ("F", "closed"), ("F", "closed"), ("F", "open"), ("+5", "open"),
        ("A", "half_open"), ("S", "closed"), ("A", "closed"),
    ],
    "the probe's failure opens it for another cool-down": [
        ("F", "closed"), ("F", "closed"), ("F", "open"), ("+5", "open"),
        ("A", "half_open"), ("F", "open"), ("+4.9", "open"), ("a", "open"),
        ("+0.1", "open"), ("A", "half_open"),
    ],
    "a probe lost for a cool-down is replaced": [
        ("F", "closed"), ("F", "closed"), ("F", "open"), ("+5", "open"),
        ("A", "half_open"), ("+4.9", "half_open"), ("a", "half_open"),
        ("+0.1", "half_open"), ("A", "half_open"),
    ],
    "a late success while open closes it": [
        ("F", "closed"), ("F", "closed"), ("F", "open"), ("S", "closed"),
    ],
}


@pytest.mark.parametrize("steps", BREAKER_CASES.values(), ids=BREAKER_CASES)
def test_breaker_state_machine(steps):
    """The breaker moves between closed, open and half-open as tabled."""
    clock = Clock(start=1000.0)
    breaker = CircuitBreaker(threshold=3, cooldown=5.0, clock=clock)
    for step, state in steps:
        if step == "F":
            breaker.record_failure()
        elif step == "S":
            breaker.record_success()
        elif step.startswith("+"):
            clock.advance(float(step[1:]))
        else:
            assert breaker.allow() is (step == "A"), steps
        assert breaker.state is BreakerState(state), (step, steps)


def test_breaker_reports_opening_once_and_the_wait():
    """Only the failure that opens the breaker says so; the wait counts
    down to the probe."""
    clock = Clock(start=1000.0)
    breaker = CircuitBreaker(threshold=2, cooldown=5.0, clock=clock)
    assert [breaker.record_failure() for _ in range(3)] == [False, True, False]
    assert breaker.retry_after() == pytest.approx(5.0)
    clock.advance(2.0)
    assert breaker.retry_after() == pytest.approx(3.0)
    clock.advance(9.0)
    assert breaker.retry_after() == 0.0
    breaker.record_success()
    assert breaker.retry_after() == 0.0


# -- local buckets ------------------------------------------------------------

# (capacity, per second, [(seconds to move, cost)], [(allowed, tokens, retry)])
LIMITER_CASES = {
    "starts full and empties": (
        3, 1.0,
        [(0, 1), (0, 1), (0, 1), (0, 1)],
        [(True, 2, 0), (True, 1, 0), (True, 0, 0), (False, 0, 1.0)],
    ),
    "refills at its rate": (
        3, 0.5,
        [(0, 3), (1, 1), (1, 1)],
        [(True, 0, 0), (False, 0.5, 1.0), (True, 0, 0)],
    ),
    "never past its capacity": (
        2, 1.0,
        [(0, 1), (3600, 0.5)],
        [(True, 1, 0), (True, 1.5, 0)],
    ),
    "a cost above the capacity never fits": (
        2, 1.0,
        [(0, 3)],
        [(False, 2, math.inf)],
    ),
    "fractional costs": (
        1, 1.0,
        [(0, 0.25), (0, 0.5), (0, 0.5)],
        [(True, 0.75, 0), (True, 0.25, 0), (False, 0.25, 0.25)],
    ),
    "a clock stepping back refills nothing": (
        2, 1.0,
        [(0, 2), (-10, 1), (10.5, 1), (0.5, 1)],
        [(True, 0, 0), (False, 0, 1.0), (False, 0.5, 0.5), (True, 0, 0)],
    ),
}


@pytest.mark.parametrize(
    ("capacity", "rate", "calls", "expected"),
    LIMITER_CASES.values(),
    ids=LIMITER_CASES,
)
def test_local_bucket(capacity, rate, calls, expected):
    """A local bucket takes, refills and refuses as tabled."""
    clock = Clock(start=1000.0)
    limiter = LocalLimiter(clock)
    for (move, cost), (allowed, tokens, retry) in zip(calls, expected):
        clock.advance(move)
        verdict = limiter.take("u", cost, capacity, rate)
        assert (verdict.allowed, verdict.tokens) == (
            allowed, pytest.approx(tokens)
        )
        assert verdict.retry_after == pytest.approx(retry)
        assert verdict.reset_after == pytest.approx(
            (capacity - verdict.tokens) / rate
        )


def test_local_bucket_applies_a_lowered_capacity_at_once():
    """Tokens above a lowered capacity are dropped."""
    limiter = LocalLimiter(Clock(start=1000.0))
    assert limiter.take("u", 1, 10, 1.0).tokens == 9
    assert limiter.take("u", 1, 3, 1.0).tokens == 2


def test_local_buckets_are_per_key_and_bounded():
    """Keys have their own buckets; past max_keys the least recently used
    one is forgotten and starts full again."""
    limiter = LocalLimiter(Clock(start=1000.0), max_keys=2)
    for key in ("a", "b"):
        assert limiter.take(key, 1, 1, 0.01).allowed
    assert not limiter.take("a", 1, 1, 0.01).allowed
    assert limiter.take("c", 1, 1, 0.01).allowed
    assert len(limiter) == 2
    assert limiter.take("b", 1, 1, 0.01).allowed
    assert not limiter.take("c", 1, 1, 0.01).allowed


# -- degraded periods ---------------------------------------------------------


def test_degraded_log_counts_one_period_at_a_time():
    """A period starts at its first decision and ends once, with its
    length and counts; a second end finds nothing."""
    clock = Clock(start=1000.0)
    log = DegradedLog(clock)
    assert log.end("x") is None
    assert [log.note(allowed) for allowed in (True, False, True)] == [
        True, False, False
    ]
    clock.advance(7.5)
    period = log.end("TimeoutError")
    assert period is not None
    assert (period.decisions, period.allowed, period.seconds) == (3, 2, 7.5)
    assert period.started_at <= period.ended_at
    assert log.end("x") is None
    assert log.note(False) is True

    event = period.event(extra="kept")
    assert event.anomaly_type is AnomalyType.REDIS_UNAVAILABLE
    assert event.user_id is None
    assert event.metadata["degraded_decisions"] == 3
    assert event.metadata["denied"] == 1
    assert event.metadata["last_error"] == "TimeoutError"
    assert event.metadata["extra"] == "kept"


# -- classifying errors -------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "unavailable", "retry"),
    [
        (rx.ConnectionError("refused"), True, True),
        (rx.TimeoutError("slow"), True, False),
        (asyncio.TimeoutError(), True, False),
        (ConnectionResetError(), True, False),
        (rx.BusyLoadingError("loading"), True, False),
        (rx.OutOfMemoryError("command not allowed"), True, False),
        (rx.ReadOnlyError("replica"), True, False),
        (rx.ResponseError("BUSY Redis is busy running a script"), True, False),
        (rx.ResponseError("MISCONF cannot persist"), True, False),
        (rx.ResponseError("WRONGTYPE Operation against a key"), False, False),
        (rx.ResponseError("ERR Error running script"), False, False),
        (rx.AuthenticationError("invalid password"), False, False),
        (rx.NoPermissionError("no permissions"), False, False),
        (ValueError("bug"), False, False),
    ],
)
def test_which_errors_mean_unavailable(exc, unavailable, retry):
    """Unreachable, slow, loading, read-only, full or busy Redis is
    unavailable; a refused login, a bad key or a bug is not."""
    assert is_unavailable(exc) is unavailable
    assert retryable(exc) is retry


@pytest.mark.parametrize(
    ("exc", "raised"),
    [
        (rx.ConnectionError("refused"), RedisUnavailableError),
        (rx.ResponseError("WRONGTYPE Operation"), BackendError),
    ],
)
def test_on_error_counts_only_unavailability(exc, raised):
    """Only unavailability counts towards the breaker."""
    resilience = Resilience(rules(), breaker_threshold=1)
    error = resilience.on_error(exc, "rate_limit.lua")
    assert type(error) is raised
    assert "rate_limit.lua" in str(error)
    opened = raised is RedisUnavailableError
    assert (resilience.breaker.state is BreakerState.OPEN) is opened


# -- fail modes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "replicas", "capacity", "per_second"),
    [
        (20, 1, 20.0, 20 / 60),
        (20, 4, 5.0, 20 / 60 / 4),
        (120, 3, 40.0, 120 / 60 / 3),
        (20, 50, 1.0, 20 / 60 / 50),
    ],
)
def test_replica_share(limit, replicas, capacity, per_second):
    """A replica holds 1/replicas of a limit, at least one token."""
    resilience = Resilience(rules(), replicas=replicas)
    assert resilience.share(limit, limit) == (
        pytest.approx(capacity), pytest.approx(per_second)
    )


@pytest.mark.parametrize(
    ("mode", "allowed", "limit", "remaining", "retry_after"),
    [
        ("closed", [False] * 3, 20, 0, 2.0),
        ("open", [True] * 3, 20, 0, 0.0),
        ("local", [True, True, False], 2, 0, 6.0),
    ],
)
def test_rate_limit_fail_modes(mode, allowed, limit, remaining, retry_after):
    """closed denies, open allows, local spends this replica's share (a
    FREE user's 20 per minute over 10 replicas: 2, one per 30 s)."""
    clock = Clock(start=1000.0)
    resilience = Resilience(
        rules(),
        rate_limit_fail_mode=mode,
        replicas=10,
        breaker_threshold=1,
        breaker_cooldown=2.0,
        monotonic=clock,
    )
    resilience.on_error(rx.ConnectionError("down"), "x")
    results = [resilience.rate_limit("u", 1) for _ in allowed]
    assert [r.allowed for r in results] == allowed
    last = results[-1]
    assert (last.limit, last.remaining, last.degraded) == (limit, remaining, True)
    expected_retry = 30.0 if mode == "local" else retry_after
    assert last.retry_after == pytest.approx(expected_retry)


def test_local_mode_uses_the_last_known_limit():
    """A limit Redis reported for the user replaces the default tier's."""
    resilience = Resilience(rules(), replicas=2)
    resilience.remember_limit("pro", 120)
    resilience.remember_limit("corrupt", 0)
    assert resilience.rate_limit("pro", 1).limit == 60
    assert resilience.rate_limit("corrupt", 1).limit == 10
    assert resilience.rate_limit("new", 1).limit == 10


@pytest.mark.parametrize(
    ("mode", "allowed"),
    [
        ("closed", [False, False, False]),
        ("open", [True, True, True]),
        ("local", [True, True, False]),
    ],
)
def test_start_fail_modes_reserve_nothing(mode, allowed):
    """closed denies, open allows, local spends this replica's share of
    the start bucket (10 at once over 5 replicas: 2); none has a fence."""
    resilience = Resilience(rules(burst=10), start_fail_mode=mode, replicas=5)
    results = [resilience.start("u") for _ in allowed]
    assert [r.allowed for r in results] == allowed
    for result in results:
        assert result.degraded and result.fence is None and result.reason
        assert not result.already_running
    if mode != "open":
        assert results[-1].retry_after > 0


@pytest.mark.parametrize(
    "options",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": 61},
        {"timeout": "0.25"},
        {"rate_limit_fail_mode": "fail"},
        {"start_fail_mode": None},
        {"replicas": 0},
        {"replicas": 1.5},
        {"breaker_threshold": 0},
        {"breaker_cooldown": -1},
    ],
)
def test_bad_options_are_refused(options):
    """Every resilience option is checked when the policy is built."""
    with pytest.raises(InvalidInputError):
        SecurityPolicy("redis://127.0.0.1:1/0", **options)


def test_fail_modes_accept_the_enum():
    """A FailMode works where its name does."""
    resilience = Resilience(rules(), rate_limit_fail_mode=FailMode.OPEN)
    assert resilience.rate_limit_fail_mode is FailMode.OPEN


def test_recovery_is_logged_and_reported_once(caplog):
    """One WARNING when the period starts, one when the breaker opens, one
    when Redis answers; the event comes once."""
    clock = Clock(start=1000.0)
    resilience = Resilience(rules(), breaker_threshold=2, monotonic=clock)
    caplog.set_level(logging.WARNING, logger="pactown_redis.resilience")
    for _ in range(2):
        resilience.on_error(rx.TimeoutError("Timeout reading"), "x")
        resilience.rate_limit("u", 1)
    resilience.start("u")
    clock.advance(3.0)
    event = resilience.on_reply()
    assert resilience.on_reply() is None
    assert event is not None
    assert event.metadata["degraded_decisions"] == 3
    assert event.metadata["seconds"] == 3.0
    assert event.metadata["rate_limit_fail_mode"] == "local"
    assert event.metadata["last_error"] == "TimeoutError: Timeout reading"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3
    assert "deciding without it" in messages[0]
    assert "2 times in a row" in messages[1]
    assert "3 decisions were made without it" in messages[2]


# -- a policy with Redis unreachable ------------------------------------------


@pytest.fixture
async def unreachable():
    """Build policies on a port where nothing listens; closed at the end."""
    made = []

    def build(**options):
        options.setdefault("cpu_threshold", None)
        options.setdefault("memory_threshold", None)
        policy = SecurityPolicy(f"redis://127.0.0.1:{free_port()}/0", **options)
        made.append(policy)
        return policy

    yield build
    for policy in made:
        await policy.close()


async def test_decisions_without_redis_never_raise(unreachable):
    """With Redis unreachable, both checks answer by their default fail
    modes (local, closed), marked degraded, and reserve nothing."""
    policy = unreachable()
    rate = await policy.check_rate_limit("u")
    start = await policy.check_can_start_service("u", "s", port=8080)
    assert (rate.allowed, rate.degraded, rate.limit) == (True, True, 20)
    assert (start.allowed, start.degraded, start.fence) == (False, True, None)
    assert "nothing reserved" in start.reason
    assert policy.held_leases() == {}


async def test_invalid_input_is_refused_before_anything_is_sent(unreachable):
    """Bad arguments raise InvalidInputError, also without Redis, and do
    not count as Redis failures."""
    policy = unreachable()
    with pytest.raises(InvalidInputError):
        await policy.check_rate_limit("u", cost=0)
    with pytest.raises(InvalidInputError):
        await policy.check_can_start_service("u", "s", port=70000)
    with pytest.raises(InvalidInputError):
        await policy.check_rate_limit("")
    assert policy.resilience.breaker.failures == 0


async def test_breaker_stops_calls_during_the_cool_down(unreachable):
    """After the threshold, decisions and other calls stop reaching for
    Redis until the cool-down ends; then one probe goes out."""
    clock = Clock(start=1000.0)
    policy = unreachable(
        breaker_threshold=2, breaker_cooldown=5.0, monotonic=clock
    )
    breaker = policy.resilience.breaker
    for _ in range(2):
        assert (await policy.check_rate_limit("u")).degraded
    assert (breaker.state, breaker.failures) == (BreakerState.OPEN, 2)

    for _ in range(20):
        assert (await policy.check_rate_limit("u")).degraded
    assert (await policy.check_can_start_service("u", "s")).degraded
    with pytest.raises(RedisUnavailableError):
        await policy.register_service("u", "s")
    assert breaker.failures == 2

    clock.advance(5.0)
    assert (await policy.check_rate_limit("u")).degraded
    assert (breaker.state, breaker.failures) == (BreakerState.OPEN, 3)


@pytest.mark.parametrize(
    ("rate_mode", "start_mode", "rate_allowed", "start_allowed"),
    [
        ("local", "closed", True, False),
        ("closed", "closed", False, False),
        ("open", "open", True, True),
        ("closed", "local", False, True),
    ],
)
async def test_fail_modes_are_chosen_per_check(
    unreachable, rate_mode, start_mode, rate_allowed, start_allowed
):
    """Each check follows its own fail mode."""
    policy = unreachable(
        rate_limit_fail_mode=rate_mode, start_fail_mode=start_mode
    )
    assert (await policy.check_rate_limit("u")).allowed is rate_allowed
    start = await policy.check_can_start_service("u", "s")
    assert (start.allowed, start.fence) == (start_allowed, None)


async def test_local_share_refills_on_the_monotonic_clock(unreachable):
    """Four replicas: a FREE user gets 5 requests here, then one per 12 s."""
    clock = Clock(start=1000.0)
    policy = unreachable(replicas=4, monotonic=clock)
    results = [await policy.check_rate_limit("u") for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert results[-1].retry_after == pytest.approx(12.0)
    clock.advance(12.0)
    assert (await policy.check_rate_limit("u")).allowed


async def test_degraded_decisions_record_no_anomaly_each(unreachable):
    """Denials made without Redis are not recorded one by one."""
    seen = []
    policy = unreachable(
        rate_limit_fail_mode="closed", on_anomaly=seen.append
    )
    for _ in range(5):
        assert not (await policy.check_rate_limit("u")).allowed
    await policy.check_can_start_service("u", "s")
    await policy.anomalies.flush()
    assert seen == []


@pytest.mark.parametrize("build", ["url", "from_url"])
async def test_clients_made_from_a_url_have_the_deadline(build):
    """A client the policy makes times out connecting and reading after
    ``timeout`` and leaves retrying to the policy."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    if build == "url":
        policy = SecurityPolicy(url, timeout=0.4)
    else:
        policy = SecurityPolicy.from_url(url, timeout=0.4)
    try:
        options = policy._client.get_connection_kwargs()
        assert options["socket_timeout"] == 0.4
        assert options["socket_connect_timeout"] == 0.4
        assert options["retry"].get_retries() == 0
    finally:
        await policy.close()


# -- the blocking sender -------------------------------------------------------


def sync_client(port: int, timeout: float) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        protocol=3,
        **client_options(timeout, asynchronous=False),
    )


def test_sync_guard_reloads_scripts_and_applies_a_debit_once(redis_server):
    """The blocking sender reloads a flushed script and runs each debit
    once."""
    local_rules = rules(namespace=f"sync-{secrets.token_hex(4)}")
    client = sync_client(redis_server.port, 5.0)
    admin = redis_server.client()
    events = []
    resilience = Resilience(local_rules)
    guard = SyncGuard(client, resilience, events.append)

    def debit():
        call = _core.rate_limit_call(local_rules, "u", 1)
        return _core.parse_rate_limit("u", guard.run(call))

    try:
        admin.script_flush()
        assert debit().remaining == 19
        admin.script_flush()
        assert debit().remaining == 18
        assert debit().remaining == 17
        assert resilience.breaker.failures == 0 and events == []
    finally:
        admin.delete(*admin.keys(local_rules.keys.key_pattern()))
        admin.close()
        client.close()


def test_sync_guard_reports_unavailability():
    """Without Redis the blocking sender raises RedisUnavailableError; once
    the breaker is open it raises without trying."""
    resilience = Resilience(rules(), breaker_threshold=1)
    client = sync_client(free_port(), 0.2)
    guard = SyncGuard(client, resilience, lambda event: None)
    call = _core.rate_limit_call(rules(), "u", 1)
    try:
        for _ in range(2):
            with pytest.raises(RedisUnavailableError):
                guard.run(call)
        assert resilience.breaker.state is BreakerState.OPEN
        assert resilience.breaker.failures == 1
    finally:
        client.close()
