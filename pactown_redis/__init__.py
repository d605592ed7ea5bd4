"""pactown-redis: one security policy shared by every replica, in Redis.

Rate limits, service slots, quotas, blocking and anomalies for a
multi-tenant service, decided atomically by Lua scripts with the Redis
server's clock, so any number of replicas enforce one set of limits.
"""

from importlib.metadata import PackageNotFoundError, version

from ._core import LeaseInfo, UserState
from .consumer import AnomalyConsumer
from .errors import (
    BackendError,
    CorruptProfileError,
    InvalidIdError,
    InvalidInputError,
    InvalidNumberError,
    LeaseLostError,
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
    UserProfile,
    UserTier,
)
from .overload import LoadSample
from .policy import SecurityPolicy
from .resilience import FailMode
from .sync import SyncSecurityPolicy

try:
    __version__ = version("pactown-redis")
except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0"

__all__ = [
    "TIER_LIMITS",
    "AnomalyConsumer",
    "AnomalyEvent",
    "AnomalyType",
    "BackendError",
    "CorruptProfileError",
    "FailMode",
    "InvalidIdError",
    "InvalidInputError",
    "InvalidNumberError",
    "LeaseInfo",
    "LeaseLostError",
    "LoadSample",
    "PactownRedisError",
    "RateLimitResult",
    "RedisUnavailableError",
    "SecurityCheckResult",
    "SecurityPolicy",
    "Severity",
    "SyncSecurityPolicy",
    "UserProfile",
    "UserState",
    "UserTier",
    "__version__",
]
