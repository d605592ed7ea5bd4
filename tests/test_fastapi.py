"""The FastAPI start guard, and the example app that uses it."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import httpx
import pytest
from fastapi import Depends, FastAPI, Header
from pydantic import BaseModel

from pactown_redis import (
    AnomalyType,
    InvalidInputError,
    LoadSample,
    SecurityCheckResult,
    UserProfile,
    UserTier,
)
from pactown_redis.asgi import api_key_id
from pactown_redis.fastapi import denial_status, require_start
from pactown_redis.models import AnomalyEvent, utcnow
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "app" / "main.py"


class Spec(BaseModel):
    port: Optional[int] = None
    memory_mb: float = 0
    cpu_percent: float = 0


def current_user(
    x_user: Optional[str] = Header(default=None),
) -> Optional[str]:
    """The user named by the X-User header; None without one."""
    return x_user


def body(spec: Optional[Spec] = None) -> Optional[Spec]:
    """The start request's body."""
    return spec


def guarded_app(policy: Any, **options: Any) -> FastAPI:
    """An app whose start endpoints are guarded by require_start."""
    app = FastAPI()
    options.setdefault("user", current_user)
    options.setdefault("resources", body)
    guard = require_start(policy, **options)

    @app.post("/services/{service_id}/start")
    async def start(
        service_id: str, check: SecurityCheckResult = Depends(guard)
    ) -> dict[str, Any]:
        return {"fence": check.fence, "again": check.already_running}

    @app.post("/apps/{name}/launch")
    async def launch(
        check: SecurityCheckResult = Depends(guard),
    ) -> dict[str, Any]:
        return {"fence": check.fence}

    return app


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Any], httpx.AsyncClient]]:
    """Return httpx clients that call an ASGI app in process."""
    async with contextlib.AsyncExitStack() as stack:

        def client(app: Any) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=app)
            made = httpx.AsyncClient(transport=transport, base_url="http://t")
            stack.push_async_callback(made.aclose)
            return made

        yield client


U = {"x-user": "u"}


async def test_allowed_start_returns_the_check(make_policy, serve):
    """An allowed start returns the result, with the lease's fence token."""
    policy = make_policy()
    client = serve(guarded_app(policy))
    first = await client.post("/services/web/start", headers=U)
    again = await client.post("/services/web/start", headers=U)
    assert first.status_code == 200
    assert isinstance(first.json()["fence"], int)
    assert again.json() == {"fence": first.json()["fence"], "again": True}
    assert await policy.get_user_service_count("u") == 1


async def _two_starts(policy: Any, client: httpx.AsyncClient) -> None:
    for name in ("a", "b"):
        await client.post(f"/services/{name}/start", headers=U)


async def _hour_of_starts(policy: Any, client: httpx.AsyncClient) -> None:
    for _ in range(5):
        await client.post("/services/a/start", headers=U)
        await policy.unregister_service("u", "a")


async def _one_start(policy: Any, client: httpx.AsyncClient) -> None:
    # With a burst of one, the next start waits for the start bucket,
    # which refills 60 starts a minute: one second.
    await client.post("/services/first/start", headers=U)


async def _blocked(policy: Any, client: httpx.AsyncClient) -> None:
    await policy.block_user("u", "abuse")


async def _only_port_8080(policy: Any, client: httpx.AsyncClient) -> None:
    profile = UserProfile.from_tier("u", UserTier.FREE)
    profile.allowed_ports = [8080]
    await policy.set_user_profile(profile)


async def _nothing(policy: Any, client: httpx.AsyncClient) -> None:
    return None


async def _corrupt(policy: Any, client: httpx.AsyncClient) -> None:
    await policy._client.hset(policy.keys.user("u").profile, "conc", "x")


@pytest.mark.parametrize(
    ("setup", "options", "request_body", "status", "detail", "retry_after"),
    [
        (
            _two_starts, {}, None, 429,
            "Max concurrent services reached (2/2). Stop a service first.",
            None,
        ),
        (
            _hour_of_starts, {}, None, 429,
            "Hourly service limit reached (5/5). Try again later.",
            "3600",
        ),
        (
            _one_start, {"start_burst": 1}, None, 429,
            "Rate limit exceeded. Wait 1.0s", "1",
        ),
        (_blocked, {}, None, 403, "User blocked: abuse", None),
        (
            _only_port_8080, {}, {"port": 22}, 403,
            "Port 22 not allowed for your account", None,
        ),
        (
            _nothing, {}, {"memory_mb": 512}, 403,
            "Memory limit exceeded (0 + 512 > 256 MB). Stop a service first.",
            None,
        ),
        (
            _nothing, {}, {"cpu_percent": 30}, 403,
            "CPU limit exceeded (0 + 30 > 25%). Stop a service first.",
            None,
        ),
        (
            _nothing,
            {"cpu_threshold": 80, "load_probe": lambda: LoadSample(99, 10)},
            None, 503,
            "Server is currently overloaded. Please try again later.",
            None,
        ),
        (
            _corrupt, {}, None, 500,
            "Stored user profile is corrupt. Contact support.", None,
        ),
    ],
    ids=[
        "concurrent", "hourly", "rate", "blocked", "port", "memory", "cpu",
        "overloaded", "corrupt",
    ],
)
async def test_denials(
    make_policy, serve, setup, options, request_body, status, detail,
    retry_after,
):
    """Each denial has its status, the policy's reason and a known wait."""
    policy = make_policy(**options)
    client = serve(guarded_app(policy))
    await setup(policy, client)
    denied = await client.post("/services/c/start", headers=U, json=request_body)
    assert denied.status_code == status
    assert denied.json() == {"detail": detail}
    assert denied.headers.get("retry-after") == retry_after


async def test_hourly_wait_counts_down(make_policy, serve, clock):
    """The hourly Retry-After is the time until the oldest start ages out."""
    policy = make_policy()
    client = serve(guarded_app(policy))
    await _hour_of_starts(policy, client)
    clock.advance(1000.5)
    denied = await client.post("/services/a/start", headers=U)
    assert denied.headers["retry-after"] == "2600"


async def test_no_user_is_a_401(make_policy, serve):
    """A user dependency returning None is answered 401."""
    response = await serve(guarded_app(make_policy())).post("/services/a/start")
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        ("/services/" + "s" * 257 + "/start", None),
        ("/services/a/start", {"port": 0}),
        ("/services/a/start", {"port": 70000}),
        ("/services/a/start", {"memory_mb": -1}),
    ],
    ids=["long-service-id", "port-0", "port-70000", "negative-memory"],
)
async def test_invalid_input_is_a_400(make_policy, serve, path, request_body):
    """Ids and resources the policy refuses are answered 400."""
    client = serve(guarded_app(make_policy()))
    response = await client.post(path, headers=U, json=request_body)
    assert response.status_code == 400
    assert response.json()["detail"]


async def test_service_from_another_path_parameter(make_policy, serve):
    """service= names the path parameter holding the service id."""
    policy = make_policy()
    client = serve(guarded_app(policy, service="name"))
    response = await client.post("/apps/blog/launch", headers=U)
    assert response.status_code == 200
    state = await policy.get_user_state("u")
    assert [lease.service_id for lease in state.leases] == ["blog"]


async def test_missing_path_parameter_is_a_configuration_error(
    make_policy, serve
):
    """A guard naming a path parameter the route lacks raises on use."""
    client = serve(guarded_app(make_policy(), service="nope"))
    with pytest.raises(InvalidInputError, match="no path parameter 'nope'"):
        await client.post("/apps/blog/launch", headers=U)


async def test_service_dependency(make_policy, serve):
    """service= may be a dependency of its own."""
    policy = make_policy()

    def from_header(x_service: str = Header()) -> str:
        return x_service

    client = serve(guarded_app(policy, service=from_header))
    response = await client.post(
        "/services/ignored/start", headers={**U, "x-service": "db"}
    )
    assert response.status_code == 200
    assert (await policy.get_user_state("u")).leases[0].service_id == "db"


def _denied(kind: AnomalyType) -> SecurityCheckResult:
    event = AnomalyEvent(timestamp=utcnow(), anomaly_type=kind, details="")
    return SecurityCheckResult(False, anomaly=event)


@pytest.mark.parametrize(
    ("result", "status"),
    [
        (_denied(AnomalyType.RATE_LIMIT_EXCEEDED), 429),
        (_denied(AnomalyType.HOURLY_LIMIT_EXCEEDED), 429),
        (_denied(AnomalyType.UNAUTHORIZED_ACCESS), 403),
        (_denied(AnomalyType.CPU_LIMIT_EXCEEDED), 403),
        (SecurityCheckResult(False), 403),
        (SecurityCheckResult(False, degraded=True), 503),
    ],
    ids=["rate", "hourly", "blocked-or-port", "cpu", "no-anomaly", "degraded"],
)
def test_denial_status(result, status):
    """The status follows the denial's anomaly, else whether it degraded."""
    assert denial_status(result) == status


class _Deciding:
    """A stand-in policy that returns one given start result."""

    def __init__(self, result: SecurityCheckResult) -> None:
        self.result = result

    async def check_can_start_service(self, *args: Any, **kw: Any) -> Any:
        return self.result


@pytest.mark.parametrize(
    ("result", "status", "retry_after"),
    [
        (
            SecurityCheckResult(
                False, reason="Policy unavailable", retry_after=0.25,
                degraded=True,
            ),
            503, "1",
        ),
        (
            SecurityCheckResult(False, reason="Policy unavailable", degraded=True),
            503, None,
        ),
        (SecurityCheckResult(False, reason="No"), 403, None),
    ],
    ids=["degraded-with-wait", "degraded", "plain"],
)
async def test_any_denial_is_answered(serve, result, status, retry_after):
    """A denial without an anomaly still gets its status, reason and wait."""
    client = serve(guarded_app(_Deciding(result)))
    response = await client.post("/services/a/start", headers=U)
    assert response.status_code == status
    assert response.json() == {"detail": result.reason}
    assert response.headers.get("retry-after") == retry_after


def test_guard_options_are_checked(make_policy):
    """A guard without a callable user or service is refused."""
    policy = make_policy()
    with pytest.raises(InvalidInputError, match="user"):
        require_start(policy, user="alice")
    with pytest.raises(InvalidInputError, match="service"):
        require_start(policy, user=current_user, service=42)


# -- the example app -----------------------------------------------------------


def load_example() -> Any:
    """Import examples/app/main.py as a module."""
    spec = importlib.util.spec_from_file_location("pactown_example_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


KEY = {"x-api-key": "k-alice"}


async def test_example_app_starts_and_stops(make_policy, serve):
    """The example reserves a slot on start, frees it on stop."""
    policy = make_policy()
    client = serve(load_example().create_app(policy=policy))
    user = api_key_id("k-alice")
    started = await client.post("/services/web/start", headers=KEY, json={})
    assert started.status_code == 200
    assert started.json()["service_id"] == "web"
    assert started.headers["ratelimit"] == "limit=20, remaining=19, reset=3"
    assert await policy.get_user_service_count(user) == 1
    stopped = await client.post("/services/web/stop", headers=KEY)
    assert stopped.json() == {"service_id": "web", "stopped": True}
    assert await policy.get_user_service_count(user) == 0


async def test_example_app_limits(make_policy, serve):
    """The example refuses a third service (429) and a big one (403)."""
    client = serve(load_example().create_app(policy=make_policy()))
    for name in ("a", "b"):
        await client.post(f"/services/{name}/start", headers=KEY)
    third = await client.post("/services/c/start", headers=KEY)
    big = await client.post(
        "/services/d/start", headers={"x-api-key": "k-bob"},
        json={"memory_mb": 4096},
    )
    anonymous = await client.post("/services/e/start")
    assert third.status_code == 429
    assert big.status_code == 403
    assert anonymous.status_code == 401


async def test_example_app_rate_limits_by_key(make_policy, serve):
    """Requests with a key are limited per key; /health is never counted."""
    client = serve(load_example().create_app(policy=make_policy()))
    health = [await client.get("/health", headers=KEY) for _ in range(25)]
    stops = [
        await client.post("/services/x/stop", headers=KEY) for _ in range(21)
    ]
    assert {r.status_code for r in health} == {200}
    assert [r.status_code for r in stops] == [200] * 20 + [429]
    other = await client.post("/services/x/stop", headers={"x-api-key": "k2"})
    assert other.status_code == 200


async def test_example_app_metrics(make_policy, serve):
    """The example counts its decisions on /metrics."""
    client = serve(load_example().create_app(policy=make_policy()))
    await client.post("/services/a/start", headers=KEY)
    text = (await client.get("/metrics")).text
    assert 'pactown_decisions_total{check="start",outcome="allowed"} 1.0' in text
    assert (
        'pactown_decisions_total{check="rate_limit",outcome="allowed"} 1.0'
        in text
    )


@pytest.mark.slow
def test_example_app_runs_under_uvicorn(redis_server, tmp_path):
    """uvicorn serves the example against the session's redis-server."""
    port = free_port()
    env = {
        **os.environ,
        "PACTOWN_REDIS_URL": redis_server.url,
        "PACTOWN_NAMESPACE": "uvicorn-" + uuid.uuid4().hex[:8],
        # The machine's own load must not decide this test.
        "PACTOWN_CPU_THRESHOLD": "none",
        "PACTOWN_MEMORY_THRESHOLD": "none",
    }
    log = (tmp_path / "uvicorn.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "uvicorn", "--factory",
            "--app-dir", str(EXAMPLE.parent), "main:create_app",
            "--host", "127.0.0.1", "--port", str(port),
        ],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for(base + "/health", process, tmp_path / "uvicorn.log")
        with httpx.Client(base_url=base) as client:
            started = client.post("/services/web/start", headers=KEY)
            stopped = client.post("/services/web/stop", headers=KEY)
        assert started.status_code == 200, started.text
        assert started.headers["ratelimit-policy"] == "20;w=60"
        assert stopped.json() == {"service_id": "web", "stopped": True}
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("uvicorn exited:\n" + log.read_text())
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("uvicorn did not answer in 20 s:\n" + log.read_text())
