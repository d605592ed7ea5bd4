"""The values pactown-redis takes and returns: tiers, profiles, results and
anomaly events."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from ._validate import check_id
from .errors import InvalidInputError

__all__ = [
    "TIER_LIMITS",
    "AnomalyEvent",
    "AnomalyType",
    "RateLimitResult",
    "SecurityCheckResult",
    "Severity",
    "UserProfile",
    "UserTier",
]


class UserTier(str, Enum):
    """Account tiers, from least to most capacity."""

    FREE = "free"
    BASIC = "basic"
    PRO = "pro"
    ENTERPRISE = "enterprise"
    ADMIN = "admin"


class AnomalyType(str, Enum):
    """What an anomaly event records."""

    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    CONCURRENT_LIMIT_EXCEEDED = "concurrent_limit_exceeded"
    MEMORY_LIMIT_EXCEEDED = "memory_limit_exceeded"
    CPU_LIMIT_EXCEEDED = "cpu_limit_exceeded"
    SERVER_OVERLOADED = "server_overloaded"
    REDIS_UNAVAILABLE = "redis_unavailable"
    SUSPICIOUS_PATTERN = "suspicious_pattern"
    UNAUTHORIZED_ACCESS = "unauthorized_access"
    RESOURCE_EXHAUSTION = "resource_exhaustion"
    RAPID_RESTART = "rapid_restart"
    PORT_SCAN_DETECTED = "port_scan_detected"
    HOURLY_LIMIT_EXCEEDED = "hourly_limit_exceeded"
    LEASE_LOST = "lease_lost"
    PROFILE_CORRUPT = "profile_corrupt"
    USER_AUTO_BLOCKED = "user_auto_blocked"


class Severity(str, Enum):
    """How urgent an anomaly is."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


#: Limits of each tier: concurrent services, memory MB, CPU %,
#: requests per minute, service starts per hour.
TIER_LIMITS: dict[UserTier, dict[str, int]] = {
    tier: dict(
        zip(
            (
                "max_concurrent_services",
                "max_memory_mb",
                "max_cpu_percent",
                "max_requests_per_minute",
                "max_services_per_hour",
            ),
            numbers,
        )
    )
    for tier, numbers in {
        UserTier.FREE: (2, 256, 25, 20, 5),
        UserTier.BASIC: (5, 512, 50, 60, 20),
        UserTier.PRO: (10, 2048, 80, 120, 50),
        UserTier.ENTERPRISE: (50, 8192, 100, 500, 200),
        UserTier.ADMIN: (100, 16384, 100, 1000, 1000),
    }.items()
}

# Upper bounds keep every stored number far inside a double's exact range
# and reject limits that can only be typing mistakes.
_Count = Annotated[int, Field(strict=True, ge=0, le=1_000_000)]
_Rate = Annotated[int, Field(strict=True, ge=1, le=100_000_000)]
_Megabytes = Annotated[int, Field(strict=True, ge=0, le=1 << 30)]
_Percent = Annotated[int, Field(strict=True, ge=0, le=1_000_000)]
_Port = Annotated[int, Field(strict=True, ge=1, le=65535)]

MAX_REASON_CHARS = 500
MAX_ALLOWED_PORTS = 1024


class UserProfile(BaseModel):
    """A user's limits and standing, shared by every replica through Redis.

    Build one from a tier with :meth:`from_tier` and adjust fields as
    needed. Numbers must be ints (``True`` or ``"5"`` are refused).
    ``allowed_ports=None`` allows any port; an empty list allows none.

    Raises:
        InvalidInputError: from :meth:`from_tier` and :meth:`parse` when a
            field is missing or out of range (pydantic's ``ValidationError``
            when the constructor is called directly).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    user_id: str
    tier: UserTier = UserTier.FREE
    max_concurrent_services: _Count = 2
    max_memory_mb: _Megabytes = 256
    max_cpu_percent: _Percent = 25
    max_requests_per_minute: _Rate = 20
    max_services_per_hour: _Count = 5
    allowed_ports: Optional[list[_Port]] = Field(
        default=None, max_length=MAX_ALLOWED_PORTS
    )
    blocked: bool = False
    reason: Optional[str] = Field(default=None, max_length=MAX_REASON_CHARS)

    # Before pydantic's own coercion, which would turn b"a" into "a" and
    # let a bytes id reach the profile of the text id.
    @field_validator("user_id", mode="before")
    @classmethod
    def _user_id(cls, value: Any) -> str:
        return check_id(value, "user_id")

    @field_validator("allowed_ports")
    @classmethod
    def _ports(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        return None if value is None else sorted(set(value))

    @classmethod
    def from_tier(cls, user_id: str, tier: UserTier | str) -> "UserProfile":
        """Return the profile of ``tier`` with the limits of the tier table.

        Raises:
            InvalidInputError: unknown tier or bad ``user_id``.
        """
        try:
            tier = UserTier(tier)
        except ValueError as exc:
            names = ", ".join(t.value for t in UserTier)
            raise InvalidInputError(
                f"unknown tier {tier!r}; expected one of {names}"
            ) from exc
        return cls.parse(dict(user_id=user_id, tier=tier, **TIER_LIMITS[tier]))

    @classmethod
    def parse(cls, data: dict[str, Any]) -> "UserProfile":
        """Validate ``data`` into a profile.

        Raises:
            InvalidIdError: ``user_id`` is not a usable id.
            InvalidInputError: with pydantic's description of what failed.
        """
        if "user_id" in data:
            check_id(data["user_id"], "user_id")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise InvalidInputError(f"invalid profile: {exc}") from exc


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    """The answer to one request-rate check.

    Attributes:
        allowed: whether the request may go ahead (its cost was debited).
        limit: the bucket's capacity, the profile's requests per minute.
        remaining: whole tokens left after this check.
        retry_after: seconds until this cost would be allowed; 0 when
            allowed, ``math.inf`` when the cost exceeds the capacity.
        reset_after: seconds until the bucket is full again.
        degraded: the decision was made without Redis.
    """

    allowed: bool
    limit: int
    remaining: int
    retry_after: float
    reset_after: float
    degraded: bool = False


@dataclass(frozen=True, slots=True)
class SecurityCheckResult:
    """The answer to one service-start check.

    Attributes:
        allowed: whether the service may start; its slot is then reserved.
        reason: why it was denied or delayed, in words for the user.
        delay_seconds: how long to wait before starting (overload), or the
            wait for a rate-limited start.
        retry_after: seconds until a denied start could pass, when known.
        anomaly: the anomaly this check recorded, if any.
        fence: the lease's fencing token when allowed, else ``None``.
        already_running: the service already held a slot (renewed, nothing
            reserved twice).
        degraded: the decision was made without Redis.
    """

    allowed: bool
    reason: Optional[str] = None
    delay_seconds: float = 0.0
    retry_after: Optional[float] = None
    anomaly: Optional["AnomalyEvent"] = None
    fence: Optional[int] = None
    already_running: bool = False
    degraded: bool = False


class AnomalyEvent(BaseModel):
    """One recorded anomaly, as written to the stream and the log file."""

    model_config = ConfigDict(frozen=True)

    timestamp: datetime
    anomaly_type: AnomalyType
    user_id: Optional[str] = None
    service_id: Optional[str] = None
    details: str
    severity: Severity = Severity.MEDIUM
    metadata: dict[str, Any] = Field(default_factory=dict)

    def to_fields(self) -> dict[str, str]:
        """Return the flat string fields stored in a stream entry."""
        return {
            "ts": self.timestamp.isoformat(),
            "type": self.anomaly_type.value,
            "user": self.user_id or "",
            "service": self.service_id or "",
            "details": self.details,
            "severity": self.severity.value,
            "metadata": json.dumps(self.metadata, default=str),
        }

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "AnomalyEvent":
        """Rebuild an event from :meth:`to_fields` output.

        Raises:
            ValueError: the entry was not written by this package.
        """
        return cls(
            timestamp=datetime.fromisoformat(fields["ts"]),
            anomaly_type=AnomalyType(fields["type"]),
            user_id=fields.get("user") or None,
            service_id=fields.get("service") or None,
            details=fields.get("details", ""),
            severity=Severity(fields.get("severity", "medium")),
            metadata=json.loads(fields.get("metadata") or "{}"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the event as JSON-ready data."""
        return self.model_dump(mode="json")

    def to_log_line(self) -> str:
        """Return a one-line human summary."""
        return (
            f"[{self.severity.value.upper()}] {self.anomaly_type.value} "
            f"user={self.user_id} service={self.service_id} | {self.details}"
        )


def utcnow() -> datetime:
    """Return the current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


def finite_or_inf(seconds: float) -> float:
    """Map the scripts' ``-1`` (never) to ``math.inf``."""
    return math.inf if seconds < 0 else seconds
