"""Policy configuration from the environment (``PACTOWN_*`` variables).

::

    PACTOWN_REDIS_URL=redis://:secret@redis:6379/0   (else REDIS_URL)
    PACTOWN_NAMESPACE=pactown
    PACTOWN_DEFAULT_RATE_LIMIT=60        service starts per minute
    PACTOWN_START_BURST=10               service starts allowed at once
    PACTOWN_LEASE_TTL=30                 seconds
    PACTOWN_STREAM_MAXLEN=10000          anomaly stream entries (approx.)
    PACTOWN_CPU_THRESHOLD=80             percent, or "none" to turn off
    PACTOWN_MEMORY_THRESHOLD=85          percent, or "none" to turn off
    PACTOWN_DEFAULT_TIER=free
    PACTOWN_RAPID_RESTART_THRESHOLD=5    starts within a minute
    PACTOWN_ANOMALY_LOG_PATH=/var/log/pactown/anomalies.jsonl
    PACTOWN_TIMEOUT=0.25                 seconds per call to Redis
    PACTOWN_RATE_LIMIT_FAIL_MODE=local   closed, open or local
    PACTOWN_START_FAIL_MODE=closed       closed, open or local
    PACTOWN_REPLICAS=1                   replicas sharing the limits
    PACTOWN_BREAKER_THRESHOLD=3          failures that open the breaker
    PACTOWN_BREAKER_COOLDOWN=2           seconds
    PACTOWN_AUTO_BLOCK_THRESHOLD=none    strikes, or "none" to turn off
    PACTOWN_AUTO_BLOCK_WINDOW=600        seconds
    PACTOWN_AUTO_BLOCK_DURATION=3600     seconds

Every field is an option :class:`~pactown_redis.SecurityPolicy` takes.
Other client options go in the URL's query string
(``redis://host:6379/0?health_check_interval=30``), which redis-py reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from ._core import MAX_BLOCK_S
from ._validate import check_namespace
from .errors import InvalidInputError
from .models import UserTier
from .policy import SecurityPolicy
from .resilience import (
    DEFAULT_BREAKER_COOLDOWN,
    DEFAULT_BREAKER_THRESHOLD,
    DEFAULT_TIMEOUT,
    MAX_COOLDOWN,
    MAX_REPLICAS,
    MAX_TIMEOUT,
    FailMode,
)

__all__ = ["PolicySettings", "build_policy"]

_OFF = ("", "none", "off")


class PolicySettings(BaseSettings):
    """The options of a :class:`SecurityPolicy`, read from ``PACTOWN_*``
    environment variables (names are case-insensitive).

    The Redis URL may hold a password, so it is a ``SecretStr``: it shows
    as ``**********`` in ``repr``, ``str`` and logs;
    ``redis_url.get_secret_value()`` reads it.

    Build one with :meth:`load`, which reports bad values as
    ``InvalidInputError``; the constructor raises pydantic's
    ``ValidationError`` instead.
    """

    model_config = SettingsConfigDict(
        env_prefix="PACTOWN_",
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
        # A rejected URL may hold a password: errors never echo the input.
        hide_input_in_errors=True,
    )

    redis_url: SecretStr = Field(
        default=SecretStr("redis://localhost:6379/0"),
        validation_alias=AliasChoices("PACTOWN_REDIS_URL", "REDIS_URL"),
    )
    namespace: str = "pactown"
    default_rate_limit: int = Field(default=60, ge=1, le=100_000_000)
    start_burst: int = Field(default=10, ge=1, le=1_000_000)
    lease_ttl: float = Field(default=30.0, ge=0.01, le=86400.0)
    stream_maxlen: int = Field(default=10_000, ge=1, le=1_000_000_000)
    cpu_threshold: Optional[float] = Field(default=80.0, ge=0, le=100)
    memory_threshold: Optional[float] = Field(default=85.0, ge=0, le=100)
    default_tier: UserTier = UserTier.FREE
    rapid_restart_threshold: int = Field(default=5, ge=1, le=1_000_000)
    anomaly_log_path: Optional[Path] = None
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, le=MAX_TIMEOUT)
    rate_limit_fail_mode: FailMode = FailMode.LOCAL
    start_fail_mode: FailMode = FailMode.CLOSED
    replicas: int = Field(default=1, ge=1, le=MAX_REPLICAS)
    breaker_threshold: int = Field(
        default=DEFAULT_BREAKER_THRESHOLD, ge=1, le=1_000_000
    )
    breaker_cooldown: float = Field(
        default=DEFAULT_BREAKER_COOLDOWN, ge=0, le=MAX_COOLDOWN
    )
    auto_block_threshold: Optional[int] = Field(default=None, ge=1, le=10_000)
    auto_block_window: float = Field(default=600.0, gt=0, le=MAX_BLOCK_S)
    auto_block_duration: float = Field(default=3600.0, gt=0, le=MAX_BLOCK_S)

    @field_validator("redis_url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        schemes = ("redis://", "rediss://", "unix://")
        if not url.startswith(schemes):
            # The URL itself may hold a password: name only its scheme.
            scheme = url.split(":", 1)[0] if ":" in url else "(none)"
            raise ValueError(
                f"must start with redis://, rediss:// or unix://, not {scheme}"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_namespace(value)

    @field_validator(
        "cpu_threshold",
        "memory_threshold",
        "anomaly_log_path",
        "auto_block_threshold",
        mode="before",
    )
    @classmethod
    def _off(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in _OFF:
            return None
        return value

    @field_validator(
        "default_tier", "rate_limit_fail_mode", "start_fail_mode", mode="before"
    )
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @classmethod
    def load(cls, **values: Any) -> "PolicySettings":
        """Read the environment; ``values`` override it by field name.

        Raises:
            InvalidInputError: a value is missing its type or range; the
                message names each variable at fault.
        """
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{_variable(error['loc'])}: {error['msg']}"
                for error in exc.errors(include_url=False)
            )
            raise InvalidInputError(f"invalid settings: {problems}") from None

    def policy_options(self) -> dict[str, Any]:
        """Return the keyword arguments of :class:`SecurityPolicy`, all
        but its first argument (the client or URL)."""
        options = self.model_dump(exclude={"redis_url"})
        # The policy takes fail modes as their names.
        for name in ("rate_limit_fail_mode", "start_fail_mode"):
            options[name] = options[name].value
        return options


def _variable(loc: tuple[Any, ...]) -> str:
    name = str(loc[0]).upper() if loc else "?"
    return name if name.startswith("PACTOWN_") else "PACTOWN_" + name


def build_policy(
    settings: Optional[PolicySettings] = None,
    *,
    redis: Any = None,
    **options: Any,
) -> SecurityPolicy:
    """Return a :class:`SecurityPolicy` configured by ``settings``.

    Args:
        settings: defaults to :meth:`PolicySettings.load` (the
            environment).
        redis: a client to use instead of connecting to
            ``settings.redis_url``; left open by ``policy.close()``. With
            the URL, the policy makes its own client and closes it.
        options: more policy options, such as ``on_anomaly``,
            ``on_lease_lost`` or ``load_probe``; they override the
            settings.

    Raises:
        InvalidInputError: a setting or option out of range.
    """
    if settings is None:
        settings = PolicySettings.load()
    target = settings.redis_url.get_secret_value() if redis is None else redis
    return SecurityPolicy(target, **{**settings.policy_options(), **options})
