"""What a decision returns and records, shared by the async and sync APIs.

Pure functions: they turn a script's parsed reply into the result handed
to the caller and the anomaly events to record, and leave sending the
call and publishing the events to the API that uses them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from . import _core
from ._core import AutoBlock, HeldLease, RenewOutcome, Rules, StartOutcome
from ._validate import check_number
from .errors import CorruptProfileError, InvalidInputError
from .keys import KeySpace
from .models import (
    AnomalyEvent,
    AnomalyType,
    RateLimitResult,
    SecurityCheckResult,
    Severity,
    UserProfile,
    UserTier,
    utcnow,
)
from .scripts import ScriptCall, script

MAX_SUMMARY_HOURS = 24 * 365


def make_rules(
    *,
    namespace: str,
    default_rate_limit: Any,
    lease_ttl: Any,
    start_burst: Any,
    stream_maxlen: Any,
    default_tier: UserTier,
    rapid_restart_threshold: int,
    clock: Optional[Callable[[], float]],
) -> Rules:
    """Validate a policy's options and return the rules it decides by.

    Raises:
        InvalidInputError: a bad namespace or a number out of range.
    """
    check_number(
        default_rate_limit, "default_rate_limit", low=0, high=1e8,
        low_open=True,
    )
    check_number(lease_ttl, "lease_ttl", low=0.01, high=86400.0)
    check_number(start_burst, "start_burst", low=1, high=1e6, integer=True)
    check_number(stream_maxlen, "stream_maxlen", low=1, high=1e9, integer=True)
    return Rules(
        keys=KeySpace(namespace),
        default_tier=UserTier(default_tier),
        lease_ms=max(1, int(lease_ttl * 1000)),
        start_burst=start_burst,
        start_per_minute=float(default_rate_limit),
        rapid_threshold=rapid_restart_threshold,
        clock=clock,
    )


def event(
    anomaly_type: AnomalyType,
    details: str,
    *,
    user_id: Optional[str],
    service_id: Optional[str] = None,
    severity: Severity = Severity.MEDIUM,
    metadata: Optional[dict[str, Any]] = None,
) -> AnomalyEvent:
    """Return an anomaly event stamped now."""
    return AnomalyEvent(
        timestamp=utcnow(),
        anomaly_type=anomaly_type,
        user_id=user_id,
        service_id=service_id,
        details=details,
        severity=severity,
        metadata=metadata or {},
    )


def corrupt_event(exc: CorruptProfileError) -> AnomalyEvent:
    """Return the event recorded when a stored profile is unreadable."""
    return event(
        AnomalyType.PROFILE_CORRUPT,
        str(exc),
        user_id=exc.user_id,
        severity=Severity.HIGH,
        metadata={"field": exc.field},
    )


# -- profiles ----------------------------------------------------------------


def checked_profile(profile: Any) -> UserProfile:
    """Return a validated copy of ``profile``.

    Raises:
        InvalidInputError: ``profile`` is not a valid ``UserProfile``.
    """
    if not isinstance(profile, UserProfile):
        raise InvalidInputError(
            f"profile must be a UserProfile, not {type(profile).__name__}"
        )
    return UserProfile.parse(profile.model_dump())


def block_profile(
    user_id: str, blocked: bool, reason: Any, default_tier: UserTier
) -> UserProfile:
    """Return the profile written when blocking or unblocking a user: the
    default tier's, used whole only when the user has no stored profile.

    Raises:
        InvalidInputError: a bad user id or a reason that is not text.
    """
    if not isinstance(reason, str):
        raise InvalidInputError("reason must be str")
    base = UserProfile.from_tier(user_id, default_tier)
    return UserProfile.parse(
        {**base.model_dump(), "blocked": blocked, "reason": reason or None}
    )


BLOCK_FIELDS = ("blocked", "reason")


def profile_call(
    keys: KeySpace, profile: UserProfile, patch: Sequence[str] = ()
) -> ScriptCall:
    """Return the call that stores ``profile`` (only ``patch``'s fields
    when the user already has a profile)."""
    stored = _core.profile_to_hash(profile)
    pairs = [item for pair in stored.items() for item in pair]
    return ScriptCall(
        script("write_profile.lua"),
        (keys.user(profile.user_id).profile,),
        [",".join(patch), *pairs],
    )


# -- request rate ------------------------------------------------------------

#: What a check returns when the user's stored profile is unreadable.
CORRUPT_RATE_RESULT = RateLimitResult(False, 0, 0, float("inf"), 0.0)


def rate_denied_event(
    user_id: str, cost: float, result: RateLimitResult
) -> AnomalyEvent:
    """Return the event recorded when a request is denied."""
    return event(
        AnomalyType.RATE_LIMIT_EXCEEDED,
        "Rate limit exceeded",
        user_id=user_id,
        metadata={"cost": cost, "retry_after": result.retry_after},
    )


def rate_decision(
    user_id: str, cost: float, reply: Any
) -> tuple[RateLimitResult, tuple[AnomalyEvent, ...]]:
    """Return the result of a debit's reply and the events to record: a
    denial's, or a corrupt stored profile's (which denies).

    Raises:
        BackendError: the reply has the wrong shape.
    """
    try:
        result = _core.parse_rate_limit(user_id, reply)
    except CorruptProfileError as exc:
        return CORRUPT_RATE_RESULT, (corrupt_event(exc),)
    if result.allowed:
        return result, ()
    return result, (rate_denied_event(user_id, cost, result),)


#: The most debits one :meth:`check_many` call takes.
MAX_MANY = 10_000


def many_calls(rules: Rules, requests: Any) -> list[tuple[str, float, ScriptCall]]:
    """Validate the requests of a ``check_many`` call and build their
    debits: ``(user_id, cost, call)`` in order.

    Each request is a user id (cost 1) or a ``(user_id, cost)`` pair.

    Raises:
        InvalidInputError: not a list or tuple, too many requests, or a bad
            request, id or cost (nothing is sent then).
    """
    if not isinstance(requests, (list, tuple)):
        raise InvalidInputError(
            f"requests must be a list or tuple, not {type(requests).__name__}"
        )
    if len(requests) > MAX_MANY:
        raise InvalidInputError(
            f"{len(requests)} requests in one call; the limit is {MAX_MANY}"
        )
    built = []
    for number, request in enumerate(requests):
        if isinstance(request, str):
            user_id, cost = request, 1.0
        elif isinstance(request, tuple) and len(request) == 2:
            user_id, cost = request
        else:
            raise InvalidInputError(
                f"request {number} must be a user id or a (user_id, cost) "
                f"pair, not {request!r:.80}"
            )
        call = _core.rate_limit_call(rules, user_id, cost)
        built.append((user_id, float(cost), call))
    return built


# -- service starts ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Strike:
    """One offence to count against ``user_id`` by sending ``call``."""

    user_id: str
    call: ScriptCall
    auto_block: AutoBlock

    def blocked_event(self, reply: Any) -> Optional[AnomalyEvent]:
        """Return the ``USER_AUTO_BLOCKED`` event when the reply to
        ``call`` says this strike blocked the user, else ``None``.

        Raises:
            BackendError: the reply has the wrong shape.
        """
        outcome = _core.parse_strike(reply)
        if not outcome.blocked:
            return None
        return _core.auto_block_event(self.user_id, outcome, self.auto_block)


@dataclass(frozen=True, slots=True)
class Decision:
    """A start's result, the events to record (in order), the strikes
    to count after them and, when granted, the lease the policy now
    holds."""

    result: SecurityCheckResult
    events: tuple[AnomalyEvent, ...] = ()
    lease: Optional[HeldLease] = None
    strikes: tuple[Strike, ...] = ()


@dataclass(frozen=True, slots=True)
class StartCheck:
    """A service start to check: the call to send, and what its outcome
    decides. Built by :func:`start_check`."""

    rules: Rules
    auto_block: Optional[AutoBlock]
    user_id: str
    service_id: str
    memory_mb: float
    cpu_percent: float
    excess: float
    delay: float
    call: ScriptCall

    def decide(self, outcome: StartOutcome) -> Decision:
        """Return the decision for the call's outcome, with the strikes
        its events count when automatic blocking is on. Attempts refused
        because the user is blocked count none, so a block does not feed
        itself."""
        user_id, service_id = self.user_id, self.service_id
        if outcome.status == "corrupt":
            decision = corrupt_start(user_id, outcome.detail)
        elif not outcome.allowed:
            decision = denied_start(outcome, user_id, service_id)
        else:
            decision = granted_start(
                outcome,
                user_id,
                service_id,
                memory_mb=self.memory_mb,
                cpu_percent=self.cpu_percent,
                excess=self.excess,
                delay=self.delay,
                rules=self.rules,
            )
        auto_block = self.auto_block
        if auto_block is None or outcome.status in ("blocked", "autoblocked"):
            return decision
        strikes = tuple(
            Strike(
                user_id,
                _core.strike_call(
                    self.rules, auto_block, user_id, secrets.token_hex(8)
                ),
                auto_block,
            )
            for recorded in decision.events
            if auto_block.counts(recorded)
        )
        return Decision(decision.result, decision.events, decision.lease, strikes)


def start_check(
    rules: Rules,
    auto_block: Optional[AutoBlock],
    user_id: str,
    service_id: str,
    port: Optional[int],
    memory_mb: float,
    cpu_percent: float,
    *,
    excess: float,
    delay: float,
) -> StartCheck:
    """Return the check of one start. ``excess`` is how far this replica
    is over its load thresholds, ``delay`` the wait asked for it.

    Raises:
        InvalidInputError: a bad id, port (1-65535), memory or CPU.
    """
    call = _core.start_call(
        rules,
        user_id,
        service_id,
        port=port,
        memory_mb=memory_mb,
        cpu_percent=cpu_percent,
        overloaded=excess > 0,
    )
    return StartCheck(
        rules,
        auto_block,
        user_id,
        service_id,
        memory_mb,
        cpu_percent,
        excess,
        delay,
        call,
    )


def corrupt_start(user_id: str, field: str) -> Decision:
    """Return the decision for a start refused by a corrupt profile."""
    recorded = corrupt_event(CorruptProfileError(user_id, field))
    return Decision(
        SecurityCheckResult(
            allowed=False,
            reason="Stored user profile is corrupt. Contact support.",
            anomaly=recorded,
        ),
        (recorded,),
    )


#: Denials of a start whose reply says how long until it can succeed.
TIMED_DENIALS = frozenset({"autoblocked", "rate", "hourly"})


def denied_start(
    outcome: StartOutcome, user_id: str, service_id: str
) -> Decision:
    """Return the decision for a start a check refused."""
    denial = _core.describe_denial(outcome, user_id)
    retry = outcome.retry_after if outcome.status in TIMED_DENIALS else None
    recorded = event(
        denial.anomaly_type,
        denial.details,
        user_id=user_id,
        service_id=service_id,
        severity=denial.severity,
        metadata={
            "check": outcome.status,
            "used": outcome.used,
            "limit": outcome.limit,
            "asked": outcome.asked,
        },
    )
    return Decision(
        SecurityCheckResult(
            allowed=False,
            reason=denial.reason,
            delay_seconds=retry or 0.0,
            retry_after=retry,
            anomaly=recorded,
        ),
        (recorded,),
    )


def granted_start(
    outcome: StartOutcome,
    user_id: str,
    service_id: str,
    *,
    memory_mb: float,
    cpu_percent: float,
    excess: float,
    delay: float,
    rules: Rules,
) -> Decision:
    """Return the decision for a start that reserved (or renewed) a slot.

    ``excess`` is how far this replica is over its load thresholds and
    ``delay`` the wait asked of the user for it.
    """
    expiry_ms, rapid = outcome.lease()
    lease = HeldLease(
        outcome.fence, expiry_ms, float(memory_mb), float(cpu_percent)
    )
    events = []
    reason = None
    if excess > 0:
        reason = f"Server under load, start delayed by {delay:.1f}s"
        events.append(
            event(
                AnomalyType.SERVER_OVERLOADED,
                f"Server overloaded, throttling user {user_id}",
                user_id=user_id,
                service_id=service_id,
                metadata={"excess_percent": excess, "delay": delay},
            )
        )
    if rapid >= rules.rapid_threshold and outcome.status == "ok":
        events.append(
            event(
                AnomalyType.RAPID_RESTART,
                f"Rapid restart pattern ({rapid} starts in 60s)",
                user_id=user_id,
                service_id=service_id,
                metadata={"starts_last_minute": rapid},
            )
        )
    return Decision(
        SecurityCheckResult(
            allowed=True,
            reason=reason,
            delay_seconds=delay,
            anomaly=events[-1] if events else None,
            fence=outcome.fence,
            already_running=outcome.status == "running",
        ),
        tuple(events),
        lease,
    )


# -- leases --------------------------------------------------------------------


def renewed_lease(outcome: RenewOutcome, held: Optional[HeldLease]) -> HeldLease:
    """Return what is held after a successful renewal of ``held``."""
    memory = held.memory_mb if held else 0.0
    cpu = held.cpu_percent if held else 0.0
    return HeldLease(outcome.fence, outcome.expiry_ms, memory, cpu)


#: Lost leases whose fence a policy remembers until they are unregistered.
MAX_LOST_FENCES = 10_000


class LostFences:
    """Fences of leases a policy found lost, by ``(user_id, service_id)``.

    Each is kept until its service is unregistered or held again, so that
    unregistering a service whose lease was lost frees that lease only and
    never the slot a newer holder took for the same service. At most
    ``limit`` are kept; past it the oldest loss is forgotten, as its
    service was most likely stopped long ago. Not thread-safe: a policy
    that shares it between threads holds its own lock around each call.
    """

    def __init__(self, limit: int = MAX_LOST_FENCES) -> None:
        self._limit = limit
        self._fences: dict[tuple[str, str], int] = {}

    def remember(self, user_id: str, service_id: str, fence: int) -> None:
        """Keep ``fence`` as the lost lease of ``service_id``, newest last."""
        key = (user_id, service_id)
        self._fences.pop(key, None)
        self._fences[key] = fence
        if len(self._fences) > self._limit:
            del self._fences[next(iter(self._fences))]

    def forget(self, user_id: str, service_id: str) -> None:
        """Drop what is kept for ``service_id``, if anything."""
        self._fences.pop((user_id, service_id), None)

    def release_fence(
        self, user_id: str, service_id: str, held: Optional[HeldLease]
    ) -> Optional[int]:
        """Return the fence a release of ``service_id`` must name: the held
        lease's, else the lost lease's, else None (whichever lease holds
        it)."""
        if held is not None:
            return held.fence
        return self._fences.get((user_id, service_id))


def lease_lost_event(user_id: str, service_id: str) -> AnomalyEvent:
    """Return the event recorded when a held lease is found lost."""
    return event(
        AnomalyType.LEASE_LOST,
        "Lease lost: it expired or was taken before renewal",
        user_id=user_id,
        service_id=service_id,
        severity=Severity.HIGH,
    )


# -- reading -------------------------------------------------------------------


def summary_span_ms(hours: Any) -> int:
    """Return the length of a summary of the last ``hours``, in ms.

    Raises:
        InvalidNumberError: ``hours`` is not in (0, one year].
    """
    check_number(hours, "hours", low=0, high=MAX_SUMMARY_HOURS, low_open=True)
    return int(hours * 3_600_000)
