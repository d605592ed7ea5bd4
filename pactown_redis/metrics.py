"""Prometheus metrics of a policy's decisions, attached from outside.

Needs the ``prometheus`` extra (``pip install 'pactown-redis[prometheus]'``).
:func:`instrument` wraps a policy's public methods on that one object and
chains its ``on_anomaly`` handler; the policy's code is unchanged and a
policy that is not instrumented pays nothing.

Metrics (with the default ``prefix="pactown"``):

=====================================  =========  ======================
name                                   type       labels
=====================================  =========  ======================
``pactown_decisions_total``            counter    check, outcome
``pactown_decision_seconds``           histogram  check
``pactown_redis_errors_total``         counter    operation
``pactown_anomalies_total``            counter    type
``pactown_degraded_decisions_total``   counter    check
=====================================  =========  ======================

``check`` is ``rate_limit`` or ``start``; ``outcome`` is ``allowed`` or
``denied``. Latency covers every call that reached Redis, failed ones
included. ``operation`` names the policy method that raised
``BackendError`` (``check_rate_limit``, ``check_can_start_service``,
``register_service``, ``unregister_service``, ``renew_leases``, the last
also when the background renewer calls it). Anomalies are counted when
they are published (``await policy.anomalies.flush()`` waits for that).
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Any, Awaitable, Callable, Optional

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "pactown_redis.metrics needs prometheus-client: "
        "pip install 'pactown-redis[prometheus]'"
    ) from exc

from .errors import BackendError, InvalidInputError
from .models import AnomalyEvent

__all__ = ["PolicyMetrics", "instrument"]

#: Decision latency buckets, in seconds: one script round trip is usually
#: well under a millisecond on a local network.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5,
)

# Method name -> the ``check`` label of a decision it makes.
_DECISIONS = {
    "check_rate_limit": "rate_limit",
    "check_can_start_service": "start",
}
_OTHER_CALLS = ("register_service", "unregister_service", "renew_leases")

# One set of collectors per registry, so that several policies of one
# process can be instrumented without registering a name twice.
_BY_REGISTRY: "weakref.WeakKeyDictionary[CollectorRegistry, PolicyMetrics]" = (
    weakref.WeakKeyDictionary()
)


class PolicyMetrics:
    """The collectors of one registry; attach policies with
    :meth:`attach` (or call :func:`instrument`).

    Raises:
        ValueError: from ``prometheus_client`` when ``registry`` already
            holds collectors of these names (use :func:`instrument`,
            which makes one ``PolicyMetrics`` per registry).
    """

    def __init__(
        self,
        registry: Optional[CollectorRegistry] = None,
        *,
        prefix: str = "pactown",
    ) -> None:
        self.registry = REGISTRY if registry is None else registry
        options: dict[str, Any] = {"registry": self.registry}
        self.decisions = Counter(
            f"{prefix}_decisions",
            "Policy decisions, by check and outcome.",
            ("check", "outcome"),
            **options,
        )
        self.latency = Histogram(
            f"{prefix}_decision_seconds",
            "Time to a decision, Redis round trip included.",
            ("check",),
            buckets=LATENCY_BUCKETS,
            **options,
        )
        self.redis_errors = Counter(
            f"{prefix}_redis_errors",
            "Policy calls that failed because Redis failed.",
            ("operation",),
            **options,
        )
        self.anomalies = Counter(
            f"{prefix}_anomalies",
            "Anomaly events recorded, by type.",
            ("type",),
            **options,
        )
        self.degraded = Counter(
            f"{prefix}_degraded_decisions",
            "Decisions made without Redis, by check.",
            ("check",),
            **options,
        )

    def attach(self, policy: Any) -> Any:
        """Count ``policy``'s decisions, errors and anomalies here; return
        the policy.

        Raises:
            InvalidInputError: ``policy`` is already instrumented.
        """
        if getattr(policy.check_rate_limit, "pactown_metrics", None) is not None:
            raise InvalidInputError(f"{policy!r} is already instrumented")
        for name, check in _DECISIONS.items():
            setattr(policy, name, self._decision(getattr(policy, name), name, check))
        for name in _OTHER_CALLS:
            setattr(policy, name, self._call(getattr(policy, name), name))
        policy.anomalies.on_anomaly = self._anomaly_handler(
            policy.anomalies.on_anomaly
        )
        return policy

    def _decision(
        self, method: Callable[..., Awaitable[Any]], name: str, check: str
    ) -> Callable[..., Awaitable[Any]]:
        latency = self.latency.labels(check)
        allowed = self.decisions.labels(check, "allowed")
        denied = self.decisions.labels(check, "denied")
        degraded = self.degraded.labels(check)
        errors = self.redis_errors.labels(name)

        @functools.wraps(method)
        async def decide(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                result = await method(*args, **kwargs)
            except BackendError:
                latency.observe(time.perf_counter() - started)
                errors.inc()
                raise
            latency.observe(time.perf_counter() - started)
            (allowed if result.allowed else denied).inc()
            if result.degraded:
                degraded.inc()
            return result

        decide.pactown_metrics = self  # type: ignore[attr-defined]
        return decide

    def _call(
        self, method: Callable[..., Awaitable[Any]], name: str
    ) -> Callable[..., Awaitable[Any]]:
        errors = self.redis_errors.labels(name)

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method(*args, **kwargs)
            except BackendError:
                errors.inc()
                raise

        return call

    def _anomaly_handler(
        self, previous: Optional[Callable[[AnomalyEvent], Any]]
    ) -> Callable[[AnomalyEvent], Any]:
        def count(event: AnomalyEvent) -> Any:
            self.anomalies.labels(event.anomaly_type.value).inc()
            # The policy awaits what the handler returns when it is
            # awaitable, so an async handler it had keeps working.
            return None if previous is None else previous(event)

        return count


def instrument(
    policy: Any, registry: Optional[CollectorRegistry] = None
) -> PolicyMetrics:
    """Count ``policy``'s decisions in ``registry`` (default: the
    ``prometheus_client`` default registry) and return the metrics.

    Policies instrumented into one registry share its collectors.

    Raises:
        InvalidInputError: ``policy`` is already instrumented.
    """
    target = REGISTRY if registry is None else registry
    metrics = _BY_REGISTRY.get(target)
    if metrics is None:
        metrics = PolicyMetrics(target)
        _BY_REGISTRY[target] = metrics
    metrics.attach(policy)
    return metrics
