"""The ASGI rate-limit middleware, driven through real ASGI apps."""

from __future__ import annotations

import contextlib
import json
from typing import Any, AsyncIterator, Callable

import httpx
import pytest

from pactown_redis import (
    BackendError,
    InvalidInputError,
    RateLimitResult,
    UserProfile,
    UserTier,
)
from pactown_redis.asgi import (
    RateLimitMiddleware,
    api_key_id,
    by_api_key,
    by_client_address,
    by_header,
    whole_seconds,
)


async def hello(scope: Any, receive: Any, send: Any) -> None:
    """A bare ASGI app: 200 'ok' with a header of its own."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"x-app", b"1")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


def by_user_header(scope: Any) -> Any:
    """Identify by the X-User header (test requests name their user)."""
    for key, value in scope["headers"]:
        if key == b"x-user":
            return value.decode()
    return None


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Return httpx clients that call an ASGI app in process."""
    async with contextlib.AsyncExitStack() as stack:

        def client(app: Any) -> httpx.AsyncClient:
            transport = httpx.ASGITransport(app=app)
            made = httpx.AsyncClient(transport=transport, base_url="http://t")
            stack.push_async_callback(made.aclose)
            return made

        yield client


@pytest.fixture
def limited(make_policy, serve) -> Callable[..., httpx.AsyncClient]:
    """Return a client of ``hello`` behind the middleware; options go to
    the middleware, ``policy`` defaults to a new policy."""

    def build(policy: Any = None, **options: Any) -> httpx.AsyncClient:
        options.setdefault("identify", by_user_header)
        middleware = RateLimitMiddleware(
            hello, policy=policy or make_policy(), **options
        )
        return serve(middleware)

    return build


U = {"x-user": "u"}


async def test_allowed_answer_carries_the_draft_fields(limited):
    """An allowed answer is the app's, plus RateLimit-Policy and RateLimit."""
    response = await limited().get("/", headers=U)
    assert response.status_code == 200
    assert response.text == "ok"
    assert response.headers["x-app"] == "1"
    assert response.headers["ratelimit-policy"] == "20;w=60"
    assert response.headers["ratelimit"] == "limit=20, remaining=19, reset=3"
    assert "retry-after" not in response.headers


async def test_the_21st_request_of_a_free_user_is_refused(limited):
    """A FREE user gets 20 answers, then a 429 with the fields and a body."""
    client = limited()
    statuses = [(await client.get("/", headers=U)).status_code for _ in range(20)]
    denied = await client.get("/", headers=U)
    assert statuses == [200] * 20
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == "3"
    assert denied.headers["ratelimit-policy"] == "20;w=60"
    assert denied.headers["ratelimit"] == "limit=20, remaining=0, reset=60"
    assert denied.headers["content-type"] == "application/json"
    assert denied.json() == {"detail": "Rate limit exceeded", "retry_after": 3}


@pytest.mark.parametrize(
    ("tier", "advance", "retry_after", "reset"),
    [
        (UserTier.FREE, 0.0, "3", 60),
        (UserTier.FREE, 0.5, "3", 60),
        (UserTier.FREE, 2.0, "1", 58),
        (UserTier.FREE, 2.999, "1", 58),
        (UserTier.BASIC, 0.0, "1", 60),
        (UserTier.PRO, 0.25, "1", 60),
    ],
)
async def test_waits_are_rounded_up(
    limited, make_policy, clock, tier, advance, retry_after, reset
):
    """Retry-After and reset are whole seconds, rounded up."""
    policy = make_policy()
    await policy.set_user_profile(UserProfile.from_tier("u", tier))
    client = limited(policy)
    limit = (await client.get("/", headers=U)).headers["ratelimit-policy"]
    for _ in range(int(limit.split(";")[0]) - 1):
        await client.get("/", headers=U)
    clock.advance(advance)
    denied = await client.get("/", headers=U)
    assert denied.status_code == 429
    assert denied.headers["retry-after"] == retry_after
    assert denied.headers["ratelimit"].endswith(f"reset={reset}")


@pytest.mark.parametrize(
    ("seconds", "whole"),
    [
        (0.0, 0),
        (-1.0, 0),
        (0.2, 1),
        (1.0, 1),
        (1.000001, 2),
        (3.0000000000000004, 3),
        (2.9999999999999996, 3),
        (59.5, 60),
    ],
)
def test_whole_seconds(seconds, whole):
    """Waits round up to whole seconds, ignoring sub-microsecond noise."""
    assert whole_seconds(seconds) == whole


@pytest.mark.parametrize(
    ("path", "counted"),
    [
        ("/health", False),
        ("/health/live", False),
        ("/healthz", True),
        ("/static/app.js", False),
        ("/static", True),
        ("/api/health", True),
    ],
)
async def test_excluded_paths(limited, path, counted):
    """An excluded path, or one below it, is neither counted nor marked."""
    client = limited(exclude_paths=("/health", "/static/"))
    first = await client.get(path, headers=U)
    after = await client.get("/other", headers=U)
    assert first.status_code == 200
    assert ("ratelimit" in first.headers) is counted
    remaining = 18 if counted else 19
    assert after.headers["ratelimit"].startswith(
        f"limit=20, remaining={remaining},"
    )


@pytest.mark.parametrize(
    ("path", "remaining"),
    [
        ("/reports", 15),
        ("/reports/42", 15),
        ("/reports/big", 0),
        ("/reports/bigger", 15),
        ("/other", 19),
    ],
)
async def test_cost_by_path(limited, path, remaining):
    """A mapping prices paths; the longest entry wins, the rest cost 1."""
    client = limited(cost={"/reports": 5, "/reports/big": 20})
    response = await client.get(path, headers=U)
    assert response.headers["ratelimit"].startswith(
        f"limit=20, remaining={remaining},"
    )


async def test_cost_function(limited):
    """A cost function prices each request from its scope."""
    client = limited(cost=lambda scope: 4 if scope["method"] == "POST" else 1)
    posted = await client.post("/", headers=U)
    got = await client.get("/", headers=U)
    assert posted.headers["ratelimit"].startswith("limit=20, remaining=16,")
    assert got.headers["ratelimit"].startswith("limit=20, remaining=15,")


async def test_cost_above_capacity_has_no_retry_after(limited):
    """A cost that can never fit is refused without a Retry-After."""
    response = await limited(cost=21).get("/", headers=U)
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    assert response.json()["retry_after"] is None
    assert response.headers["ratelimit"] == "limit=20, remaining=20, reset=0"


async def test_unidentified_requests_are_left_alone(limited):
    """identify returning None: never counted, never refused, no fields."""
    client = limited()
    answers = [await client.get("/") for _ in range(25)]
    assert {a.status_code for a in answers} == {200}
    assert not any("ratelimit" in a.headers for a in answers)


async def test_identify_may_be_async(limited):
    """An async identify is awaited."""

    async def identify(scope: Any) -> str:
        return "async-user"

    client = limited(identify=identify)
    answers = [await client.get("/") for _ in range(21)]
    assert [a.status_code for a in answers] == [200] * 20 + [429]


@pytest.mark.parametrize(
    "identity", ["", "x" * 257, "é" * 129, 42, b"bytes"], ids=repr
)
async def test_invalid_identity_is_a_400(limited, identity):
    """An id identify returns that no user can have is answered 400."""
    response = await limited(identify=lambda scope: identity).get("/")
    assert response.status_code == 400
    assert "client identity" in response.json()["detail"]
    assert "ratelimit" not in response.headers


async def test_app_instances_share_one_limit(make_policy, serve):
    """Apps on separate policies over one Redis allow 20 requests, not 40."""
    clients = [
        serve(
            RateLimitMiddleware(
                hello, policy=make_policy(), identify=by_user_header
            )
        )
        for _ in range(3)
    ]
    statuses = [
        (await clients[i % 3].get("/", headers=U)).status_code
        for i in range(24)
    ]
    assert statuses == [200] * 20 + [429] * 4


async def test_users_have_separate_buckets(limited):
    """One user's exhausted bucket does not limit another user."""
    client = limited()
    for _ in range(21):
        await client.get("/", headers=U)
    other = await client.get("/", headers={"x-user": "v"})
    assert other.status_code == 200


async def test_corrupt_profile_follows_the_policy(
    limited, make_policy, redis_client
):
    """An unreadable profile is refused as the policy decides, no wait."""
    policy = make_policy()
    await redis_client.hset(policy.keys.user("u").profile, "rpm", "lots")
    response = await limited(policy).get("/", headers=U)
    assert response.status_code == 429
    assert "retry-after" not in response.headers
    assert response.headers["ratelimit-policy"] == "0;w=60"
    assert response.headers["ratelimit"] == "limit=0, remaining=0, reset=0"


class _Answering:
    """A stand-in policy that returns a given result, or raises."""

    def __init__(self, result: Any = None, error: Any = None) -> None:
        self.result, self.error, self.calls = result, error, 0

    async def check_rate_limit(self, user_id: str, cost: float = 1) -> Any:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.result


async def test_policy_errors_propagate(serve):
    """An error raised by the policy is not turned into an answer."""
    policy: Any = _Answering(error=BackendError("Redis is down"))
    app = RateLimitMiddleware(hello, policy=policy, identify=by_user_header)
    with pytest.raises(BackendError):
        await serve(app).get("/", headers=U)


@pytest.mark.parametrize(
    ("result", "status", "ratelimit", "retry_after"),
    [
        (
            RateLimitResult(True, 10, 9, 0.0, 6.0, degraded=True),
            200, "limit=10, remaining=9, reset=6", None,
        ),
        (
            RateLimitResult(False, 20, 0, 0.25, 0.0, degraded=True),
            429, "limit=20, remaining=0, reset=0", "1",
        ),
        (
            RateLimitResult(True, 20, 0, 0.0, 0.0, degraded=True),
            200, "limit=20, remaining=0, reset=0", None,
        ),
    ],
    ids=["local-share", "closed", "open"],
)
async def test_answers_follow_any_result(
    serve, result, status, ratelimit, retry_after
):
    """Whatever the policy decides, degraded or not, is what is answered."""
    policy: Any = _Answering(result=result)
    app = RateLimitMiddleware(hello, policy=policy, identify=by_user_header)
    response = await serve(app).get("/", headers=U)
    assert policy.calls == 1
    assert response.status_code == status
    assert response.headers["ratelimit"] == ratelimit
    assert response.headers.get("retry-after") == retry_after


class _Untouchable:
    """A policy stand-in that fails the test if it is asked anything."""

    async def check_rate_limit(self, user_id: str, cost: float = 1) -> None:
        raise AssertionError("the policy must not be called")


@pytest.mark.parametrize("kind", ["lifespan", "websocket"])
async def test_other_scopes_pass_through(kind):
    """Lifespan and websocket scopes reach the app untouched."""
    seen = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        await send({"type": f"{kind}.marker"})

    sent = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {}

    policy: Any = _Untouchable()
    middleware = RateLimitMiddleware(app, policy=policy, identify=lambda s: "u")
    scope = {"type": kind, "path": "/", "headers": []}
    await middleware(scope, receive, send)
    assert seen == [scope]
    assert sent == [{"type": f"{kind}.marker"}]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"exclude_paths": ("health",)}, "start with '/'"),
        ({"exclude_paths": "/health"}, "collection"),
        ({"cost": 0}, "cost"),
        ({"cost": float("nan")}, "finite"),
        ({"cost": "2"}, "number"),
        ({"cost": {"/x": -1}}, "cost of /x"),
        ({"cost": {"x": 1}}, "start with '/'"),
        ({"identify": "x-api-key"}, "callable"),
    ],
)
def test_bad_options_are_refused(options, message):
    """Misconfiguration raises InvalidInputError when the app is built."""
    options.setdefault("identify", by_user_header)
    policy: Any = _Untouchable()
    with pytest.raises(InvalidInputError, match=message):
        RateLimitMiddleware(hello, policy=policy, **options)


def _scope(headers: dict[str, str], client: Any = ("10.0.0.7", 5000)) -> Any:
    return {
        "type": "http",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": client,
    }


@pytest.mark.parametrize(
    ("identify", "scope", "expected"),
    [
        (by_api_key(), _scope({"x-api-key": "s3cret"}), api_key_id("s3cret")),
        (by_api_key(), _scope({"X-API-Key": "s3cret"}), api_key_id("s3cret")),
        (by_api_key(), _scope({}), None),
        (by_api_key("auth"), _scope({"auth": "k"}), api_key_id("k")),
        (by_header("X-User-Id"), _scope({"x-user-id": "alice"}), "alice"),
        (by_header("x-user-id"), _scope({}), None),
        (by_client_address(), _scope({}), "ip:10.0.0.7"),
        (by_client_address(), _scope({}, client=None), None),
    ],
)
def test_identify_helpers(identify, scope, expected):
    """The helpers read the header or client address they are given."""
    assert identify(scope) == expected


def test_api_key_ids_hide_the_key():
    """The id of an API key is a digest: the key does not appear in it."""
    user = api_key_id("s3cret")
    assert "s3cret" not in user
    assert user.startswith("key:") and len(user) == 4 + 64
    assert api_key_id("other") != user


@pytest.mark.parametrize("header", ["", "  ", None])
def test_helpers_need_a_header_name(header):
    """A helper without a header name is refused."""
    with pytest.raises(InvalidInputError):
        by_api_key(header)  # type: ignore[arg-type]


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_framework_apps(make_policy, serve, framework):
    """add_middleware works on Starlette and FastAPI apps alike."""
    if framework == "starlette":
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def home(request: Any) -> JSONResponse:
            return JSONResponse({"hello": "world"})

        app: Any = Starlette(routes=[Route("/", home)])
    else:
        from fastapi import FastAPI

        app = FastAPI()

        @app.get("/")
        async def home() -> dict[str, str]:
            return {"hello": "world"}

    app.add_middleware(
        RateLimitMiddleware, policy=make_policy(), identify=by_api_key()
    )
    client = serve(app)
    key = {"x-api-key": "k1"}
    answers = [await client.get("/", headers=key) for _ in range(21)]
    assert [a.status_code for a in answers] == [200] * 20 + [429]
    assert answers[0].json() == {"hello": "world"}
    assert answers[0].headers["ratelimit"] == "limit=20, remaining=19, reset=3"
    assert json.loads(answers[-1].text)["detail"] == "Rate limit exceeded"
