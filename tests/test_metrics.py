"""Prometheus metrics attached to a policy from outside."""

from __future__ import annotations

from typing import Any, Optional

import httpx
import pytest
import redis.asyncio as aredis
from prometheus_client import CollectorRegistry
from redis.backoff import NoBackoff
from redis.retry import Retry

from pactown_redis import (
    BackendError,
    InvalidInputError,
    RateLimitResult,
    SecurityCheckResult,
    SecurityPolicy,
)
from pactown_redis.asgi import RateLimitMiddleware
from pactown_redis.metrics import PolicyMetrics, instrument
from servers import free_port


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of this test's own."""
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sample ``name`` with ``labels``, 0 when it was never set."""
    return registry.get_sample_value(name, labels) or 0.0


async def test_rate_decisions_by_outcome(make_policy, registry):
    """21 checks of a FREE user count 20 allowed, 1 denied, 21 timings."""
    policy = make_policy()
    instrument(policy, registry)
    for _ in range(21):
        await policy.check_rate_limit("u")
    labels = {"check": "rate_limit"}
    assert value(registry, "pactown_decisions_total", **labels, outcome="allowed") == 20
    assert value(registry, "pactown_decisions_total", **labels, outcome="denied") == 1
    assert value(registry, "pactown_decision_seconds_count", **labels) == 21
    assert value(registry, "pactown_decision_seconds_sum", **labels) > 0


async def test_start_decisions_and_anomalies(make_policy, registry):
    """Starts are counted by outcome; their anomalies by type."""
    policy = make_policy()
    instrument(policy, registry)
    for name in ("a", "b", "c"):
        await policy.check_can_start_service("u", name)
    await policy.anomalies.flush()
    assert value(
        registry, "pactown_decisions_total", check="start", outcome="allowed"
    ) == 2
    assert value(
        registry, "pactown_decisions_total", check="start", outcome="denied"
    ) == 1
    assert value(
        registry, "pactown_anomalies_total", type="concurrent_limit_exceeded"
    ) == 1
    assert value(registry, "pactown_anomalies_total", type="rate_limit_exceeded") == 0


async def test_invalid_input_is_not_a_decision(make_policy, registry):
    """A call refused before reaching Redis counts nothing."""
    policy = make_policy()
    instrument(policy, registry)
    with pytest.raises(InvalidInputError):
        await policy.check_rate_limit("")
    assert value(registry, "pactown_decision_seconds_count", check="rate_limit") == 0


@pytest.mark.parametrize("handler_kind", ["sync", "async"])
async def test_an_existing_anomaly_handler_keeps_working(
    make_policy, registry, handler_kind
):
    """The policy's own on_anomaly is still called, sync or async."""
    seen = []
    if handler_kind == "sync":
        handler: Any = seen.append
    else:

        async def handler(event: Any) -> None:
            seen.append(event)

    policy = make_policy(on_anomaly=handler)
    instrument(policy, registry)
    for _ in range(21):
        await policy.check_rate_limit("u")
    await policy.anomalies.flush()
    assert [e.anomaly_type.value for e in seen] == ["rate_limit_exceeded"]
    assert value(registry, "pactown_anomalies_total", type="rate_limit_exceeded") == 1


@pytest.fixture
async def dead_policy():
    """A policy whose Redis refuses every connection."""
    client = aredis.Redis(
        host="127.0.0.1", port=free_port(), protocol=3, retry=Retry(NoBackoff(), 0)
    )
    policy = SecurityPolicy(client, cpu_threshold=None, memory_threshold=None)
    yield policy
    await policy.close()
    await client.aclose()


@pytest.mark.parametrize(
    ("operation", "args"),
    [
        ("register_service", ("u", "s")),
        ("unregister_service", ("u", "s")),
    ],
)
async def test_redis_errors_by_operation(dead_policy, registry, operation, args):
    """A BackendError from a dead Redis is counted under its method."""
    instrument(dead_policy, registry)
    with pytest.raises(BackendError):
        await getattr(dead_policy, operation)(*args)
    assert value(registry, "pactown_redis_errors_total", operation=operation) == 1


class _StandIn:
    """A stand-in policy that answers or fails as the test says.

    It checks that the metrics read whatever comes back, degraded results
    and errors raised by a decision included, whichever way the policy
    itself handles an unavailable Redis.
    """

    class anomalies:  # noqa: N801 - mirrors the policy's attribute
        on_anomaly = None

    def __init__(self, degraded: bool = False, fail: bool = False) -> None:
        self.degraded = degraded
        self.fail = fail

    def _maybe_fail(self) -> None:
        if self.fail:
            raise BackendError("Redis is down")

    async def check_rate_limit(self, user_id: str, cost: float = 1) -> Any:
        self._maybe_fail()
        return RateLimitResult(True, 20, 19, 0.0, 3.0, degraded=self.degraded)

    async def check_can_start_service(self, *args: Any, **kw: Any) -> Any:
        self._maybe_fail()
        return SecurityCheckResult(False, degraded=self.degraded)

    async def register_service(self, *args: Any) -> int:
        return 1

    async def unregister_service(self, *args: Any) -> bool:
        return True

    async def renew_leases(self) -> list[Any]:
        self._maybe_fail()
        return []


@pytest.mark.parametrize(
    ("method", "args", "check"),
    [
        ("check_rate_limit", ("u",), "rate_limit"),
        ("check_can_start_service", ("u", "s"), "start"),
    ],
)
async def test_failed_decisions(registry, method, args, check):
    """A decision that raised is an error, timed, and not a decision."""
    policy = _StandIn(fail=True)
    instrument(policy, registry)
    with pytest.raises(BackendError):
        await getattr(policy, method)(*args)
    assert value(registry, "pactown_redis_errors_total", operation=method) == 1
    assert value(registry, "pactown_decision_seconds_count", check=check) == 1
    for outcome in ("allowed", "denied"):
        assert value(
            registry, "pactown_decisions_total", check=check, outcome=outcome
        ) == 0


async def test_renewal_errors_are_counted(registry):
    """A failed renew_leases (the background renewer's call) is counted."""
    policy = _StandIn(fail=True)
    instrument(policy, registry)
    with pytest.raises(BackendError):
        await policy.renew_leases()
    assert value(
        registry, "pactown_redis_errors_total", operation="renew_leases"
    ) == 1


@pytest.mark.parametrize(("degraded", "counted"), [(True, 1), (False, 0)])
async def test_degraded_decisions(registry, degraded, counted):
    """Decisions flagged degraded are counted apart, by check."""
    policy = _StandIn(degraded=degraded)
    instrument(policy, registry)
    await policy.check_rate_limit("u")
    await policy.check_can_start_service("u", "s")
    for check in ("rate_limit", "start"):
        sample = value(registry, "pactown_degraded_decisions_total", check=check)
        assert sample == counted
    assert value(registry, "pactown_decisions_total", check="start",
                 outcome="denied") == 1


async def test_policies_share_one_registry(make_policy, registry):
    """Several policies count into one registry's collectors."""
    first, second = make_policy(), make_policy()
    assert instrument(first, registry) is instrument(second, registry)
    await first.check_rate_limit("u")
    await second.check_rate_limit("u")
    assert value(registry, "pactown_decisions_total", check="rate_limit",
                 outcome="allowed") == 2


async def test_instrumenting_twice_is_refused(make_policy, registry):
    """A policy is instrumented at most once."""
    policy = make_policy()
    instrument(policy, registry)
    with pytest.raises(InvalidInputError, match="already instrumented"):
        instrument(policy, CollectorRegistry())


def test_one_registry_cannot_hold_two_metric_sets(registry):
    """Building PolicyMetrics twice on one registry fails loudly."""
    PolicyMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated"):
        PolicyMetrics(registry)


async def test_middleware_decisions_are_counted_once(make_policy, registry):
    """Behind the middleware each request is one counted decision."""
    policy = make_policy()
    instrument(policy, registry)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    def identify(scope: Any) -> Optional[str]:
        return "u"

    middleware = RateLimitMiddleware(app, policy=policy, identify=identify)
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        statuses = [(await c.get("/")).status_code for _ in range(22)]
    assert statuses == [204] * 20 + [429] * 2
    for outcome, count in (("allowed", 20), ("denied", 2)):
        assert value(registry, "pactown_decisions_total", check="rate_limit",
                     outcome=outcome) == count
