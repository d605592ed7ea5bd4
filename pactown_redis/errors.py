"""Every exception pactown-redis raises, under one root.

::

    PactownRedisError
    ├── InvalidInputError (also ValueError)   bad argument, nothing was sent
    │   ├── InvalidIdError                    a user or service id
    │   └── InvalidNumberError                a cost, port, memory, CPU value
    ├── CorruptProfileError                   a stored profile is unreadable
    ├── LeaseLostError                        a slot is no longer held
    └── BackendError                          Redis failed or replied oddly
        └── RedisUnavailableError             no reply in time, unreachable,
                                              or refusing (out of memory...)

``InvalidInputError`` derives from ``ValueError`` so that code written for
plain validation errors keeps working. Errors raised because Redis failed
keep the original exception as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "CorruptProfileError",
    "InvalidIdError",
    "InvalidInputError",
    "InvalidNumberError",
    "LeaseLostError",
    "PactownRedisError",
    "RedisUnavailableError",
]


class PactownRedisError(Exception):
    """Root of every exception raised by this package."""


class InvalidInputError(PactownRedisError, ValueError):
    """An argument was rejected before anything reached Redis."""


class InvalidIdError(InvalidInputError):
    """A user id, service id or namespace is empty, too long or not text."""


class InvalidNumberError(InvalidInputError):
    """A number is of the wrong type, not finite, or out of its range."""


class CorruptProfileError(PactownRedisError):
    """A profile stored in Redis could not be read back.

    Decisions for that user fail closed until the profile is set again.
    """

    def __init__(self, user_id: str, field: str) -> None:
        super().__init__(
            f"stored profile of user {user_id!r} is corrupt "
            f"(field {field!r}); set the profile again"
        )
        self.user_id = user_id
        self.field = field


class LeaseLostError(PactownRedisError):
    """A service slot the caller believed it held is no longer held."""

    def __init__(self, user_id: str, service_id: str) -> None:
        super().__init__(
            f"lease of service {service_id!r} for user {user_id!r} is lost: "
            "it expired, was released, or was taken by a newer start"
        )
        self.user_id = user_id
        self.service_id = service_id


class BackendError(PactownRedisError):
    """Redis could not be reached in time, refused, or replied oddly."""


class RedisUnavailableError(BackendError):
    """Redis did not answer within the policy's deadline, could not be
    reached, or refused to take writes (out of memory, read-only, loading);
    also raised at once while the circuit breaker is open.

    Decisions never raise it: they are made by the check's fail mode.
    """
