"""Bounded, explicit decisions when Redis is slow, gone or refusing writes.

Every call to Redis has a deadline of ``timeout`` seconds covering the
connection, the request, the reply, the ``NOSCRIPT`` recovery and one
retry. A decision whose call misses the deadline, or finds Redis
unreachable, is made by the check's fail mode instead:

- ``closed``: deny;
- ``open``: allow;
- ``local``: an in-process token bucket holding this replica's share of
  the limit (the limit divided by ``replicas``).

A circuit breaker stops waiting on a Redis that keeps failing: after
``breaker_threshold`` consecutive failures, decisions go straight to the
fail mode for ``breaker_cooldown`` seconds, then one call probes Redis and
its success closes the breaker. The decisions made without Redis form a
degraded period, reported once, when Redis answers again, as one
``REDIS_UNAVAILABLE`` anomaly.

The state machines (:class:`Deadline`, :class:`CircuitBreaker`,
:class:`LocalLimiter`, :class:`DegradedLog`) and :class:`Resilience`, which
ties them together, are plain state on an injectable monotonic clock: no
I/O and no asyncio, so the async and the sync API share them (a lock makes
:class:`Resilience` safe to use from several threads). :class:`AsyncGuard`
and :class:`SyncGuard` send one script call through them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from typing import Any, Callable, Hashable, Optional, Sequence

from redis import Redis, RedisCluster
from redis import exceptions as rx
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio import RedisCluster as AsyncRedisCluster
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry
from redis.sentinel import Sentinel

from . import _cluster, _outcomes
from ._core import DEFAULT_TIMEOUT, Rules
from ._pipeline import AutoPipeline
from ._validate import check_number
from .errors import (
    BackendError,
    InvalidInputError,
    PactownRedisError,
    RedisUnavailableError,
)
from .models import (
    TIER_LIMITS,
    AnomalyEvent,
    AnomalyType,
    RateLimitResult,
    SecurityCheckResult,
    Severity,
    utcnow,
)
from .scripts import ScriptCall

__all__ = [
    "AsyncGuard",
    "BreakerState",
    "CircuitBreaker",
    "Deadline",
    "DegradedLog",
    "DegradedPeriod",
    "FailMode",
    "LocalLimiter",
    "LocalVerdict",
    "Resilience",
    "SyncGuard",
    "check_timeout",
    "client_options",
    "close_client",
    "close_sync_client",
    "is_unavailable",
    "make_client",
    "retryable",
    "sentinel_client",
]

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

MAX_TIMEOUT = 60.0
DEFAULT_BREAKER_THRESHOLD = 3
DEFAULT_BREAKER_COOLDOWN = 2.0
MAX_COOLDOWN = 3600.0
MAX_REPLICAS = 1_000_000
#: Users whose last known limit and local buckets are kept, least recently
#: used dropped first; a dropped bucket starts full again.
MAX_TRACKED_USERS = 10_000
#: A retry is not started with less than this many seconds of the deadline
#: left: it could not complete a round trip.
MIN_RETRY_SECONDS = 0.005


# -- fail modes ---------------------------------------------------------------


class FailMode(str, Enum):
    """How a check decides when Redis cannot be asked in time."""

    CLOSED = "closed"
    OPEN = "open"
    LOCAL = "local"


def parse_fail_mode(value: Any, what: str) -> FailMode:
    """Return ``value`` as a :class:`FailMode`.

    Raises:
        InvalidInputError: not one of ``closed``, ``open``, ``local``.
    """
    try:
        return FailMode(value)
    except (ValueError, TypeError):
        names = ", ".join(mode.value for mode in FailMode)
        raise InvalidInputError(
            f"{what} must be one of {names}, got {value!r}"
        ) from None


def check_timeout(value: Any) -> float:
    """Return ``value`` if it is a usable deadline in seconds (0 < t <= 60).

    Raises:
        InvalidNumberError: anything else.
    """
    return check_number(value, "timeout", low=0, high=MAX_TIMEOUT, low_open=True)


# -- deadlines ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deadline:
    """The moment, on a monotonic clock in seconds, by which a call ends."""

    at: float
    clock: Clock = time.monotonic

    @classmethod
    def after(cls, seconds: float, clock: Clock = time.monotonic) -> "Deadline":
        """Return the deadline ``seconds`` from now."""
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Return the seconds left, never negative."""
        return max(0.0, self.at - self.clock())

    def allows_retry(self) -> bool:
        """Return whether enough time is left to start another attempt."""
        return self.remaining() >= MIN_RETRY_SECONDS


# -- circuit breaker ----------------------------------------------------------


class BreakerState(str, Enum):
    """Where a :class:`CircuitBreaker` stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Stops waiting on a backend that keeps failing.

    ``closed``: every call goes through; ``threshold`` consecutive failures
    open the breaker. ``open``: no call goes through until ``cooldown``
    seconds have passed, then one call (the probe) does and the breaker is
    ``half_open``. The probe's success closes it, its failure opens it for
    another cool-down. A probe that reports nothing within a cool-down is
    presumed lost and the next call probes again.

    Args:
        threshold: consecutive failures that open the breaker (>= 1).
        cooldown: seconds the breaker stays open (>= 0).
        clock: a monotonic clock in seconds.
    """

    __slots__ = (
        "threshold", "cooldown", "_clock", "_state", "_failures", "_since",
    )

    def __init__(self, threshold: int, cooldown: float, clock: Clock) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        # When the breaker opened, or when the current probe was let out.
        self._since = 0.0

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures reported since the last success."""
        return self._failures

    def allow(self) -> bool:
        """Return whether a call may go to the backend now.

        Hands out the probe when an open breaker's cool-down is over.
        """
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if now - self._since < self.cooldown:
            return False
        self._state = BreakerState.HALF_OPEN
        self._since = now
        return True

    def record_success(self) -> None:
        """Report a call the backend answered: the breaker closes."""
        self._failures = 0
        self._state = BreakerState.CLOSED

    def record_failure(self) -> bool:
        """Report a failed call; return whether it opened the breaker
        (a failed probe re-opens it without returning ``True``)."""
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.OPEN
            self._since = self._clock()
            return False
        if self._state is BreakerState.CLOSED and self._failures >= self.threshold:
            self._state = BreakerState.OPEN
            self._since = self._clock()
            return True
        return False

    def retry_after(self) -> float:
        """Return the seconds until a call may go through; 0 when closed."""
        if self._state is BreakerState.CLOSED:
            return 0.0
        return max(0.0, self._since + self.cooldown - self._clock())


# -- local token buckets ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalVerdict:
    """One answer of a :class:`LocalLimiter`.

    Attributes:
        allowed: the cost was taken.
        tokens: tokens left after this answer.
        retry_after: seconds until the cost would fit; 0 when allowed,
            ``math.inf`` when it exceeds the capacity.
        reset_after: seconds until the bucket is full again.
    """

    allowed: bool
    tokens: float
    retry_after: float
    reset_after: float


class LocalLimiter:
    """Token buckets kept in this process, one per key.

    A key's bucket starts full. Capacity and refill rate are passed with
    each call, so a changed limit applies at once (tokens above a lowered
    capacity are dropped). A clock that steps back refills nothing until it
    passes the bucket's time again. At most ``max_keys`` buckets are kept,
    the least recently used dropped first.
    """

    __slots__ = ("_clock", "_max_keys", "_buckets")

    def __init__(self, clock: Clock, max_keys: int = MAX_TRACKED_USERS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(
        self, key: Hashable, cost: float, capacity: float, per_second: float
    ) -> LocalVerdict:
        """Take ``cost`` tokens from ``key``'s bucket if it holds them.

        ``capacity`` and ``per_second`` must be positive; a denied call
        takes nothing.
        """
        now = self._clock()
        tokens, stamp = self._buckets.pop(key, (capacity, now))
        if now > stamp:
            tokens += (now - stamp) * per_second
            stamp = now
        tokens = min(tokens, capacity)

        allowed = cost <= tokens
        if allowed:
            tokens -= cost
            retry = 0.0
        elif cost > capacity:
            retry = math.inf
        else:
            retry = (cost - tokens) / per_second

        self._buckets[key] = (tokens, stamp)
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return LocalVerdict(
            allowed, tokens, retry, (capacity - tokens) / per_second
        )

    def clear(self) -> None:
        """Forget every bucket."""
        self._buckets.clear()


# -- degraded periods ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DegradedPeriod:
    """A stretch of decisions made without Redis, reported when it ends.

    Attributes:
        started_at: the first decision made without Redis (UTC).
        ended_at: the first reply from Redis after it (UTC).
        seconds: the period's length on the monotonic clock.
        decisions: decisions made by a fail mode in the period.
        allowed: how many of those allowed.
        last_error: the last failure seen, e.g. ``TimeoutError: ...``.
    """

    started_at: datetime
    ended_at: datetime
    seconds: float
    decisions: int
    allowed: int
    last_error: str

    def event(self, **metadata: Any) -> AnomalyEvent:
        """Return the ``REDIS_UNAVAILABLE`` anomaly of this period, with
        ``metadata`` added to its own."""
        return AnomalyEvent(
            timestamp=self.ended_at,
            anomaly_type=AnomalyType.REDIS_UNAVAILABLE,
            details=(
                f"Redis unavailable for {self.seconds:.1f}s; "
                f"{self.decisions} decisions made without it"
            ),
            severity=Severity.HIGH,
            metadata={
                "started_at": self.started_at.isoformat(),
                "ended_at": self.ended_at.isoformat(),
                "seconds": round(self.seconds, 3),
                "degraded_decisions": self.decisions,
                "allowed": self.allowed,
                "denied": self.decisions - self.allowed,
                "last_error": self.last_error,
                **metadata,
            },
        )


class DegradedLog:
    """Counts the decisions of the current degraded period.

    A period begins with the first decision made without Redis and ends
    with the first reply from Redis after it.
    """

    __slots__ = ("_clock", "_wall", "_began", "_began_at", "_count", "_allowed")

    def __init__(
        self, clock: Clock, wall: Callable[[], datetime] = utcnow
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._began = 0.0
        self._began_at: Optional[datetime] = None
        self._count = 0
        self._allowed = 0

    @property
    def active(self) -> bool:
        return self._began_at is not None

    @property
    def decisions(self) -> int:
        """Decisions made without Redis in the current period."""
        return self._count

    def note(self, allowed: bool) -> bool:
        """Count one decision made without Redis; return whether it began
        a period."""
        began = self._began_at is None
        if began:
            self._began = self._clock()
            self._began_at = self._wall()
        self._count += 1
        self._allowed += allowed
        return began

    def end(self, last_error: str) -> Optional[DegradedPeriod]:
        """Close the current period and return it; ``None`` if none is open."""
        if self._began_at is None:
            return None
        period = DegradedPeriod(
            started_at=self._began_at,
            ended_at=self._wall(),
            seconds=max(0.0, self._clock() - self._began),
            decisions=self._count,
            allowed=self._allowed,
            last_error=last_error,
        )
        self._began_at = None
        self._count = 0
        self._allowed = 0
        return period


# -- classifying failures -----------------------------------------------------

# Errors that say Redis cannot take a decision now, as opposed to a bug or
# a misconfiguration (a wrong password, a missing permission), which must
# stay loud and never open the breaker.
_UNAVAILABLE = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.OutOfMemoryError,
    rx.ReadOnlyError,
    rx.TryAgainError,
    rx.ClusterDownError,
    rx.InvalidResponse,
    asyncio.TimeoutError,
    OSError,
)
_MISCONFIGURED = (
    rx.AuthenticationError,
    getattr(rx, "AuthorizationError", rx.AuthenticationError),
)
# Error codes the client library has no class for.
_UNAVAILABLE_CODES = frozenset(
    ("BUSY", "LOADING", "MASTERDOWN", "MISCONF", "NOREPLICAS", "OOM",
     "READONLY", "TRYAGAIN", "CLUSTERDOWN")
)


def is_unavailable(exc: BaseException) -> bool:
    """Return whether ``exc`` means Redis cannot take decisions now:
    unreachable, too slow, loading, read-only, out of memory or busy."""
    if isinstance(exc, _MISCONFIGURED):
        return False
    if isinstance(exc, _UNAVAILABLE):
        return True
    if isinstance(exc, rx.ResponseError):
        return str(exc).split(" ", 1)[0] in _UNAVAILABLE_CODES
    return False


def retryable(exc: BaseException) -> bool:
    """Return whether a call that failed with ``exc`` is worth one retry on
    a new connection (the old one broke; a loading server or a refused
    login would only fail again)."""
    return isinstance(exc, rx.ConnectionError) and not isinstance(
        exc, (rx.BusyLoadingError, *_MISCONFIGURED)
    )


def describe(exc: BaseException) -> str:
    """Return ``exc`` as one short line for logs and anomaly metadata."""
    text = str(exc).split("\n", 1)[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- the policy's behaviour without Redis -------------------------------------


class Resilience:
    """Deadline, breaker, fail modes and degraded periods of one policy.

    A policy asks :meth:`admit` before each call to Redis, reports the
    outcome with :meth:`on_reply` or :meth:`on_error`, and when a decision
    cannot be made by Redis takes :meth:`rate_limit` or :meth:`start`
    instead. Nothing here does I/O.

    Args:
        rules: the policy's rules (default tier, start bucket).
        timeout: seconds each call to Redis may take, retry included.
        rate_limit_fail_mode: ``closed``, ``open`` or ``local``.
        start_fail_mode: likewise, for service starts.
        replicas: how many replicas share the limits; the local buckets
            hold ``1 / replicas`` of each limit (at least one token).
        breaker_threshold: consecutive failures that open the breaker.
        breaker_cooldown: seconds the breaker stays open before a probe.
        monotonic: a monotonic clock in seconds for the breaker, the local
            buckets and period lengths; tests pass one they move.
        max_users: users whose limit and local buckets are remembered.

    Raises:
        InvalidInputError: an option out of range or an unknown fail mode.
    """

    def __init__(
        self,
        rules: Rules,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        rate_limit_fail_mode: FailMode | str = FailMode.LOCAL,
        start_fail_mode: FailMode | str = FailMode.CLOSED,
        replicas: int = 1,
        breaker_threshold: int = DEFAULT_BREAKER_THRESHOLD,
        breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN,
        monotonic: Optional[Clock] = None,
        max_users: int = MAX_TRACKED_USERS,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.rate_limit_fail_mode = parse_fail_mode(
            rate_limit_fail_mode, "rate_limit_fail_mode"
        )
        self.start_fail_mode = parse_fail_mode(start_fail_mode, "start_fail_mode")
        check_number(replicas, "replicas", low=1, high=MAX_REPLICAS, integer=True)
        check_number(
            breaker_threshold, "breaker_threshold", low=1, high=1e6, integer=True
        )
        check_number(breaker_cooldown, "breaker_cooldown", low=0, high=MAX_COOLDOWN)
        check_number(max_users, "max_users", low=1, high=1e9, integer=True)
        clock = monotonic or time.monotonic

        self.replicas = int(replicas)
        self.default_limit = TIER_LIMITS[rules.default_tier][
            "max_requests_per_minute"
        ]
        self.start_burst = float(rules.start_burst)
        self.start_per_minute = float(rules.start_per_minute)
        self.breaker = CircuitBreaker(
            int(breaker_threshold), float(breaker_cooldown), clock
        )
        self.degraded = DegradedLog(clock)
        self._requests = LocalLimiter(clock, int(max_users))
        self._starts = LocalLimiter(clock, int(max_users))
        self._limits: OrderedDict[str, int] = OrderedDict()
        self._max_users = int(max_users)
        self._last_error = ""
        self._lock = threading.Lock()

    # -- calls to Redis -------------------------------------------------------

    def admit(self, name: str) -> None:
        """Let a call to Redis go ahead, or refuse it while the breaker is
        open.

        Raises:
            RedisUnavailableError: the breaker holds calls back.
        """
        if self.breaker.state is BreakerState.CLOSED:
            return
        with self._lock:
            if self.breaker.allow():
                return
            wait = self.breaker.retry_after()
        raise RedisUnavailableError(
            f"{name}: Redis unavailable, next attempt in {wait:.1f}s"
        )

    def on_reply(self) -> Optional[AnomalyEvent]:
        """Report that Redis answered a call.

        Returns the ``REDIS_UNAVAILABLE`` event to record when this reply
        ends a degraded period, else ``None``.
        """
        breaker = self.breaker
        if (
            breaker.state is BreakerState.CLOSED
            and not breaker.failures
            and not self.degraded.active
        ):
            return None
        with self._lock:
            breaker.record_success()
            period = self.degraded.end(self._last_error)
            if period is not None:
                self._requests.clear()
                self._starts.clear()
        if period is None:
            return None
        logger.warning(
            "Redis answers again after %.1fs; %d decisions were made "
            "without it",
            period.seconds,
            period.decisions,
        )
        return period.event(
            rate_limit_fail_mode=self.rate_limit_fail_mode.value,
            start_fail_mode=self.start_fail_mode.value,
        )

    def on_error(self, exc: BaseException, name: str) -> PactownRedisError:
        """Report a failed call; return the exception the caller raises:
        :class:`RedisUnavailableError` when ``exc`` means Redis cannot
        decide now (counted by the breaker), else :class:`BackendError`
        (a bug or a misconfiguration; the breaker is left as it is)."""
        detail = describe(exc)
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            detail = f"no reply within {self.timeout:g}s"
        if not is_unavailable(exc):
            return BackendError(f"{name} failed: {detail}")
        with self._lock:
            self._last_error = detail
            opened = self.breaker.record_failure()
        if opened:
            logger.warning(
                "Redis failed %d times in a row (last: %s); deciding "
                "without it for %.1fs before trying again",
                self.breaker.failures,
                detail,
                self.breaker.cooldown,
            )
        return RedisUnavailableError(f"{name}: Redis unavailable: {detail}")

    # -- decisions without Redis ----------------------------------------------

    def remember_limit(self, user_id: str, limit: int) -> None:
        """Remember the user's requests per minute, as Redis last said."""
        if limit < 1 or self._limits.get(user_id) == limit:
            # Unchanged, as for nearly every decision: nothing to do. The
            # users kept are therefore those whose limit was learnt last.
            return
        with self._lock:
            self._limits[user_id] = limit
            self._limits.move_to_end(user_id)
            while len(self._limits) > self._max_users:
                self._limits.popitem(last=False)

    def share(self, limit: float, per_minute: float) -> tuple[float, float]:
        """Return this replica's capacity (at least one token) and refill
        per second for a limit of ``limit`` refilled ``per_minute``."""
        return (
            max(1.0, limit / self.replicas),
            per_minute / 60.0 / self.replicas,
        )

    def rate_limit(self, user_id: str, cost: float) -> RateLimitResult:
        """Decide a request without Redis, by ``rate_limit_fail_mode``.

        ``local`` answers from this replica's bucket (``limit``,
        ``remaining`` and the times describe that bucket); ``open`` allows
        and ``closed`` denies, with ``remaining`` 0 and, when denied,
        ``retry_after`` the wait before Redis is tried again.
        """
        mode = self.rate_limit_fail_mode
        with self._lock:
            limit = self._limits.get(user_id, self.default_limit)
            if mode is FailMode.LOCAL:
                capacity, per_second = self.share(limit, limit)
                verdict = self._requests.take(
                    user_id, cost, capacity, per_second
                )
                result = RateLimitResult(
                    verdict.allowed,
                    int(capacity),
                    int(verdict.tokens),
                    verdict.retry_after,
                    verdict.reset_after,
                    degraded=True,
                )
            elif mode is FailMode.OPEN:
                result = RateLimitResult(True, limit, 0, 0.0, 0.0, degraded=True)
            else:
                result = RateLimitResult(
                    False, limit, 0, self._wait(), 0.0, degraded=True
                )
            began = self.degraded.note(result.allowed)
        if began:
            self._log_began()
        return result

    def settle_debits(
        self,
        debits: Sequence[tuple[str, float, Any]],
        replies: Sequence[Any],
        record: Callable[[AnomalyEvent], object],
    ) -> list[RateLimitResult]:
        """Return the results of ``debits`` (user id, cost, ...) from their
        ``replies``, in order, passing each anomaly event to ``record``.

        A reply that is ``None`` or a :class:`RedisUnavailableError` was
        not decided by Redis: its result comes from the fail mode.

        Raises:
            BackendError: a reply is any other error, or has the wrong
                shape; the events of the debits before it are recorded.
        """
        results = []
        for (user_id, cost, *_), reply in zip(debits, replies):
            if reply is None or isinstance(reply, RedisUnavailableError):
                results.append(self.rate_limit(user_id, cost))
                continue
            if isinstance(reply, BaseException):
                raise reply
            result, events = _outcomes.rate_decision(user_id, cost, reply)
            self.remember_limit(user_id, result.limit)
            for event in events:
                record(event)
            results.append(result)
        return results

    def start(self, user_id: str) -> SecurityCheckResult:
        """Decide a service start without Redis, by ``start_fail_mode``.

        Nothing is reserved whatever the answer: ``fence`` is ``None`` and
        the service holds no slot. ``local`` allows within this replica's
        share of the start bucket (the other limits are not checked),
        ``open`` allows, ``closed`` denies.
        """
        mode = self.start_fail_mode
        with self._lock:
            if mode is FailMode.LOCAL:
                capacity, per_second = self.share(
                    self.start_burst, self.start_per_minute
                )
                verdict = self._starts.take(user_id, 1.0, capacity, per_second)
                result = _local_start(verdict)
            elif mode is FailMode.OPEN:
                result = SecurityCheckResult(
                    allowed=True,
                    reason=(
                        "Allowed without the shared policy (Redis "
                        "unavailable): limits not checked, no slot reserved"
                    ),
                    degraded=True,
                )
            else:
                wait = self._wait()
                result = SecurityCheckResult(
                    allowed=False,
                    reason=(
                        "Security policy unavailable (Redis unreachable); "
                        f"nothing reserved. Try again in {wait:.1f}s"
                    ),
                    retry_after=wait,
                    degraded=True,
                )
            began = self.degraded.note(result.allowed)
        if began:
            self._log_began()
        return result

    def _wait(self) -> float:
        return max(self.breaker.retry_after(), self.timeout)

    def _log_began(self) -> None:
        logger.warning(
            "Redis unavailable (%s); deciding without it (rate limits: %s, "
            "starts: %s) until it answers again",
            self._last_error or "breaker open",
            self.rate_limit_fail_mode.value,
            self.start_fail_mode.value,
        )


def _local_start(verdict: LocalVerdict) -> SecurityCheckResult:
    if verdict.allowed:
        return SecurityCheckResult(
            allowed=True,
            reason=(
                "Allowed by this replica's share of the start rate (Redis "
                "unavailable): other limits not checked, no slot reserved"
            ),
            degraded=True,
        )
    return SecurityCheckResult(
        allowed=False,
        reason=(
            "Start rate exceeded (this replica's share while Redis is "
            f"unavailable). Wait {verdict.retry_after:.1f}s"
        ),
        delay_seconds=verdict.retry_after,
        retry_after=verdict.retry_after,
        degraded=True,
    )


# -- clients ------------------------------------------------------------------


def client_options(timeout: float, *, asynchronous: bool = True) -> dict[str, Any]:
    """Return the options of a client a policy makes: connect and socket
    timeouts of ``timeout`` seconds, and no retries inside the client (the
    policy retries once itself, within its deadline)."""
    retry: Any = AsyncRetry if asynchronous else Retry
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": retry(NoBackoff(), 0),
    }


def make_client(
    url: Any,
    *,
    cluster: bool = False,
    asynchronous: bool = True,
    **options: Any,
) -> Any:
    """Return a client for ``url``, from ``redis.asyncio`` or, with
    ``asynchronous=False``, the blocking ``redis``; it speaks RESP3 unless
    ``options`` say otherwise. No connection is opened yet.

    ``url`` names one server, or a Redis Cluster: a ``redis+cluster://``
    (``rediss+cluster://``) URL of any node, a ``redis://`` URL with
    ``cluster=True``, or a list of ``(host, port)`` startup nodes. A
    cluster gets a ``RedisCluster``.

    Raises:
        InvalidInputError: a malformed URL or startup node list.
    """
    options.setdefault("protocol", 3)
    single, many, node = (
        (AsyncRedis, AsyncRedisCluster, AsyncClusterNode)
        if asynchronous
        else (Redis, RedisCluster, ClusterNode)
    )
    if not isinstance(url, str):
        nodes = [node(host, port) for host, port in _cluster.startup_nodes(url)]
        # node and many come from the same flavour, which mypy cannot see.
        return many(startup_nodes=nodes, **options)  # type: ignore[arg-type]
    url, cluster = _cluster.cluster_url(url, cluster)
    try:
        if cluster:
            return many.from_url(url, **options)
        return single.from_url(url, **options)
    except ValueError as exc:
        if "@" in url:
            # The parser's message, and so the cause, may quote part of the
            # password: one with an unescaped '/' is read as host and port.
            raise InvalidInputError(
                "cannot use Redis URL: it does not parse (special "
                "characters in a password must be percent-encoded)"
            ) from None
        raise InvalidInputError(f"cannot use Redis URL: {exc}") from exc


def sentinel_client(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    *,
    timeout: float,
    asynchronous: bool = True,
    **connection: Any,
) -> Any:
    """Return a client for the primary Sentinel names for ``service_name``,
    async or, with ``asynchronous=False``, blocking; it asks the sentinels
    again after a failover.

    ``connection`` goes to the data connections (``password``, ``ssl``...).

    Raises:
        InvalidInputError: ``sentinels`` is not a non-empty list of
            ``(host, port)`` pairs, or ``service_name`` is not text.
    """
    pairs = list(sentinels) if isinstance(sentinels, (list, tuple)) else []
    if not pairs or not all(
        isinstance(pair, (list, tuple))
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], int)
        for pair in pairs
    ):
        raise InvalidInputError(
            f"sentinels must be a list of (host, port) pairs, got {sentinels!r}"
        )
    if not isinstance(service_name, str) or not service_name:
        raise InvalidInputError("service_name must be a non-empty str")
    data = client_options(timeout, asynchronous=asynchronous)
    manager = (AsyncSentinel if asynchronous else Sentinel)(
        [(host, port) for host, port in pairs],
        sentinel_kwargs=client_options(timeout, asynchronous=asynchronous),
        **{**data, "protocol": 3, **connection},
    )
    return manager.master_for(service_name)


def _sentinels_of(client: Any) -> list[Any]:
    """Return the sentinel clients behind a :func:`sentinel_client`
    client; none for any other."""
    manager = getattr(
        getattr(client, "connection_pool", None), "sentinel_manager", None
    )
    return list(getattr(manager, "sentinels", ()))


async def close_client(client: Any) -> None:
    """Close an async client a policy made, and the sentinel connections
    behind it when it came from :func:`sentinel_client`."""
    sentinels = _sentinels_of(client)
    await client.aclose()
    for sentinel in sentinels:
        await sentinel.aclose()


def close_sync_client(client: Any) -> None:
    """Close a blocking client a policy made, as :func:`close_client`."""
    sentinels = _sentinels_of(client)
    client.close()
    for sentinel in sentinels:
        sentinel.close()


# -- the async sender ---------------------------------------------------------


# What a call to Redis may fail with, besides its own error reply.
_FAILURES = (rx.RedisError, OSError, asyncio.TimeoutError)


class AsyncGuard:
    """Sends a policy's script calls through its :class:`Resilience`.

    Calls travel through an :class:`~pactown_redis._pipeline.AutoPipeline`,
    so concurrent calls share round trips. Each call gets the deadline, the
    ``NOSCRIPT`` recovery and at most one retry, on a new connection, after
    a connection error. A call that may have run is sent again only if it
    is replayable (see :class:`~pactown_redis.scripts.ScriptCall`): a start
    of a service that holds a slot takes the ``'running'`` path, renewals,
    releases and profile writes set the same state again. A debit is never
    sent twice; one whose reply was lost fails as Redis being unavailable,
    and the fail mode decides it.

    Args:
        client: a ``redis.asyncio`` client.
        resilience: the policy's breaker and fail modes.
        record: publishes an anomaly event (``REDIS_UNAVAILABLE``).
    """

    def __init__(
        self,
        client: Any,
        resilience: Resilience,
        record: Callable[[AnomalyEvent], Any],
    ) -> None:
        self.resilience = resilience
        self._record = record
        self._pipeline = AutoPipeline(client, self._may_retry)

    async def close(self) -> None:
        """Close the connection the guard's pipeline holds."""
        await self._pipeline.close()

    def _may_retry(self, exc: BaseException, started: float) -> bool:
        deadline = Deadline(started + self.resilience.timeout)
        return retryable(exc) and deadline.allows_retry()

    async def run(self, call: ScriptCall) -> Any:
        """Return the script's reply.

        Raises:
            RedisUnavailableError: the breaker is open, or Redis did not
                answer in time, was unreachable or refused (out of memory,
                read-only, loading, busy).
            BackendError: Redis answered with another error.
        """
        resilience = self.resilience
        resilience.admit(call.script.name)
        try:
            reply = await self._pipeline.call(call, resilience.timeout)
        except _FAILURES as exc:
            raise resilience.on_error(exc, call.script.name) from exc
        self._replied()
        return reply

    async def run_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Return the replies of ``calls`` in order, sent together. A
        call that failed has a :class:`PactownRedisError` in its place
        (as :meth:`run` would raise).

        Raises:
            RedisUnavailableError: the breaker is open, or the batch could
                not be sent and answered in time.
        """
        resilience = self.resilience
        name = calls[0].script.name if calls else "batch"
        resilience.admit(name)
        try:
            replies = await self._pipeline.call_many(calls, resilience.timeout)
        except _FAILURES as exc:
            raise resilience.on_error(exc, name) from exc
        out: list[Any] = []
        answered = False
        for call, reply in zip(calls, replies):
            if isinstance(reply, BaseException):
                reply = resilience.on_error(reply, call.script.name)
            else:
                answered = True
            out.append(reply)
        if answered:
            self._replied()
        return out

    def _replied(self) -> None:
        event = self.resilience.on_reply()
        if event is not None:
            self._record(event)


class SyncGuard:
    """The blocking twin of :class:`AsyncGuard`, for the sync API.

    A blocking client cannot be interrupted mid-call, so the deadline holds
    per socket operation (the client's ``socket_timeout`` and
    ``socket_connect_timeout``, see :func:`client_options` with
    ``asynchronous=False``), and the retry of a replayable call starts only
    while the call's deadline has time left. The client's pool replaces a
    connection the server closed before lending it, so a call that fails
    on its connection may have run: a debit is not sent again.

    Args:
        client: a ``redis.Redis`` client.
        resilience: the policy's breaker and fail modes.
        record: publishes an anomaly event (``REDIS_UNAVAILABLE``).
    """

    def __init__(
        self,
        client: Any,
        resilience: Resilience,
        record: Callable[[AnomalyEvent], Any],
    ) -> None:
        self._client = client
        self.resilience = resilience
        self._record = record

    def run(self, call: ScriptCall, client: Any = None) -> Any:
        """Return the script's reply, sent on ``client`` (by default the
        guard's own).

        Raises:
            RedisUnavailableError: as :meth:`AsyncGuard.run`.
            BackendError: Redis answered with another error.
        """
        resilience = self.resilience
        name = call.script.name
        resilience.admit(name)
        try:
            reply = self._send(call, self._client if client is None else client)
        except (rx.RedisError, OSError) as exc:
            raise resilience.on_error(exc, name) from exc
        event = resilience.on_reply()
        if event is not None:
            self._record(event)
        return reply

    def _send(self, call: ScriptCall, client: Any) -> Any:
        deadline = Deadline.after(self.resilience.timeout)
        try:
            return _evalsha_sync(client, call)
        except rx.ConnectionError as exc:
            if not (call.replayable and retryable(exc) and deadline.allows_retry()):
                raise
        return _evalsha_sync(client, call)

    def run_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Return the replies of ``calls`` in order, sent in one pipeline;
        as :meth:`AsyncGuard.run_many`."""
        resilience = self.resilience
        name = calls[0].script.name if calls else "batch"
        resilience.admit(name)
        deadline = Deadline.after(resilience.timeout)
        try:
            try:
                replies = _pipeline_sync(self._client, calls)
            except rx.ConnectionError as exc:
                replayable = all(call.replayable for call in calls)
                if not (replayable and retryable(exc) and deadline.allows_retry()):
                    raise
                replies = _pipeline_sync(self._client, calls)
        except (rx.RedisError, OSError) as exc:
            raise resilience.on_error(exc, name) from exc
        out: list[Any] = []
        for call, reply in zip(calls, replies):
            if isinstance(reply, BaseException):
                reply = resilience.on_error(reply, call.script.name)
            out.append(reply)
        if len(out) > sum(isinstance(r, BaseException) for r in out):
            event = resilience.on_reply()
            if event is not None:
                self._record(event)
        return out


def _pipeline_sync(client: Any, calls: Sequence[ScriptCall]) -> list[Any]:
    # One round trip for the batch; a call refused with NOSCRIPT did not
    # run and is sent again alone as EVAL, which caches the script.
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command("EVALSHA", *call.evalsha_args())
    replies = pipe.execute(raise_on_error=False)
    for i, reply in enumerate(replies):
        if isinstance(reply, rx.ConnectionError):
            raise reply
        if isinstance(reply, rx.NoScriptError):
            try:
                replies[i] = client.eval(*calls[i].eval_args())
            except rx.ResponseError as exc:
                replies[i] = exc
    return list(replies)


def _evalsha_sync(client: Any, call: ScriptCall) -> Any:
    try:
        return client.evalsha(*call.evalsha_args())
    except rx.NoScriptError:
        # Nothing ran; EVAL runs the script once and caches it again.
        return client.eval(*call.eval_args())
