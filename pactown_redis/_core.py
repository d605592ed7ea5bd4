"""Policy logic shared by the async and the sync API.

Builds each script call and reads each reply; performs no I/O, so the two
APIs differ only in how they send a call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable, Mapping, Optional, Sequence

from ._validate import check_id, check_number
from .errors import BackendError, CorruptProfileError
from .keys import KeySpace, UserKeys
from .models import (
    MAX_ALLOWED_PORTS,
    MAX_REASON_CHARS,
    TIER_LIMITS,
    AnomalyEvent,
    AnomalyType,
    RateLimitResult,
    Severity,
    UserProfile,
    UserTier,
    finite_or_inf,
    utcnow,
)
from .scripts import PackedArgs, ScriptCall, script

HOUR_MS = 3_600_000

#: Seconds a call to Redis may take, retry included, unless a policy says
#: otherwise.
DEFAULT_TIMEOUT = 0.25
MAX_COST = 1e9
MAX_MEMORY_MB = float(1 << 30)
MAX_CPU_PERCENT = 1e6
MAX_BLOCK_S = 30 * 86400.0

# Profile fields as stored in the profile hash, next to the model's names.
_PROFILE_FIELDS = (
    ("conc", "max_concurrent_services"),
    ("mem", "max_memory_mb"),
    ("cpu", "max_cpu_percent"),
    ("rpm", "max_requests_per_minute"),
    ("sph", "max_services_per_hour"),
)
_STORED_NAME = {
    **{name: short for short, name in _PROFILE_FIELDS},
    "allowed_ports": "ports",
}
# Stored numbers are plain ASCII digits and ports ',p1,p2,...,' (or '*'),
# exactly as common.lua's read_profile accepts them.
_DIGITS = re.compile(r"[0-9]+")
_PORTS = re.compile(r",(?:[0-9]+,)*")
_TIERS = frozenset(tier.value for tier in UserTier)


def _field_bounds(name: str) -> tuple[float, float]:
    low, high = -math.inf, math.inf
    for rule in UserProfile.model_fields[name].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high


# The bounds a stored number must keep: the model's own, checked here so
# that the first bad field is named in the scripts' order.
_BOUNDS = {name: _field_bounds(name) for _, name in _PROFILE_FIELDS}


def text(value: Any) -> str:
    """Decode a reply element, whichever RESP version or decoding is on."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    return str(value)


@dataclass(frozen=True, slots=True)
class Rules:
    """The configuration every decision is made with."""

    keys: KeySpace
    default_tier: UserTier
    lease_ms: int
    start_burst: int
    start_per_minute: float
    rapid_window_ms: int = 60_000
    rapid_threshold: int = 5
    fence_grace_ms: int = HOUR_MS
    clock: Optional[Callable[[], float]] = field(default=None)

    def now_arg(self) -> str:
        """Return the clock override argument: '' means the server's TIME."""
        if self.clock is None:
            return ""
        return str(int(self.clock() * 1_000_000))

    def default_args(self) -> tuple[str, ...]:
        """Return the default tier's numbers and name, as scripts take them."""
        return _tier_args(self.default_tier)


@cache
def _tier_args(tier: UserTier) -> tuple[str, ...]:
    # Sent with every decision and the same each time: built once per tier.
    limits = TIER_LIMITS[tier]
    return (*(str(limits[name]) for _, name in _PROFILE_FIELDS), tier.value)


# -- profiles --------------------------------------------------------------


def profile_to_hash(profile: UserProfile) -> dict[str, str]:
    """Return the fields of a profile as stored in its hash."""
    stored = {
        short: str(getattr(profile, name)) for short, name in _PROFILE_FIELDS
    }
    ports = profile.allowed_ports
    stored["ports"] = "*" if ports is None else (
        "," + "".join(f"{p}," for p in ports)
    )
    stored["tier"] = profile.tier.value
    stored["blocked"] = "1" if profile.blocked else "0"
    stored["reason"] = profile.reason or ""
    return stored


def hash_to_profile(
    user_id: str, raw: Mapping[Any, Any], rules: Rules
) -> UserProfile:
    """Rebuild a profile from its hash; an empty hash is the default tier.

    The stored grammar is the one ``read_profile`` in ``common.lua``
    enforces, so Python and the scripts agree on which profiles are usable.
    A reason that is too long or not UTF-8 is cut or mended, not refused:
    it limits nothing.

    Raises:
        CorruptProfileError: the hash was not written by this package; its
            ``field`` is the stored field's name, as the scripts report it.
    """
    if not raw:
        return UserProfile.from_tier(user_id, rules.default_tier)
    stored = {text(k): text(v) for k, v in raw.items()}
    data: dict[str, Any] = {"user_id": user_id}
    for short, name in _PROFILE_FIELDS:
        number = _stored_int(stored.get(short, ""))
        low, high = _BOUNDS[name]
        if number is None or not low <= number <= high:
            raise CorruptProfileError(user_id, short)
        data[name] = number
    data["allowed_ports"] = _stored_ports(user_id, stored.get("ports", ""))
    if stored.get("blocked") not in ("0", "1"):
        raise CorruptProfileError(user_id, "blocked")
    if stored.get("tier") not in _TIERS:
        raise CorruptProfileError(user_id, "tier")
    data["blocked"] = stored["blocked"] == "1"
    reason = stored.get("reason", "").encode("utf-8", "surrogateescape")
    data["reason"] = reason.decode("utf-8", "replace")[:MAX_REASON_CHARS] or None
    data["tier"] = stored.get("tier", "")
    try:
        return UserProfile.model_validate(data)
    except ValueError as exc:
        raise CorruptProfileError(user_id, _first_error_field(exc)) from exc


def _stored_int(value: str) -> Optional[int]:
    if not _DIGITS.fullmatch(value):
        return None
    try:
        return int(value)
    except ValueError:  # more digits than int() converts
        return None


def _stored_ports(user_id: str, value: str) -> Optional[list[int]]:
    if value == "*":
        return None
    ports = [_stored_int(p) for p in value.split(",") if p]
    if (
        not _PORTS.fullmatch(value)
        or len(ports) > MAX_ALLOWED_PORTS
        or not all(p is not None and 1 <= p <= 65535 for p in ports)
    ):
        raise CorruptProfileError(user_id, "ports")
    return [p for p in ports if p is not None]


def _first_error_field(exc: ValueError) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        for error in errors():
            if error.get("loc"):
                name = str(error["loc"][0])
                return _STORED_NAME.get(name, name)
    return "?"


# -- request rate ------------------------------------------------------------


def rate_limit_call(rules: Rules, user_id: str, cost: float) -> ScriptCall:
    """Return the call that debits ``cost`` from the user's request bucket.

    The call is not replayable: sent twice, it would debit twice.

    Raises:
        InvalidInputError: bad user id or cost.
    """
    keys = rules.keys.user(user_id)
    cost = check_number(cost, "cost", low=0, high=MAX_COST, low_open=True)
    return ScriptCall(
        script("rate_limit.lua"),
        (keys.profile, keys.requests),
        (rules.now_arg(), repr(cost)),
        _rate_tail(rules.default_tier),
        replayable=False,
    )


@cache
def _rate_tail(tier: UserTier) -> PackedArgs:
    # The same on every debit of a policy: encoded once.
    return PackedArgs.of(_tier_args(tier))


def parse_rate_limit(user_id: str, reply: Sequence[Any]) -> RateLimitResult:
    """Read the reply of ``rate_limit.lua``.

    Raises:
        CorruptProfileError: the user's stored profile is unreadable.
        BackendError: the reply has the wrong shape.
    """
    status = _status(reply, 5)
    if status == "corrupt":
        raise CorruptProfileError(user_id, text(reply[1]))
    return RateLimitResult(
        allowed=status == "ok",
        limit=int(reply[1]),
        remaining=int(reply[2]),
        # float() reads bytes and str alike, whatever the client decodes.
        retry_after=finite_or_inf(float(reply[3])),
        reset_after=float(reply[4]),
    )


def _status(reply: Any, length: int) -> str:
    if not isinstance(reply, (list, tuple)) or len(reply) < length:
        raise BackendError(f"unexpected script reply: {reply!r}")
    return text(reply[0])


# -- service starts ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartOutcome:
    """The reply of ``start_service.lua``, typed."""

    status: str
    fence: int
    retry_after: float
    used: str
    limit: str
    asked: str
    detail: str

    @property
    def allowed(self) -> bool:
        return self.status in ("ok", "running")

    def lease(self) -> tuple[int, int]:
        """Return (expiry in ms, starts within the rapid window)."""
        expiry, rapid = self.detail.split()
        return int(float(expiry)), int(rapid)


def start_call(
    rules: Rules,
    user_id: str,
    service_id: str,
    *,
    port: Optional[int],
    memory_mb: float,
    cpu_percent: float,
    overloaded: bool,
) -> ScriptCall:
    """Return the call that checks and reserves a service start.

    Raises:
        InvalidInputError: a bad id, port, memory or CPU value.
    """
    keys = rules.keys.user(user_id)
    check_id(service_id, "service_id")
    port_arg = ""
    if port is not None:
        port_arg = str(
            int(check_number(port, "port", low=1, high=65535, integer=True))
        )
    memory = check_number(memory_mb, "memory_mb", low=0, high=MAX_MEMORY_MB)
    cpu = check_number(cpu_percent, "cpu_percent", low=0, high=MAX_CPU_PERCENT)
    return ScriptCall(
        script("start_service.lua"),
        (
            keys.profile,
            keys.starts_rate,
            keys.leases,
            keys.lease_meta,
            keys.starts,
            keys.fence,
            keys.auto_block,
        ),
        [
            rules.now_arg(),
            *rules.default_args(),
            service_id,
            port_arg,
            repr(memory),
            repr(cpu),
            str(rules.lease_ms),
            str(rules.start_burst),
            repr(float(rules.start_per_minute)),
            "1" if overloaded else "0",
            str(HOUR_MS),
            str(rules.rapid_window_ms),
            str(rules.fence_grace_ms),
        ],
    )


def parse_start(reply: Sequence[Any]) -> StartOutcome:
    """Read the reply of ``start_service.lua``.

    Raises:
        BackendError: the reply has the wrong shape.
    """
    status = _status(reply, 7)
    return StartOutcome(
        status=status,
        fence=int(reply[1]),
        retry_after=float(text(reply[2])),
        used=text(reply[3]),
        limit=text(reply[4]),
        asked=text(reply[5]),
        detail=text(reply[6]),
    )


@dataclass(frozen=True, slots=True)
class Denial:
    """How a denied start reads to the user and in the anomaly log."""

    reason: str
    anomaly_type: AnomalyType
    severity: Severity
    details: str


def _num(value: str) -> str:
    """Format a number from a reply without a needless '.0'."""
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


def describe_denial(outcome: StartOutcome, user_id: str) -> Denial:
    """Return the reason and anomaly of a denied start."""
    used, limit, asked = outcome.used, outcome.limit, outcome.asked
    status = outcome.status
    if status == "blocked":
        why = outcome.detail or "No reason provided"
        return Denial(
            f"User blocked: {why}",
            AnomalyType.UNAUTHORIZED_ACCESS,
            Severity.HIGH,
            f"Blocked user {user_id} attempted to start a service",
        )
    if status == "autoblocked":
        return Denial(
            "User temporarily blocked after repeated violations. "
            f"Retry in {ceil_seconds(outcome.retry_after)}s",
            AnomalyType.UNAUTHORIZED_ACCESS,
            Severity.HIGH,
            f"Automatically blocked user {user_id} attempted to start "
            "a service",
        )
    if status == "rate":
        return Denial(
            f"Rate limit exceeded. Wait {tenths_up(outcome.retry_after):.1f}s",
            AnomalyType.RATE_LIMIT_EXCEEDED,
            Severity.MEDIUM,
            "Rate limit exceeded for service starts",
        )
    if status == "concurrent":
        return Denial(
            f"Max concurrent services reached ({used}/{limit}). "
            "Stop a service first.",
            AnomalyType.CONCURRENT_LIMIT_EXCEEDED,
            Severity.MEDIUM,
            f"Max {limit} services",
        )
    if status == "hourly":
        return Denial(
            f"Hourly service limit reached ({used}/{limit}). "
            "Try again later.",
            AnomalyType.HOURLY_LIMIT_EXCEEDED,
            Severity.MEDIUM,
            f"Max {limit} service starts per hour",
        )
    if status == "port":
        return Denial(
            f"Port {asked} not allowed for your account",
            AnomalyType.UNAUTHORIZED_ACCESS,
            Severity.HIGH,
            f"Attempted to use restricted port {asked}",
        )
    if status == "memory":
        return Denial(
            f"Memory limit exceeded ({_num(used)} + {_num(asked)} > "
            f"{_num(limit)} MB). Stop a service first.",
            AnomalyType.MEMORY_LIMIT_EXCEEDED,
            Severity.MEDIUM,
            f"Memory quota of {_num(limit)} MB exceeded",
        )
    if status == "cpu":
        return Denial(
            f"CPU limit exceeded ({_num(used)} + {_num(asked)} > "
            f"{_num(limit)}%). Stop a service first.",
            AnomalyType.CPU_LIMIT_EXCEEDED,
            Severity.MEDIUM,
            f"CPU quota of {_num(limit)}% exceeded",
        )
    if status == "overloaded":
        return Denial(
            "Server is currently overloaded. Please try again later.",
            AnomalyType.SERVER_OVERLOADED,
            Severity.MEDIUM,
            f"Server overloaded, start denied for {user_id}",
        )
    raise BackendError(f"unknown start status {status!r}")


# -- automatic blocking ------------------------------------------------------

#: Anomalies that never count as a strike: they report the system, not
#: something the user did.
NOT_STRIKES = frozenset(
    {
        AnomalyType.LEASE_LOST,
        AnomalyType.PROFILE_CORRUPT,
        AnomalyType.USER_AUTO_BLOCKED,
    }
)
STRIKE_SEVERITIES = frozenset({Severity.HIGH, Severity.CRITICAL})


@dataclass(frozen=True, slots=True)
class AutoBlock:
    """When offences block a user's starts by themselves.

    ``threshold`` high-severity anomalies of a user within ``window_ms``
    block the user's service starts for ``duration_ms``.
    """

    threshold: int
    window_ms: int
    duration_ms: int

    @classmethod
    def from_options(
        cls, threshold: Any, window: Any, duration: Any
    ) -> Optional["AutoBlock"]:
        """Return the setting for the policy options, ``None`` when off.

        ``window`` and ``duration`` are in seconds.

        Raises:
            InvalidNumberError: a threshold that is not an int of 1 to
                10 000, or a window or duration not in (0 s, 30 days].
        """
        check_number(window, "auto_block_window", low=0, high=MAX_BLOCK_S,
                     low_open=True)
        check_number(duration, "auto_block_duration", low=0,
                     high=MAX_BLOCK_S, low_open=True)
        if threshold is None:
            return None
        check_number(threshold, "auto_block_threshold", low=1, high=10_000,
                     integer=True)
        return cls(
            threshold=int(threshold),
            window_ms=max(1, math.ceil(window * 1000)),
            duration_ms=max(1, math.ceil(duration * 1000)),
        )

    def counts(self, event: AnomalyEvent) -> bool:
        """Return whether ``event`` is a strike against its user."""
        return (
            event.user_id is not None
            and event.severity in STRIKE_SEVERITIES
            and event.anomaly_type not in NOT_STRIKES
        )


@dataclass(frozen=True, slots=True)
class StrikeOutcome:
    """The reply of ``strike.lua``, typed."""

    blocked: bool
    strikes: int
    blocked_for: float


def strike_call(
    rules: Rules, auto_block: AutoBlock, user_id: str, strike_id: str
) -> ScriptCall:
    """Return the call that counts one strike against ``user_id``."""
    keys = rules.keys.user(user_id)
    return ScriptCall(
        script("strike.lua"),
        (keys.strikes, keys.auto_block),
        [
            rules.now_arg(),
            strike_id,
            str(auto_block.threshold),
            str(auto_block.window_ms),
            str(auto_block.duration_ms),
        ],
    )


def parse_strike(reply: Sequence[Any]) -> StrikeOutcome:
    """Read the reply of ``strike.lua``.

    Raises:
        BackendError: the reply has the wrong shape.
    """
    if not isinstance(reply, (list, tuple)) or len(reply) != 3:
        raise BackendError(f"unexpected script reply: {reply!r}")
    return StrikeOutcome(
        blocked=int(reply[0]) == 1,
        strikes=int(reply[1]),
        blocked_for=float(text(reply[2])),
    )


def auto_block_event(
    user_id: str, outcome: StrikeOutcome, auto_block: AutoBlock
) -> AnomalyEvent:
    """Return the event recorded when strikes block a user."""
    window_s = auto_block.window_ms / 1000
    return AnomalyEvent(
        timestamp=utcnow(),
        anomaly_type=AnomalyType.USER_AUTO_BLOCKED,
        user_id=user_id,
        details=(
            f"User {user_id} blocked for {outcome.blocked_for:g}s after "
            f"{outcome.strikes} violations within {window_s:g}s"
        ),
        severity=Severity.HIGH,
        metadata={
            "strikes": outcome.strikes,
            "window_seconds": window_s,
            "blocked_seconds": outcome.blocked_for,
        },
    )


# -- leases --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldLease:
    """What a replica remembers of a lease it holds."""

    fence: int
    expiry_ms: int
    memory_mb: float
    cpu_percent: float


@dataclass(frozen=True, slots=True)
class RenewOutcome:
    """One lease's result from ``renew_leases.lua``."""

    service_id: str
    status: str
    fence: int
    expiry_ms: int


def renew_call(
    rules: Rules,
    user_id: str,
    leases: Mapping[str, Optional[HeldLease]],
) -> ScriptCall:
    """Return the call that renews ``leases`` (service id -> what is held).

    A ``None`` value renews a live lease without being able to restore it.
    """
    keys = rules.keys.user(user_id)
    args = [rules.now_arg(), str(rules.lease_ms), str(rules.fence_grace_ms)]
    for service_id, held in leases.items():
        check_id(service_id, "service_id")
        if held is None:
            args += [service_id, "", "", "0", "0"]
        else:
            args += [
                service_id,
                str(held.fence),
                str(held.expiry_ms),
                repr(held.memory_mb),
                repr(held.cpu_percent),
            ]
    return ScriptCall(
        script("renew_leases.lua"),
        (keys.leases, keys.lease_meta, keys.fence),
        args,
    )


def parse_renew(
    service_ids: Sequence[str], reply: Sequence[Any]
) -> list[RenewOutcome]:
    """Read the reply of ``renew_leases.lua``.

    Raises:
        BackendError: the reply has the wrong shape.
    """
    if not isinstance(reply, (list, tuple)) or len(reply) != 3 * len(
        service_ids
    ):
        raise BackendError(f"unexpected script reply: {reply!r}")
    return [
        RenewOutcome(
            service_id=sid,
            status=text(reply[3 * i]),
            fence=int(reply[3 * i + 1]),
            expiry_ms=int(float(text(reply[3 * i + 2]))),
        )
        for i, sid in enumerate(service_ids)
    ]


def release_call(
    rules: Rules, user_id: str, service_id: str, fence: Optional[int]
) -> ScriptCall:
    """Return the call that frees a slot (only ``fence``'s, if given)."""
    keys = rules.keys.user(user_id)
    check_id(service_id, "service_id")
    return ScriptCall(
        script("release_service.lua"),
        (keys.leases, keys.lease_meta, keys.fence),
        [
            rules.now_arg(),
            str(rules.fence_grace_ms),
            service_id,
            "" if fence is None else str(fence),
        ],
    )


# -- inspection ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A live lease as seen in Redis."""

    service_id: str
    expires_in: float
    fence: int
    memory_mb: float
    cpu_percent: float


@dataclass(frozen=True, slots=True)
class UserState:
    """A user's live state, read in one step.

    Attributes:
        tokens: request tokens available now.
        start_tokens: start-rate tokens available now.
        started_last_hour: starts within the last hour.
        leases: the live leases, soonest expiry first.
    """

    tokens: float
    start_tokens: float
    started_last_hour: int
    leases: tuple[LeaseInfo, ...]

    @property
    def running(self) -> int:
        return len(self.leases)


def inspect_call(rules: Rules, user_id: str) -> ScriptCall:
    """Return the call that reads a user's live state."""
    keys: UserKeys = rules.keys.user(user_id)
    return ScriptCall(
        script("inspect_user.lua"),
        (
            keys.profile,
            keys.requests,
            keys.starts_rate,
            keys.leases,
            keys.lease_meta,
            keys.starts,
        ),
        [
            rules.now_arg(),
            *rules.default_args(),
            str(rules.start_burst),
            repr(float(rules.start_per_minute)),
            str(HOUR_MS),
        ],
    )


def parse_inspect(user_id: str, reply: Sequence[Any]) -> UserState:
    """Read the reply of ``inspect_user.lua``.

    Raises:
        CorruptProfileError: the user's stored profile is unreadable.
        BackendError: the reply has the wrong shape.
    """
    status = _status(reply, 2)
    if status == "corrupt":
        raise CorruptProfileError(user_id, text(reply[1]))
    now_ms = float(text(reply[4]))
    rest = reply[5:]
    leases = tuple(
        LeaseInfo(
            service_id=text(rest[i]),
            expires_in=max(0.0, (float(text(rest[i + 1])) - now_ms) / 1000),
            fence=int(float(text(rest[i + 2]))),
            memory_mb=float(text(rest[i + 3])),
            cpu_percent=float(text(rest[i + 4])),
        )
        for i in range(0, len(rest), 5)
    )
    return UserState(
        tokens=float(text(reply[1])),
        start_tokens=float(text(reply[2])),
        started_last_hour=int(reply[3]),
        leases=leases,
    )


def tenths_up(seconds: float) -> float:
    """Round a wait up to tenths of a second: a user told to wait less
    than needed only earns another refusal."""
    return max(0.0, math.ceil(seconds * 10 - 1e-9) / 10)


def ceil_seconds(seconds: float) -> int:
    """Round a wait up to whole seconds (at least 0)."""
    return max(0, math.ceil(seconds))
