"""The async security policy: every decision is one script in Redis."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import redis.asyncio as aredis
from redis.exceptions import RedisError

from . import _cluster, _core, _outcomes
from ._core import HeldLease, ScriptCall
from ._validate import check_id
from .anomalies import AnomalyHandler, AnomalyLog, summarize
from .errors import (
    BackendError,
    LeaseLostError,
    RedisUnavailableError,
)
from .models import (
    RateLimitResult,
    SecurityCheckResult,
    UserProfile,
    UserTier,
)
from .overload import LoadMonitor, LoadSample
from .resilience import (
    DEFAULT_TIMEOUT,
    AsyncGuard,
    Resilience,
    check_timeout,
    client_options,
    close_client,
    make_client,
    sentinel_client,
)

__all__ = ["SecurityPolicy"]

logger = logging.getLogger(__name__)

LeaseLostHandler = Callable[[str, str], Any]


def connect(
    url: Union[str, Sequence[tuple[str, int]]],
    *,
    cluster: bool = False,
    **options: Any,
) -> Any:
    """Return an async client for ``url`` speaking RESP3, the protocol the
    reply parsing is written for (RESP2 replies are read as well).

    ``url`` names one server, or a Redis Cluster: a ``redis+cluster://``
    (``rediss+cluster://``) URL of any node, a ``redis://`` URL with
    ``cluster=True``, or a list of ``(host, port)`` startup nodes. A
    cluster gets a ``redis.asyncio.cluster.RedisCluster``.

    Raises:
        InvalidInputError: a malformed URL or startup node list.
    """
    return make_client(url, cluster=cluster, **options)


class SecurityPolicy:
    """Rate limits, service slots, quotas and anomalies shared through Redis.

    Any number of replicas built on the same Redis and namespace enforce
    one set of limits. Every decision is one ``EVALSHA`` that reads and
    writes the user's profile, buckets, leases and history atomically, with
    the Redis server's clock.

    Args:
        redis: a ``redis.asyncio`` client, ``RedisCluster`` included (left
            open by :meth:`close`), or a URL or list of cluster startup
            nodes as :func:`connect` takes (a client is made, and closed
            by :meth:`close`).
        namespace: prefix of every key; several apps may share one Redis.
        default_rate_limit: service starts per minute refilled into the
            start bucket (which holds ``start_burst`` starts).
        anomaly_log_path: also append each anomaly as a JSON line here.
        on_anomaly: called (or awaited) with each anomaly event.
        lease_ttl: seconds a service slot lives without renewal; leases held
            by this policy are renewed every ``lease_ttl / 3``.
        cpu_threshold: this machine's CPU percent above which starts are
            refused for the default tier and delayed for others; ``None``
            turns the check off.
        memory_threshold: likewise for memory percent.
        default_tier: the tier of users without a stored profile.
        start_burst: service starts allowed at once.
        stream_maxlen: approximate cap on the anomaly stream.
        rapid_restart_threshold: starts within a minute that are logged as
            a rapid restart (still allowed).
        on_lease_lost: called (or awaited) with ``(user_id, service_id)``
            when a renewal finds a lease lost.
        load_probe: returns this machine's load; tests pass a fixed one.
        clock: for tests and simulations only: returns seconds to use
            instead of the Redis server's clock. Leave it ``None``.
        timeout: seconds a call to Redis may take (connect, send, reply,
            one retry); a decision that misses it is made by its fail mode.
        rate_limit_fail_mode: ``"local"`` (this replica's share of the
            user's bucket), ``"open"`` (allow) or ``"closed"`` (deny):
            how :meth:`check_rate_limit` decides without Redis.
        start_fail_mode: likewise for :meth:`check_can_start_service`
            (``"closed"`` by default); nothing is reserved without Redis.
        replicas: how many replicas share the limits; a local bucket holds
            ``1 / replicas`` of the limit.
        breaker_threshold: consecutive Redis failures after which the
            policy stops waiting on Redis for ``breaker_cooldown`` seconds,
            then lets one call probe it.
        breaker_cooldown: seconds, see ``breaker_threshold``.
        monotonic: a monotonic clock in seconds for the breaker and the
            local buckets; tests pass one they move.
        auto_block_threshold: high-severity anomalies a user may cause
            within ``auto_block_window`` before the user's service starts
            are blocked for ``auto_block_duration``; ``None`` (the default)
            turns automatic blocking off. Anomalies that report the system
            (a lost lease, a corrupt profile) and attempts made while
            blocked do not count.
        auto_block_window: seconds within which offences add up.
        auto_block_duration: seconds an automatic block lasts;
            :meth:`unblock_user` lifts it sooner.

    Raises:
        InvalidInputError: a bad namespace or a number out of range.
    """

    def __init__(
        self,
        redis: Union["aredis.Redis", Any, str],
        *,
        namespace: str = "pactown",
        default_rate_limit: int = 60,
        anomaly_log_path: Union[str, Path, None] = None,
        on_anomaly: Optional[AnomalyHandler] = None,
        lease_ttl: float = 30.0,
        cpu_threshold: Optional[float] = 80.0,
        memory_threshold: Optional[float] = 85.0,
        default_tier: UserTier = UserTier.FREE,
        start_burst: int = 10,
        stream_maxlen: int = 10_000,
        rapid_restart_threshold: int = 5,
        on_lease_lost: Optional[LeaseLostHandler] = None,
        load_probe: Optional[Callable[[], LoadSample]] = None,
        clock: Optional[Callable[[], float]] = None,
        timeout: float = DEFAULT_TIMEOUT,
        rate_limit_fail_mode: str = "local",
        start_fail_mode: str = "closed",
        replicas: int = 1,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 2.0,
        monotonic: Optional[Callable[[], float]] = None,
        auto_block_threshold: Optional[int] = None,
        auto_block_window: float = 600.0,
        auto_block_duration: float = 3600.0,
    ) -> None:
        self.rules = _outcomes.make_rules(
            namespace=namespace,
            default_rate_limit=default_rate_limit,
            lease_ttl=lease_ttl,
            start_burst=start_burst,
            stream_maxlen=stream_maxlen,
            default_tier=default_tier,
            rapid_restart_threshold=rapid_restart_threshold,
            clock=clock,
        )
        self.auto_block = _core.AutoBlock.from_options(
            auto_block_threshold, auto_block_window, auto_block_duration
        )
        self.resilience = Resilience(
            self.rules,
            timeout=timeout,
            rate_limit_fail_mode=rate_limit_fail_mode,
            start_fail_mode=start_fail_mode,
            replicas=replicas,
            breaker_threshold=breaker_threshold,
            breaker_cooldown=breaker_cooldown,
            monotonic=monotonic,
        )
        if isinstance(redis, (str, list, tuple)):
            self._client = connect(redis, **client_options(timeout))
            self._owns_client = True
        else:
            self._client = redis
            self._owns_client = False
        self.keys = self.rules.keys
        self.namespace = namespace
        self.lease_ttl = float(lease_ttl)
        self.anomalies = AnomalyLog(
            self._client,
            self.keys.anomalies,
            maxlen=stream_maxlen,
            log_path=None if anomaly_log_path is None else Path(anomaly_log_path),
            on_anomaly=on_anomaly,
        )
        self._guard = AsyncGuard(
            self._client, self.resilience, self.anomalies.record
        )
        self.load = LoadMonitor(cpu_threshold, memory_threshold, probe=load_probe)
        self.on_lease_lost = on_lease_lost
        self._held: dict[str, dict[str, HeldLease]] = {}
        self._lost_fences = _outcomes.LostFences()
        self._renewer: Optional[asyncio.Task[None]] = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: Union[str, Sequence[tuple[str, int]]],
        *,
        cluster: bool = False,
        **options: Any,
    ) -> "SecurityPolicy":
        """Build a policy on a new client for ``url`` (closed by
        :meth:`close`); ``url`` and ``cluster`` are as :func:`connect`
        takes them, ``options`` as the constructor does."""
        timeout = check_timeout(options.get("timeout", DEFAULT_TIMEOUT))
        client = connect(url, cluster=cluster, **client_options(timeout))
        policy = cls(client, **options)
        policy._owns_client = True
        return policy

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        *,
        connection: Optional[dict[str, Any]] = None,
        **options: Any,
    ) -> "SecurityPolicy":
        """Build a policy on the primary that Redis Sentinel names for
        ``service_name``, asked again after a failover (closed by
        :meth:`close`). ``sentinels`` are ``(host, port)`` pairs,
        ``connection`` options of the data connections (``password``,
        ``ssl``...), ``options`` as the constructor takes them.

        Raises:
            InvalidInputError: bad sentinels, service name or options.
        """
        timeout = check_timeout(options.get("timeout", DEFAULT_TIMEOUT))
        client = sentinel_client(
            sentinels, service_name, timeout=timeout, **(connection or {})
        )
        policy = cls(client, **options)
        policy._owns_client = True
        return policy

    def __repr__(self) -> str:
        return f"SecurityPolicy(namespace={self.namespace!r})"

    async def __aenter__(self) -> "SecurityPolicy":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop renewing leases, publish pending anomalies, and close the
        client if this policy made it. Held leases are not released: they
        expire within ``lease_ttl`` unless another replica renews them."""
        if self._closed:
            return
        self._closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        await self.anomalies.flush()
        await self._guard.close()
        if self._owns_client:
            await close_client(self._client)

    # -- sending -------------------------------------------------------------

    async def _run(self, call: ScriptCall) -> Any:
        # Deadline, one safe retry, NOSCRIPT recovery and the breaker;
        # raises RedisUnavailableError when Redis cannot decide in time.
        return await self._guard.run(call)

    # -- profiles --------------------------------------------------------------

    async def set_user_profile(self, profile: UserProfile) -> None:
        """Store ``profile``; every replica applies it at its next decision.

        Raises:
            InvalidInputError: ``profile`` is not a valid ``UserProfile``.
        """
        profile = _outcomes.checked_profile(profile)
        await self._write_profile(profile, patch=())

    async def _write_profile(
        self, profile: UserProfile, patch: tuple[str, ...]
    ) -> None:
        await self._run(_outcomes.profile_call(self.keys, profile, patch))

    async def get_user_profile(self, user_id: str) -> UserProfile:
        """Return the stored profile, or the default tier's when none is.

        Raises:
            CorruptProfileError: the stored profile is unreadable.
        """
        raw = await self._client.hgetall(self.keys.user(user_id).profile)
        return _core.hash_to_profile(user_id, raw, self.rules)

    async def delete_user_profile(self, user_id: str) -> bool:
        """Remove a stored profile; the user falls back to the default tier."""
        return bool(await self._client.delete(self.keys.user(user_id).profile))

    async def block_user(self, user_id: str, reason: str = "") -> None:
        """Block ``user_id`` from starting services, on every replica."""
        await self._set_blocked(user_id, True, reason)

    async def unblock_user(self, user_id: str) -> None:
        """Lift a block set by :meth:`block_user` and an automatic block,
        and forget the user's strikes."""
        await self._set_blocked(user_id, False, "")
        keys = self.keys.user(user_id)
        try:
            await self._client.delete(keys.auto_block, keys.strikes)
        except RedisError as exc:
            raise BackendError(f"unblock failed: {type(exc).__name__}") from exc

    async def _set_blocked(self, user_id: str, blocked: bool, reason: str) -> None:
        profile = _outcomes.block_profile(
            user_id, blocked, reason, self.rules.default_tier
        )
        await self._write_profile(profile, patch=_outcomes.BLOCK_FIELDS)

    # -- request rate ------------------------------------------------------------

    async def check_rate_limit(
        self, user_id: str, cost: float = 1
    ) -> RateLimitResult:
        """Debit ``cost`` tokens from the user's request bucket.

        The bucket holds ``max_requests_per_minute`` tokens and refills at
        that many per minute. A denied request debits nothing and records a
        ``RATE_LIMIT_EXCEEDED`` anomaly. Without Redis in time, the result
        comes from ``rate_limit_fail_mode`` and says ``degraded=True``.

        Raises:
            InvalidInputError: bad ``user_id`` or ``cost`` (must be > 0).
            BackendError: Redis answered with an unexpected error.
        """
        call = _core.rate_limit_call(self.rules, user_id, cost)
        try:
            reply = await self._run(call)
        except RedisUnavailableError:
            return self.resilience.rate_limit(user_id, cost)
        result, events = _outcomes.rate_decision(user_id, cost, reply)
        self.resilience.remember_limit(user_id, result.limit)
        for event in events:
            self.anomalies.record(event)
        return result

    async def check_many(
        self, requests: Sequence[Union[str, tuple[str, float]]]
    ) -> list[RateLimitResult]:
        """Debit many requests in one round trip; return their results in
        order.

        Each request is a user id (cost 1) or a ``(user_id, cost)`` pair;
        one user may appear many times, and is debited in order. Each debit
        is decided exactly as :meth:`check_rate_limit` decides it, denials
        and their anomalies included; the debits only share the trip to
        Redis. Over 512 requests travel in parts of 512, each sent once the
        previous one is answered. A debit Redis did not decide in time
        (all of them, or a part and those after it) is decided by
        ``rate_limit_fail_mode``.

        Raises:
            InvalidInputError: a bad request, id or cost, or more than
                10 000 requests; nothing is debited then.
            BackendError: Redis answered with an unexpected error.
        """
        debits = _outcomes.many_calls(self.rules, requests)
        try:
            replies = await self._guard.run_many([call for *_, call in debits])
        except RedisUnavailableError:
            replies = [None] * len(debits)
        return self.resilience.settle_debits(
            debits, replies, self.anomalies.record
        )

    # -- services ----------------------------------------------------------------

    async def check_can_start_service(
        self,
        user_id: str,
        service_id: str,
        port: Optional[int] = None,
        memory_mb: float = 0,
        cpu_percent: float = 0,
    ) -> SecurityCheckResult:
        """Check every limit and, when all pass, reserve the service's slot.

        Checks, in order: blocked, automatically blocked (see
        ``auto_block_threshold``), start rate, concurrent services, starts
        in the last hour, port, memory and CPU quotas (sums over the user's
        running services), this replica's load. Checking and reserving are
        one script, so two replicas never both take a user's last slot. A
        ``service_id`` that already holds a slot is renewed, not reserved
        twice. The slot is then a lease this policy renews until
        :meth:`unregister_service`. Without Redis in time, the result comes
        from ``start_fail_mode``, says ``degraded=True`` and reserves
        nothing.

        Raises:
            InvalidInputError: a bad id, port (1-65535), memory or CPU.
            BackendError: Redis answered with an unexpected error.
        """
        excess = self.load.excess()
        check = _outcomes.start_check(
            self.rules, self.auto_block, user_id, service_id, port, memory_mb,
            cpu_percent, excess=excess, delay=self.load.delay_for(excess),
        )
        try:
            outcome = _core.parse_start(await self._run(check.call))
        except RedisUnavailableError:
            return self.resilience.start(user_id)
        decision = check.decide(outcome)
        if decision.lease is not None:
            self._hold(user_id, service_id, decision.lease)
        for event in decision.events:
            self.anomalies.record(event)
        await self._strike(decision.strikes)
        return decision.result

    async def _strike(self, strikes: tuple[_outcomes.Strike, ...]) -> None:
        """Count ``strikes``; record the block one of them sets."""
        for strike in strikes:
            try:
                blocked = strike.blocked_event(await self._run(strike.call))
            except BackendError as exc:
                # The decision stands; only this strike goes uncounted.
                logger.warning("cannot count a strike: %s", exc)
                continue
            if blocked is not None:
                self.anomalies.record(blocked)

    def _hold(self, user_id: str, service_id: str, lease: HeldLease) -> None:
        self._held.setdefault(user_id, {})[service_id] = lease
        self._lost_fences.forget(user_id, service_id)
        if self._renewer is None and not self._closed:
            self._renewer = asyncio.get_running_loop().create_task(
                self._renew_forever(), name="pactown-redis lease renewer"
            )

    def _drop(self, user_id: str, service_id: str) -> None:
        held = self._held.get(user_id)
        if held is not None:
            held.pop(service_id, None)
            if not held:
                del self._held[user_id]

    async def register_service(self, user_id: str, service_id: str) -> int:
        """Confirm or renew the slot of a running service; idempotent.

        Returns the lease's fencing token.

        Raises:
            LeaseLostError: the service holds no slot (it was never
                reserved, expired, or was released).
            BackendError: Redis failed.
        """
        check_id(service_id, "service_id")
        held = self._held.get(user_id, {}).get(service_id)
        outcome = (await self._renew(user_id, {service_id: held}))[0]
        if outcome.status == "lost":
            raise LeaseLostError(user_id, service_id)
        return outcome.fence

    async def unregister_service(self, user_id: str, service_id: str) -> bool:
        """Free a service's slot; returns whether a slot was freed.

        Only the lease this policy holds (or last held, if it found the
        lease lost) is freed; a service this policy never held frees
        whichever lease holds it.
        """
        held = self._held.get(user_id, {}).get(service_id)
        fence = self._lost_fences.release_fence(user_id, service_id, held)
        call = _core.release_call(self.rules, user_id, service_id, fence)
        removed = bool(await self._run(call))
        self._drop(user_id, service_id)
        self._lost_fences.forget(user_id, service_id)
        return removed

    async def renew_leases(self) -> list[_core.RenewOutcome]:
        """Renew every lease this policy holds, now; the background task
        calls this every ``lease_ttl / 3``. Lost leases are dropped and
        reported (``LEASE_LOST`` anomaly and ``on_lease_lost``)."""
        outcomes = []
        for user_id, held in list(self._held.items()):
            outcomes += await self._renew(user_id, dict(held))
        return outcomes

    async def _renew(
        self, user_id: str, leases: dict[str, Optional[HeldLease]]
    ) -> list[_core.RenewOutcome]:
        call = _core.renew_call(self.rules, user_id, leases)
        outcomes = _core.parse_renew(list(leases), await self._run(call))
        for outcome, held in zip(outcomes, leases.values()):
            if outcome.status == "lost":
                if held is not None:
                    await self._lost(user_id, outcome.service_id, held.fence)
                continue
            self._hold(
                user_id,
                outcome.service_id,
                _outcomes.renewed_lease(outcome, held),
            )
        return outcomes

    async def _lost(self, user_id: str, service_id: str, fence: int) -> None:
        self._drop(user_id, service_id)
        self._lost_fences.remember(user_id, service_id, fence)
        self.anomalies.record(_outcomes.lease_lost_event(user_id, service_id))
        if self.on_lease_lost is not None:
            try:
                outcome = self.on_lease_lost(user_id, service_id)
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception:  # noqa: BLE001 - a handler's bug is its own
                logger.warning("on_lease_lost handler failed", exc_info=True)

    async def _renew_forever(self) -> None:
        period = self.lease_ttl / 3
        while True:
            await asyncio.sleep(period)
            try:
                await self.renew_leases()
            except Exception as exc:  # noqa: BLE001 - retried next period
                logger.warning("lease renewal failed, retrying: %s", exc)

    def held_leases(self) -> dict[str, dict[str, HeldLease]]:
        """Return a copy of the leases this policy holds, by user."""
        return {user: dict(held) for user, held in self._held.items()}

    # -- reading state -----------------------------------------------------------

    async def get_user_state(self, user_id: str) -> _core.UserState:
        """Return the user's tokens, live leases and recent starts.

        Raises:
            CorruptProfileError: the stored profile is unreadable.
        """
        reply = await self._run(_core.inspect_call(self.rules, user_id))
        return _core.parse_inspect(user_id, reply)

    async def get_user_service_count(self, user_id: str) -> int:
        """Return how many services of the user hold a live slot."""
        return (await self.get_user_state(user_id)).running

    async def get_services_started_last_hour(self, user_id: str) -> int:
        """Return how many services the user started in the last hour."""
        return (await self.get_user_state(user_id)).started_last_hour

    async def get_anomaly_summary(self, hours: float = 24) -> dict[str, Any]:
        """Return anomaly totals by type and severity, the top users and
        the recent critical events of the last ``hours``."""
        span_ms = _outcomes.summary_span_ms(hours)
        now_ms = await self._now_ms()
        events = await self.anomalies.since(max(0, now_ms - span_ms))
        return summarize(events, hours)

    async def _now_ms(self) -> int:
        # Stream ids carry the server's time, even under a test clock.
        return _cluster.time_ms(await self._client.time())

