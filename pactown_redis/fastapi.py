"""A FastAPI dependency that guards the endpoints starting services.

Needs the ``fastapi`` extra (``pip install 'pactown-redis[fastapi]'``);
nothing else in the package imports this module.

::

    start_guard = require_start(policy, user=current_user)

    @app.post("/services/{service_id}/start")
    async def start(
        service_id: str,
        check: SecurityCheckResult = Depends(start_guard),
    ) -> dict[str, int]:
        return {"fence": check.fence}
"""

from __future__ import annotations

import math
from typing import Any, Awaitable, Callable, Optional, Union

try:
    from fastapi import Depends, HTTPException, Request
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "pactown_redis.fastapi needs FastAPI: "
        "pip install 'pactown-redis[fastapi]'"
    ) from exc

from .asgi import whole_seconds
from .errors import InvalidInputError
from .models import AnomalyType, SecurityCheckResult
from .policy import SecurityPolicy

__all__ = ["denial_status", "require_start"]

#: HTTP status of a denied start, by the anomaly the denial recorded.
_STATUS_BY_ANOMALY = {
    AnomalyType.RATE_LIMIT_EXCEEDED: 429,
    AnomalyType.CONCURRENT_LIMIT_EXCEEDED: 429,
    AnomalyType.HOURLY_LIMIT_EXCEEDED: 429,
    AnomalyType.UNAUTHORIZED_ACCESS: 403,
    AnomalyType.MEMORY_LIMIT_EXCEEDED: 403,
    AnomalyType.CPU_LIMIT_EXCEEDED: 403,
    AnomalyType.SERVER_OVERLOADED: 503,
    AnomalyType.PROFILE_CORRUPT: 500,
}

Dependency = Callable[..., Any]


def denial_status(result: SecurityCheckResult) -> int:
    """Return the HTTP status that answers the denied start ``result``.

    ``429`` for the start rate, concurrent services and starts per hour
    (wait or stop a service, then retry); ``403`` for a blocked user, a
    port not allowed, and memory or CPU quotas; ``503`` when this server
    is overloaded; ``500`` when the user's stored profile is unreadable.
    A denial that recorded no anomaly is ``503`` when it was decided
    without Redis (``degraded``), else ``403``.
    """
    if result.anomaly is not None:
        status = _STATUS_BY_ANOMALY.get(result.anomaly.anomaly_type)
        if status is not None:
            return status
    return 503 if result.degraded else 403


def _path_param(name: str) -> Dependency:
    def service_from_path(request: Request) -> Any:
        try:
            return request.path_params[name]
        except KeyError:
            raise InvalidInputError(
                f"route {request.url.path!r} has no path parameter {name!r}"
            ) from None

    return service_from_path


def _no_resources() -> None:
    return None


def require_start(
    policy: SecurityPolicy,
    *,
    user: Dependency,
    service: Union[str, Dependency] = "service_id",
    resources: Optional[Dependency] = None,
) -> Callable[..., Awaitable[SecurityCheckResult]]:
    """Return a dependency that reserves a service start or refuses it.

    Use it as ``Depends(require_start(...))`` on an endpoint that starts a
    service. It calls :meth:`SecurityPolicy.check_can_start_service` once
    and returns its :class:`SecurityCheckResult` when the start is allowed
    (the slot is then reserved; ``fence`` is the lease's token, and
    ``delay_seconds`` asks the caller to wait when the server is loaded).
    A denial raises ``HTTPException`` with the policy's reason as detail
    and the status of :func:`denial_status`; a ``429`` or ``503`` carries
    ``Retry-After`` (whole seconds, rounded up) when the wait is known.

    Args:
        policy: the policy that decides.
        user: a FastAPI dependency returning the caller's user id, or
            ``None`` for an unauthenticated caller (answered ``401``; a
            dependency that raises its own ``401`` works as well).
        service: the name of the path parameter holding the service id,
            or a dependency returning it.
        resources: a dependency returning what the service asks for: an
            object with any of the attributes ``port``, ``memory_mb`` and
            ``cpu_percent`` (a pydantic model of the request body works),
            or ``None`` for no port and no memory or CPU.

    Invalid ids or resources are answered ``400``. Errors of the policy
    itself (``BackendError``) propagate.
    """
    if not callable(user):
        raise InvalidInputError("user must be a dependency (a callable)")
    service_dependency = _path_param(service) if isinstance(service, str) else service
    if not callable(service_dependency):
        raise InvalidInputError("service must be a path parameter name or callable")
    resources_dependency = _no_resources if resources is None else resources

    async def guard_start(
        user_id: Any = Depends(user),
        service_id: Any = Depends(service_dependency),
        asked: Any = Depends(resources_dependency),
    ) -> SecurityCheckResult:
        if user_id is None:
            raise HTTPException(401, detail="Not authenticated")
        try:
            result = await policy.check_can_start_service(
                user_id,
                service_id,
                port=getattr(asked, "port", None),
                memory_mb=getattr(asked, "memory_mb", None) or 0,
                cpu_percent=getattr(asked, "cpu_percent", None) or 0,
            )
        except InvalidInputError as exc:
            raise HTTPException(400, detail=str(exc)) from exc
        if result.allowed:
            return result
        raise _refusal(result)

    return guard_start


def _refusal(result: SecurityCheckResult) -> HTTPException:
    status = denial_status(result)
    headers = None
    retry = result.retry_after
    if status in (429, 503) and retry is not None and math.isfinite(retry):
        headers = {"Retry-After": str(whole_seconds(retry))}
    return HTTPException(
        status, detail=result.reason or "Service start denied", headers=headers
    )
