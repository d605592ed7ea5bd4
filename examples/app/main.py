"""An example FastAPI service whose limits live in Redis.

* every request carrying an ``X-API-Key`` header is debited from that key's
  request bucket (``/health`` and ``/metrics`` are not counted);
* ``GET /me`` answers the caller's user id: the cheapest counted request;
* ``POST /services/{service_id}/start`` reserves a service slot through the
  policy, or answers 429/403 with the reason;
* ``POST /services/{service_id}/stop`` frees the slot.

Configured from ``PACTOWN_*`` environment variables (see
``pactown_redis.settings``). Run it with::

    PACTOWN_REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn --factory --app-dir examples/app main:create_app

Several workers or hosts may run it at once: they share one set of limits.
"""

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from fastapi import Depends, FastAPI, Header, HTTPException, Response
from pydantic import BaseModel, Field

from pactown_redis import InvalidInputError, SecurityCheckResult, SecurityPolicy
from pactown_redis.asgi import RateLimitMiddleware, api_key_id, by_api_key
from pactown_redis.fastapi import require_start
from pactown_redis.settings import PolicySettings, build_policy


class StartSpec(BaseModel):
    """What a service asks for when it starts (all optional)."""

    port: Optional[int] = None
    memory_mb: float = Field(default=0, ge=0)
    cpu_percent: float = Field(default=0, ge=0)


def current_user(x_api_key: Optional[str] = Header(default=None)) -> str:
    """The caller's user id, derived from the API key.

    A real service looks the key up in its account store; this example
    uses the key's digest, the same id the middleware counts requests by.
    """
    if x_api_key is None:
        raise HTTPException(
            401,
            detail="X-API-Key header required",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    return api_key_id(x_api_key)


def start_spec(spec: Optional[StartSpec] = None) -> Optional[StartSpec]:
    """The request body of a start, if any."""
    return spec


def _metrics_endpoint(app: FastAPI, policy: SecurityPolicy) -> None:
    try:
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            generate_latest,
        )

        from pactown_redis.metrics import instrument
    except ImportError:
        return  # metrics are optional: pip install 'pactown-redis[prometheus]'
    registry = CollectorRegistry()
    instrument(policy, registry)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    settings: Optional[PolicySettings] = None,
    *,
    policy: Optional[SecurityPolicy] = None,
) -> FastAPI:
    """Build the app on ``policy``, or on one made from ``settings`` (by
    default the environment) and closed when the app shuts down."""
    owned = policy is None
    if policy is None:
        policy = build_policy(settings)
    guarded = policy

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            await guarded.close()

    app = FastAPI(title="pactown-redis example", lifespan=lifespan)
    app.add_middleware(
        RateLimitMiddleware,
        policy=policy,
        identify=by_api_key("x-api-key"),
        exclude_paths=("/health", "/metrics"),
    )
    _metrics_endpoint(app, policy)
    guard_start = require_start(policy, user=current_user, resources=start_spec)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/me")
    async def me(user: str = Depends(current_user)) -> dict[str, str]:
        return {"user": user}

    @app.post("/services/{service_id}/start")
    async def start_service(
        service_id: str,
        spec: Optional[StartSpec] = None,
        check: SecurityCheckResult = Depends(guard_start),
    ) -> dict[str, Any]:
        # The slot is reserved and renewed by the policy from here on; a
        # real service would now launch the process, after waiting
        # check.delay_seconds when the server is loaded.
        return {
            "service_id": service_id,
            "fence": check.fence,
            "already_running": check.already_running,
            "delay_seconds": check.delay_seconds,
        }

    @app.post("/services/{service_id}/stop")
    async def stop_service(
        service_id: str, user: str = Depends(current_user)
    ) -> dict[str, Any]:
        try:
            stopped = await guarded.unregister_service(user, service_id)
        except InvalidInputError as exc:
            raise HTTPException(400, detail=str(exc)) from exc
        return {"service_id": service_id, "stopped": stopped}

    return app
