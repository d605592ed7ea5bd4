"""Fixtures shared by the whole suite.

Behaviour tests run as one matrix over two backends: ``fake`` (fakeredis
with Lua, in process) and ``real`` (a ``redis-server`` this session starts
on a free port and stops at the end). The real server is required: when it
cannot start, those tests fail rather than skip.

Time is controlled: policies built here take their clock from a
:class:`Clock` the test moves, so refills and lease expiry are tested
without sleeping.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Iterator

import fakeredis
import pytest
import redis.asyncio as aredis

from pactown_redis import SecurityPolicy
from servers import RedisServer

BACKENDS = ("fake", "real")


class Clock:
    """A clock the test moves by hand, in seconds."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server for the whole session."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test."""
    return str(request.param)


@pytest.fixture
async def redis_client(
    backend: str, request: pytest.FixtureRequest
) -> AsyncIterator[aredis.Redis]:
    """An empty Redis of the backend under test."""
    if backend == "fake":
        client = fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(), protocol=3
        )
    else:
        server = request.getfixturevalue("redis_server")
        client = aredis.from_url(server.url, protocol=3)
        await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def clock() -> Clock:
    """The clock of the policies built by ``make_policy``."""
    return Clock()


@pytest.fixture
async def make_policy(
    redis_client: aredis.Redis, clock: Clock
) -> AsyncIterator[Callable[..., SecurityPolicy]]:
    """Build policies on the backend under test, closed at the end.

    Overload checks are off unless a test passes thresholds and a probe.
    The deadline is generous, so that a busy test machine never turns a
    decision into a degraded one; tests of the deadline set their own.
    """
    made: list[SecurityPolicy] = []

    def build(**options: object) -> SecurityPolicy:
        options.setdefault("clock", clock)
        options.setdefault("cpu_threshold", None)
        options.setdefault("memory_threshold", None)
        options.setdefault("timeout", 10.0)
        policy = SecurityPolicy(redis_client, **options)  # type: ignore[arg-type]
        made.append(policy)
        return policy

    yield build
    for policy in made:
        await policy.close()


@pytest.fixture
async def policy(make_policy: Callable[..., SecurityPolicy]) -> SecurityPolicy:
    """A policy with default options on the backend under test."""
    return make_policy()
