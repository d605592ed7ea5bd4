"""Request-rate limiting for any ASGI application.

:class:`RateLimitMiddleware` is plain ASGI: it works in front of Starlette,
FastAPI or any other ASGI app and imports no web framework. Each HTTP
request is mapped to a user id by an ``identify`` function and debited from
that user's shared request bucket with one
:meth:`SecurityPolicy.check_rate_limit` call.

Every answer to a counted request carries the rate-limit fields of
``draft-ietf-httpapi-ratelimit-headers-07``, computed from that one result::

    RateLimit-Policy: 20;w=60
    RateLimit: limit=20, remaining=19, reset=3

``w=60`` because a bucket holds the profile's requests per minute and
refills at that rate; ``reset`` is the whole seconds, rounded up, until the
bucket is full again. A denied request is answered ``429`` with a
``Retry-After`` in whole seconds, rounded up.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from typing import (
    Any,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    MutableMapping,
    Optional,
    Union,
)

from ._validate import check_id, check_number
from .errors import InvalidIdError, InvalidInputError
from .models import RateLimitResult
from .policy import SecurityPolicy

__all__ = [
    "RateLimitMiddleware",
    "api_key_id",
    "by_api_key",
    "by_client_address",
    "by_header",
    "rate_limit_headers",
    "whole_seconds",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

Identity = Optional[str]
Identify = Callable[[Scope], Union[Identity, Awaitable[Identity]]]
Cost = Union[float, Mapping[str, float], Callable[[Scope], float]]

#: Seconds in which a bucket refills from empty: it holds the profile's
#: requests per minute and regains that many tokens each minute.
WINDOW_SECONDS = 60

_MAX_COST = 1e9


def whole_seconds(seconds: float) -> int:
    """Round a wait up to whole seconds, at least 0.

    The scripts' clock counts microseconds, so the value is first rounded
    to microseconds: float noise such as ``3.0000000000000004`` must not
    turn a 3 s wait into 4.
    """
    return max(0, math.ceil(round(seconds, 6)))


def rate_limit_headers(result: RateLimitResult) -> list[tuple[bytes, bytes]]:
    """Return the ``RateLimit-Policy`` and ``RateLimit`` fields of
    ``result``, plus ``Retry-After`` when it was denied with a finite
    wait."""
    headers = [
        (b"ratelimit-policy", f"{result.limit};w={WINDOW_SECONDS}".encode()),
        (
            b"ratelimit",
            (
                f"limit={result.limit}, remaining={result.remaining}, "
                f"reset={whole_seconds(result.reset_after)}"
            ).encode(),
        ),
    ]
    if not result.allowed and math.isfinite(result.retry_after):
        retry = str(whole_seconds(result.retry_after)).encode()
        headers.append((b"retry-after", retry))
    return headers


# -- identify helpers --------------------------------------------------------


def _header(scope: Scope, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            # Header bytes are ISO-8859-1 by HTTP's rules, which also maps
            # any byte sequence to text without failing.
            return bytes(value).decode("latin-1")
    return None


def _header_name(header: str) -> bytes:
    if not isinstance(header, str) or not header.strip():
        raise InvalidInputError(f"header must be a non-empty str, got {header!r}")
    return header.strip().lower().encode("latin-1")


def by_header(header: str) -> Callable[[Scope], Identity]:
    """Identify a request by the value of ``header``, as it is.

    Use it only for a header a trusted proxy sets (say ``X-User-Id``); a
    request without the header is not limited, and an empty value is
    answered ``400``.

    Raises:
        InvalidInputError: ``header`` is not a non-empty str.
    """
    name = _header_name(header)

    def identify(scope: Scope) -> Identity:
        return _header(scope, name)

    return identify


def by_api_key(header: str = "x-api-key") -> Callable[[Scope], Identity]:
    """Identify a request by the API key in ``header``.

    The user id is ``"key:"`` and the key's SHA-256 in hex, so no secret
    ends up in Redis key names or in the anomaly stream. A request without
    the header is not limited.

    Raises:
        InvalidInputError: ``header`` is not a non-empty str.
    """
    name = _header_name(header)

    def identify(scope: Scope) -> Identity:
        key = _header(scope, name)
        return None if key is None else api_key_id(key)

    return identify


def api_key_id(key: str) -> str:
    """Return the user id :func:`by_api_key` gives the API key ``key``."""
    return "key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def by_client_address() -> Callable[[Scope], Identity]:
    """Identify a request by its client's IP address (``"ip:<host>"``).

    The address is the ASGI server's ``scope["client"]``: behind a proxy it
    is the proxy's unless the server is told to trust forwarded headers
    (``uvicorn --proxy-headers --forwarded-allow-ips ...``). A request
    without a client address is not limited.
    """

    def identify(scope: Scope) -> Identity:
        client = scope.get("client")
        if not client:
            return None
        return f"ip:{client[0]}"

    return identify


# -- path rules ----------------------------------------------------------------


def _check_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidInputError(f"{what} entries must start with '/', got {path!r}")
    return path


def _matches(path: str, rule: str) -> bool:
    """Whether ``rule`` covers ``path``: the same path, or a path below it.

    ``/health`` covers ``/health`` and ``/health/live`` but not
    ``/healthz``; ``/`` covers every path.
    """
    if path == rule:
        return True
    return path.startswith(rule if rule.endswith("/") else rule + "/")


class _CostRule:
    """A request's cost: a constant, the longest matching path of a
    mapping (else 1), or a function of the scope."""

    def __init__(self, cost: Cost) -> None:
        self._function: Optional[Callable[[Scope], float]] = None
        self._table: list[tuple[str, float]] = []
        self._constant = 1.0
        if isinstance(cost, Mapping):
            for path, value in cost.items():
                _check_path(path, "cost")
                number = check_number(
                    value, f"cost of {path}", low=0, high=_MAX_COST, low_open=True
                )
                self._table.append((path, number))
            self._table.sort(key=lambda item: len(item[0]), reverse=True)
        elif callable(cost):
            self._function = cost
        else:
            self._constant = check_number(
                cost, "cost", low=0, high=_MAX_COST, low_open=True
            )

    def __call__(self, scope: Scope) -> float:
        if self._function is not None:
            return self._function(scope)
        path = scope.get("path", "")
        for rule, value in self._table:
            if _matches(path, rule):
                return value
        return self._constant


# -- the middleware ------------------------------------------------------------


class RateLimitMiddleware:
    """Debit each HTTP request from its user's shared request bucket.

    Args:
        app: the ASGI application to protect.
        policy: the policy whose ``check_rate_limit`` decides; it is called
            exactly once per counted request.
        identify: maps the ASGI scope to a user id, or to ``None`` to leave
            the request alone (not counted, no rate-limit fields). It may
            be a coroutine function. Helpers: :func:`by_api_key`,
            :func:`by_client_address`, :func:`by_header`.
        exclude_paths: paths never counted; each entry covers itself and
            every path below it (``/health`` covers ``/health/live`` but
            not ``/healthz``). Matched against ``scope["path"]``.
        cost: tokens a request takes: a number for every request, a
            mapping from path (matched like ``exclude_paths``, longest
            entry wins, other paths cost 1), or a function of the scope.

    Answers:
        * allowed: the app's own answer plus ``RateLimit-Policy`` and
          ``RateLimit``;
        * denied: ``429`` with those fields, ``Retry-After`` (whole seconds,
          rounded up; left out when the cost can never fit, or the profile
          is unreadable) and the JSON body ``{"detail": ..., "retry_after":
          seconds or null}``;
        * an id ``identify`` returned that is not a valid user id (empty,
          over 256 bytes, not a str): ``400`` with a JSON ``detail``.

    Lifespan and websocket scopes pass through untouched. Errors raised by
    ``identify``, a cost function or the policy propagate; the middleware
    answers only with what the policy decided.

    Raises:
        InvalidInputError: a bad ``exclude_paths`` entry, cost or
            ``identify``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: SecurityPolicy,
        identify: Identify,
        exclude_paths: Iterable[str] = (),
        cost: Cost = 1,
    ) -> None:
        if not callable(identify):
            raise InvalidInputError("identify must be callable")
        if isinstance(exclude_paths, str):
            raise InvalidInputError("exclude_paths must be a collection of paths")
        self.app = app
        self.policy = policy
        self.identify = identify
        self.exclude_paths = tuple(
            _check_path(path, "exclude_paths") for path in exclude_paths
        )
        self._cost = _CostRule(cost)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._excluded(scope.get("path", "")):
            await self.app(scope, receive, send)
            return

        user = self.identify(scope)
        if inspect.isawaitable(user):
            user = await user
        if user is None:
            await self.app(scope, receive, send)
            return
        try:
            check_id(user, "client identity")
        except InvalidIdError as exc:
            await _answer(send, 400, {"detail": str(exc)}, [])
            return

        result = await self.policy.check_rate_limit(user, self._cost(scope))
        headers = rate_limit_headers(result)
        if not result.allowed:
            retry = (
                whole_seconds(result.retry_after)
                if math.isfinite(result.retry_after)
                else None
            )
            body = {"detail": "Rate limit exceeded", "retry_after": retry}
            await _answer(send, 429, body, headers)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _excluded(self, path: str) -> bool:
        return any(_matches(path, rule) for rule in self.exclude_paths)


async def _answer(
    send: Send,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
