"""The async security policy: every decision is one script in Redis."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Union

import redis.asyncio as aredis
from redis.exceptions import NoScriptError, RedisError

from . import _core
from ._core import HeldLease, Rules, ScriptCall
from ._validate import check_id, check_number
from .anomalies import AnomalyHandler, AnomalyLog, summarize
from .errors import (
    BackendError,
    CorruptProfileError,
    InvalidInputError,
    LeaseLostError,
)
from .keys import KeySpace
from .models import (
    AnomalyEvent,
    AnomalyType,
    RateLimitResult,
    SecurityCheckResult,
    Severity,
    UserProfile,
    UserTier,
    utcnow,
)
from .overload import LoadMonitor, LoadSample
from .scripts import script

__all__ = ["SecurityPolicy"]

logger = logging.getLogger(__name__)

LeaseLostHandler = Callable[[str, str], Any]


def connect(url: str, **options: Any) -> "aredis.Redis":
    """Return an async client for ``url`` speaking RESP3, the protocol the
    reply parsing is written for (RESP2 replies are read as well)."""
    options.setdefault("protocol", 3)
    return aredis.from_url(url, **options)


class SecurityPolicy:
    """Rate limits, service slots, quotas and anomalies shared through Redis.

    Any number of replicas built on the same Redis and namespace enforce
    one set of limits. Every decision is one ``EVALSHA`` that reads and
    writes the user's profile, buckets, leases and history atomically, with
    the Redis server's clock.

    Args:
        redis: a ``redis.asyncio`` client (left open by :meth:`close`) or a
            URL (a client is made, and closed by :meth:`close`).
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
    ) -> None:
        check_number(
            default_rate_limit, "default_rate_limit", low=0, high=1e8,
            low_open=True,
        )
        check_number(lease_ttl, "lease_ttl", low=0.01, high=86400.0)
        check_number(start_burst, "start_burst", low=1, high=1e6, integer=True)
        check_number(stream_maxlen, "stream_maxlen", low=1, high=1e9, integer=True)
        if isinstance(redis, str):
            self._client = connect(redis)
            self._owns_client = True
        else:
            self._client = redis
            self._owns_client = False
        self.keys = KeySpace(namespace)
        self.namespace = namespace
        self.lease_ttl = float(lease_ttl)
        self.rules = Rules(
            keys=self.keys,
            default_tier=UserTier(default_tier),
            lease_ms=max(1, int(lease_ttl * 1000)),
            start_burst=start_burst,
            start_per_minute=float(default_rate_limit),
            rapid_threshold=rapid_restart_threshold,
            clock=clock,
        )
        self.anomalies = AnomalyLog(
            self._client,
            self.keys.anomalies,
            maxlen=stream_maxlen,
            log_path=None if anomaly_log_path is None else Path(anomaly_log_path),
            on_anomaly=on_anomaly,
        )
        self.load = LoadMonitor(cpu_threshold, memory_threshold, probe=load_probe)
        self.on_lease_lost = on_lease_lost
        self._held: dict[str, dict[str, HeldLease]] = {}
        self._renewer: Optional[asyncio.Task[None]] = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "SecurityPolicy":
        """Build a policy on a new client for ``url`` (closed by
        :meth:`close`)."""
        return cls(url, **options)

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
        if self._owns_client:
            await self._client.aclose()

    # -- sending -------------------------------------------------------------

    async def _run(self, call: ScriptCall) -> Any:
        try:
            try:
                return await self._client.evalsha(*call.evalsha_args())
            except NoScriptError:
                # Nothing ran; EVAL runs the script once and caches it again.
                return await self._client.eval(*call.eval_args())
        except RedisError as exc:
            raise BackendError(
                f"{call.script.name} failed: {type(exc).__name__}: {exc}"
            ) from exc

    def _record(
        self,
        anomaly_type: AnomalyType,
        details: str,
        *,
        user_id: Optional[str],
        service_id: Optional[str] = None,
        severity: Severity = Severity.MEDIUM,
        metadata: Optional[dict[str, Any]] = None,
    ) -> AnomalyEvent:
        event = AnomalyEvent(
            timestamp=utcnow(),
            anomaly_type=anomaly_type,
            user_id=user_id,
            service_id=service_id,
            details=details,
            severity=severity,
            metadata=metadata or {},
        )
        return self.anomalies.record(event)

    def _corrupt(self, exc: CorruptProfileError) -> AnomalyEvent:
        return self._record(
            AnomalyType.PROFILE_CORRUPT,
            str(exc),
            user_id=exc.user_id,
            severity=Severity.HIGH,
            metadata={"field": exc.field},
        )

    # -- profiles --------------------------------------------------------------

    async def set_user_profile(self, profile: UserProfile) -> None:
        """Store ``profile``; every replica applies it at its next decision.

        Raises:
            InvalidInputError: ``profile`` is not a valid ``UserProfile``.
        """
        if not isinstance(profile, UserProfile):
            raise InvalidInputError(
                f"profile must be a UserProfile, not {type(profile).__name__}"
            )
        profile = UserProfile.parse(profile.model_dump())
        await self._write_profile(profile, patch=())

    async def _write_profile(
        self, profile: UserProfile, patch: tuple[str, ...]
    ) -> None:
        stored = _core.profile_to_hash(profile)
        pairs = [item for pair in stored.items() for item in pair]
        await self._run(
            ScriptCall(
                script("write_profile.lua"),
                (self.keys.user(profile.user_id).profile,),
                [",".join(patch), *pairs],
            )
        )

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
        """Lift a block set by :meth:`block_user`."""
        await self._set_blocked(user_id, False, "")

    async def _set_blocked(self, user_id: str, blocked: bool, reason: str) -> None:
        if not isinstance(reason, str):
            raise InvalidInputError("reason must be str")
        base = UserProfile.from_tier(user_id, self.rules.default_tier)
        profile = UserProfile.parse(
            {**base.model_dump(), "blocked": blocked, "reason": reason or None}
        )
        await self._write_profile(profile, patch=("blocked", "reason"))

    # -- request rate ------------------------------------------------------------

    async def check_rate_limit(
        self, user_id: str, cost: float = 1
    ) -> RateLimitResult:
        """Debit ``cost`` tokens from the user's request bucket.

        The bucket holds ``max_requests_per_minute`` tokens and refills at
        that many per minute. A denied request debits nothing and records a
        ``RATE_LIMIT_EXCEEDED`` anomaly.

        Raises:
            InvalidInputError: bad ``user_id`` or ``cost`` (must be > 0).
            BackendError: Redis failed.
        """
        call = _core.rate_limit_call(self.rules, user_id, cost)
        try:
            result = _core.parse_rate_limit(user_id, await self._run(call))
        except CorruptProfileError as exc:
            self._corrupt(exc)
            return RateLimitResult(False, 0, 0, float("inf"), 0.0)
        if not result.allowed:
            self._record(
                AnomalyType.RATE_LIMIT_EXCEEDED,
                "Rate limit exceeded",
                user_id=user_id,
                metadata={"cost": cost, "retry_after": result.retry_after},
            )
        return result

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

        Checks, in order: blocked, start rate, concurrent services, starts
        in the last hour, port, memory and CPU quotas (sums over the user's
        running services), this replica's load. Checking and reserving are
        one script, so two replicas never both take a user's last slot. A
        ``service_id`` that already holds a slot is renewed, not reserved
        twice. The slot is then a lease this policy renews until
        :meth:`unregister_service`.

        Raises:
            InvalidInputError: a bad id, port (1-65535), memory or CPU.
            BackendError: Redis failed.
        """
        excess = self.load.excess()
        call = _core.start_call(
            self.rules,
            user_id,
            service_id,
            port=port,
            memory_mb=memory_mb,
            cpu_percent=cpu_percent,
            overloaded=excess > 0,
        )
        try:
            outcome = _core.parse_start(await self._run(call))
        except CorruptProfileError as exc:  # pragma: no cover - parse_start
            raise BackendError(str(exc)) from exc
        if outcome.status == "corrupt":
            event = self._corrupt(CorruptProfileError(user_id, outcome.detail))
            return SecurityCheckResult(
                allowed=False,
                reason="Stored user profile is corrupt. Contact support.",
                anomaly=event,
            )
        if not outcome.allowed:
            return self._deny(outcome, user_id, service_id)
        return self._grant(outcome, user_id, service_id, memory_mb, cpu_percent,
                           excess)

    def _deny(
        self, outcome: _core.StartOutcome, user_id: str, service_id: str
    ) -> SecurityCheckResult:
        denial = _core.describe_denial(outcome, user_id)
        retry = outcome.retry_after if outcome.status in ("rate", "hourly") else None
        event = self._record(
            denial.anomaly_type,
            denial.details,
            user_id=user_id,
            service_id=service_id,
            severity=denial.severity,
            metadata={
                "check": outcome.status,
                "used": outcome.used,
                "limit": outcome.limit,
                "asked": outcome.asked,
            },
        )
        return SecurityCheckResult(
            allowed=False,
            reason=denial.reason,
            delay_seconds=retry or 0.0,
            retry_after=retry,
            anomaly=event,
        )

    def _grant(
        self,
        outcome: _core.StartOutcome,
        user_id: str,
        service_id: str,
        memory_mb: float,
        cpu_percent: float,
        excess: float,
    ) -> SecurityCheckResult:
        expiry_ms, rapid = outcome.lease()
        self._hold(
            user_id,
            service_id,
            HeldLease(outcome.fence, expiry_ms, float(memory_mb), float(cpu_percent)),
        )
        event = None
        reason = None
        delay = 0.0
        if excess > 0:
            delay = self.load.delay_for(excess)
            reason = f"Server under load, start delayed by {delay:.1f}s"
            event = self._record(
                AnomalyType.SERVER_OVERLOADED,
                f"Server overloaded, throttling user {user_id}",
                user_id=user_id,
                service_id=service_id,
                metadata={"excess_percent": excess, "delay": delay},
            )
        if rapid >= self.rules.rapid_threshold and outcome.status == "ok":
            event = self._record(
                AnomalyType.RAPID_RESTART,
                f"Rapid restart pattern ({rapid} starts in 60s)",
                user_id=user_id,
                service_id=service_id,
                metadata={"starts_last_minute": rapid},
            )
        return SecurityCheckResult(
            allowed=True,
            reason=reason,
            delay_seconds=delay,
            anomaly=event,
            fence=outcome.fence,
            already_running=outcome.status == "running",
        )

    def _hold(self, user_id: str, service_id: str, lease: HeldLease) -> None:
        self._held.setdefault(user_id, {})[service_id] = lease
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
        """Free a service's slot; returns whether a slot was freed."""
        held = self._held.get(user_id, {}).get(service_id)
        call = _core.release_call(
            self.rules, user_id, service_id, None if held is None else held.fence
        )
        removed = bool(await self._run(call))
        self._drop(user_id, service_id)
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
                    await self._lost(user_id, outcome.service_id)
                continue
            memory = held.memory_mb if held else 0.0
            cpu = held.cpu_percent if held else 0.0
            self._hold(
                user_id,
                outcome.service_id,
                HeldLease(outcome.fence, outcome.expiry_ms, memory, cpu),
            )
        return outcomes

    async def _lost(self, user_id: str, service_id: str) -> None:
        self._drop(user_id, service_id)
        self._record(
            AnomalyType.LEASE_LOST,
            "Lease lost: it expired or was taken before renewal",
            user_id=user_id,
            service_id=service_id,
            severity=Severity.HIGH,
        )
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
        check_number(hours, "hours", low=0, high=24 * 365, low_open=True)
        now_ms = await self._now_ms()
        events = await self.anomalies.since(
            max(0, now_ms - int(hours * 3_600_000))
        )
        return summarize(events, hours)

    async def _now_ms(self) -> int:
        # Stream ids carry the server's time, even under a test clock.
        seconds, micros = await self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

