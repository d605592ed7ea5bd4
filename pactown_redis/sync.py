"""The blocking security policy: :class:`SecurityPolicy`'s API on the sync
``redis.Redis`` client, for code without an event loop (scripts, WSGI apps,
the command line).

Decisions are the same scripts with the same arguments, so a sync and an
async policy on one Redis and namespace share one set of limits, strikes
and automatic blocks. Three things differ in how they run: anomalies are
appended to the stream and handed to ``on_anomaly`` inline, right after
the decision; held leases are renewed by a daemon thread rather than a
task; and a blocking call cannot be interrupted, so the deadline holds per
socket operation (see :class:`~pactown_redis.resilience.SyncGuard`).
Nothing here runs or needs an event loop.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import redis as redis_sync
from redis.exceptions import RedisClusterException, RedisError

from . import _cluster, _core, _outcomes
from ._core import HeldLease, ScriptCall
from ._validate import check_id, check_number
from .anomalies import append_to_file, parse_entries, summarize
from .errors import BackendError, LeaseLostError, RedisUnavailableError
from .models import (
    AnomalyEvent,
    AnomalyType,
    RateLimitResult,
    SecurityCheckResult,
    UserProfile,
    UserTier,
)
from .overload import LoadMonitor, LoadSample
from .resilience import (
    DEFAULT_TIMEOUT,
    Resilience,
    SyncGuard,
    check_timeout,
    client_options,
    close_sync_client,
    describe,
    make_client,
    sentinel_client,
)

__all__ = ["SyncAnomalyLog", "SyncSecurityPolicy", "connect"]

logger = logging.getLogger(__name__)

SyncAnomalyHandler = Callable[[AnomalyEvent], Any]
LeaseLostHandler = Callable[[str, str], Any]

#: Entries read per round trip when scanning the stream backwards.
_PAGE = 500

#: Longest wait for the renewal thread to finish its round on close.
_JOIN_SECONDS = 5.0


def connect(
    url: Union[str, Sequence[tuple[str, int]]],
    *,
    cluster: bool = False,
    **options: Any,
) -> Any:
    """Return a blocking client for ``url``, which names a server or a
    cluster as :func:`pactown_redis.policy.connect` takes it: a
    ``redis.Redis``, or a ``redis.cluster.RedisCluster`` for a cluster.

    A blocking cluster client maps the cluster as it is made, so a
    cluster must be reachable here already.

    Raises:
        InvalidInputError: a malformed URL or startup node list.
        RedisUnavailableError: no startup node of a cluster answered.
    """
    try:
        return make_client(url, cluster=cluster, asynchronous=False, **options)
    except (RedisClusterException, RedisError) as exc:
        raise RedisUnavailableError(
            f"cannot map the Redis Cluster: {describe(exc)}"
        ) from exc


def _stream_entries(reply: Any) -> list[Any]:
    """Return the entries of a one-stream ``XREAD`` reply, RESP2 or RESP3."""
    if not reply:
        return []
    if isinstance(reply, dict):
        batches = list(reply.values())
    else:
        batches = [batch[1] for batch in reply]
    entries: list[Any] = []
    for batch in batches:
        # redis-py wraps each stream's entries in one more list under RESP3.
        if batch and isinstance(batch[0], list):
            batch = [entry for inner in batch for entry in inner]
        entries += batch
    return entries


class SyncAnomalyLog:
    """Writes and reads the anomaly stream of one namespace, blocking.

    Reached as ``SyncSecurityPolicy.anomalies``. Each event is appended as
    it is recorded (``XADD ... MAXLEN ~``); a failed append or handler is
    logged at WARNING and never fails the decision that recorded it.
    """

    def __init__(
        self,
        client: Any,
        stream_key: str,
        *,
        maxlen: int,
        log_path: Optional[Path],
        on_anomaly: Optional[SyncAnomalyHandler],
    ) -> None:
        self._client = client
        self.stream_key = stream_key
        self.maxlen = maxlen
        self.log_path = log_path
        self.on_anomaly = on_anomaly

    def record(self, event: AnomalyEvent) -> AnomalyEvent:
        """Publish ``event`` to the file, the stream and the handler, in
        that order, and return it."""
        if self.log_path is not None:
            append_to_file(self.log_path, event)
        try:
            self._client.xadd(
                self.stream_key,
                event.to_fields(),
                maxlen=self.maxlen,
                approximate=True,
            )
        except Exception as exc:  # noqa: BLE001 - an event must not fail a decision
            logger.warning("cannot append anomaly to the stream: %s", exc)
        if self.on_anomaly is not None:
            try:
                self.on_anomaly(event)
            except Exception:  # noqa: BLE001 - a handler's bug is its own
                logger.warning("on_anomaly handler failed", exc_info=True)
        return event

    def flush(self) -> None:
        """Return at once: events are published as they are recorded. Kept
        so code may call it on either API."""

    def recent(self, count: int = 100) -> list[AnomalyEvent]:
        """Return up to ``count`` newest events, oldest first."""
        return self._scan(lambda e: True, count)

    def by_user(self, user_id: str, count: int = 100) -> list[AnomalyEvent]:
        """Return up to ``count`` newest events of ``user_id``, oldest first."""
        return self._scan(lambda e: e.user_id == user_id, count)

    def by_type(
        self, anomaly_type: AnomalyType | str, count: int = 100
    ) -> list[AnomalyEvent]:
        """Return up to ``count`` newest events of a type, oldest first."""
        wanted = AnomalyType(anomaly_type)
        return self._scan(lambda e: e.anomaly_type is wanted, count)

    def since(self, start_ms: int) -> list[AnomalyEvent]:
        """Return every event appended at or after ``start_ms`` (Redis
        time, milliseconds), oldest first."""
        entries = self._client.xrange(self.stream_key, min=f"{start_ms}-0")
        return parse_entries(entries)

    def tail(self, count: int = 20) -> tuple[list[AnomalyEvent], str]:
        """Return up to ``count`` newest entries' events, oldest first, and
        the id of the newest entry (``"0-0"`` for an empty stream), from
        which :meth:`read_after` continues.

        Raises:
            InvalidNumberError: ``count`` is not an int in 1..100000.
        """
        check_number(count, "count", low=1, high=100_000, integer=True)
        page = self._client.xrevrange(
            self.stream_key, max="+", min="-", count=count
        )
        if not page:
            return [], "0-0"
        return list(reversed(parse_entries(page))), _core.text(page[0][0])

    def read_after(
        self, last_id: str, *, block_ms: int = 1000, count: int = 100
    ) -> tuple[list[AnomalyEvent], str]:
        """Wait up to ``block_ms`` for entries after ``last_id`` and return
        their events, oldest first, with the id to continue from.

        Raises:
            InvalidNumberError: ``block_ms`` not in 0..60000 or ``count``
                not in 1..100000.
        """
        check_number(block_ms, "block_ms", low=0, high=60_000, integer=True)
        check_number(count, "count", low=1, high=100_000, integer=True)
        reply = self._client.xread(
            {self.stream_key: last_id}, count=count, block=block_ms
        )
        entries = _stream_entries(reply)
        if not entries:
            return [], last_id
        return parse_entries(entries), _core.text(entries[-1][0])

    def _scan(
        self, keep: Callable[[AnomalyEvent], bool], count: int
    ) -> list[AnomalyEvent]:
        found: list[AnomalyEvent] = []
        upper = "+"
        while len(found) < count:
            page = self._client.xrevrange(
                self.stream_key, max=upper, min="-", count=_PAGE
            )
            if not page:
                break
            found += [e for e in parse_entries(page) if keep(e)]
            upper = "(" + _core.text(page[-1][0])
        return list(reversed(found[:count]))


class SyncSecurityPolicy:
    """Rate limits, service slots, quotas and anomalies shared through
    Redis, with blocking calls.

    The same options, methods and results as :class:`SecurityPolicy`; a
    sync and an async policy on one Redis and namespace enforce one set of
    limits. Safe to share between threads.

    Args:
        redis: a blocking ``redis.Redis`` or ``redis.cluster.RedisCluster``
            client, left open by :meth:`close`, or a URL or list of cluster
            startup nodes as :func:`connect` takes (a client is made with
            socket timeouts of ``timeout``, and closed by :meth:`close`).
        timeout: seconds each socket operation of a call to Redis may take
            (connecting, sending, reading the reply); the one retry starts
            only while the call's ``timeout`` has time left. A decision
            that misses it is made by its fail mode. A client passed in
            keeps its own socket timeouts: give it ``socket_timeout`` and
            ``socket_connect_timeout`` of about ``timeout``.
        auto_renew: renew held leases every ``lease_ttl / 3`` on a daemon
            thread (on a connection of its own from the client's pool).
            With ``False``, call :meth:`renew_leases` yourself at least
            that often.
        on_anomaly: called inline with each anomaly event, on the thread
            that recorded it (the renewal thread for ``LEASE_LOST``).
        on_lease_lost: called with ``(user_id, service_id)`` on the thread
            whose renewal found the lease lost.

        The other options are those of :class:`SecurityPolicy`: the fail
        modes, ``replicas``, the breaker and automatic blocking included.

    Raises:
        InvalidInputError: a bad namespace, fail mode or number out of
            range, or a malformed address.
        RedisUnavailableError: ``redis`` names a cluster none of whose
            startup nodes answers (see :func:`connect`).
    """

    def __init__(
        self,
        redis: Union["redis_sync.Redis", Any, str, Sequence[tuple[str, int]]],
        *,
        namespace: str = "pactown",
        default_rate_limit: int = 60,
        anomaly_log_path: Union[str, Path, None] = None,
        on_anomaly: Optional[SyncAnomalyHandler] = None,
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
        auto_renew: bool = True,
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
            options = client_options(timeout, asynchronous=False)
            self._client = connect(redis, **options)
            self._owns_client = True
        else:
            self._client = redis
            self._owns_client = False
        self.keys = self.rules.keys
        self.namespace = namespace
        self.lease_ttl = float(lease_ttl)
        self.anomalies = SyncAnomalyLog(
            self._client,
            self.keys.anomalies,
            maxlen=stream_maxlen,
            log_path=None if anomaly_log_path is None else Path(anomaly_log_path),
            on_anomaly=on_anomaly,
        )
        self._guard = SyncGuard(
            self._client, self.resilience, self.anomalies.record
        )
        self.load = LoadMonitor(cpu_threshold, memory_threshold, probe=load_probe)
        self.on_lease_lost = on_lease_lost
        self.auto_renew = bool(auto_renew)
        self._held: dict[str, dict[str, HeldLease]] = {}
        self._lost_fences = _outcomes.LostFences()
        # Guards _held and _lost_fences.
        self._held_lock = threading.Lock()
        # A renewal round and a release of the same lease must not overlap,
        # or the round would report a lease it saw released as lost.
        self._renew_lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: Union[str, Sequence[tuple[str, int]]],
        *,
        cluster: bool = False,
        **options: Any,
    ) -> "SyncSecurityPolicy":
        """Build a policy on a new blocking client for ``url`` (closed by
        :meth:`close`), as :meth:`SecurityPolicy.from_url` does.

        Raises:
            InvalidInputError: a malformed address or a bad option.
        """
        timeout = check_timeout(options.get("timeout", DEFAULT_TIMEOUT))
        client = connect(
            url, cluster=cluster, **client_options(timeout, asynchronous=False)
        )
        return cls._owning(client, options)

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        *,
        connection: Optional[dict[str, Any]] = None,
        **options: Any,
    ) -> "SyncSecurityPolicy":
        """Build a policy on the primary Sentinel names for
        ``service_name``, through a blocking client that asks the sentinels
        again after a failover (closed by :meth:`close`). The arguments
        are those of :meth:`SecurityPolicy.from_sentinel`.

        Raises:
            InvalidInputError: bad sentinels, service name or options.
        """
        timeout = check_timeout(options.get("timeout", DEFAULT_TIMEOUT))
        client = sentinel_client(
            sentinels,
            service_name,
            timeout=timeout,
            asynchronous=False,
            **(connection or {}),
        )
        return cls._owning(client, options)

    @classmethod
    def _owning(
        cls, client: Any, options: dict[str, Any]
    ) -> "SyncSecurityPolicy":
        """Build a policy on ``client``, which it closes; a policy that
        cannot be built closes it at once."""
        try:
            policy = cls(client, **options)
        except BaseException:
            close_sync_client(client)
            raise
        policy._owns_client = True
        return policy

    def __repr__(self) -> str:
        return f"SyncSecurityPolicy(namespace={self.namespace!r})"

    def __enter__(self) -> "SyncSecurityPolicy":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the renewal thread and close the client if this policy made
        it. Held leases are not released: they expire within ``lease_ttl``
        unless another replica renews them."""
        with self._held_lock:
            if self._closed:
                return
            self._closed = True
            renewer = self._renewer
        self._stop.set()
        if renewer is not None:
            renewer.join(_JOIN_SECONDS)
        if self._owns_client:
            close_sync_client(self._client)

    # -- sending -------------------------------------------------------------

    def _run(self, call: ScriptCall, client: Any = None) -> Any:
        # NOSCRIPT recovery, one safe retry and the breaker, on ``client``
        # (by default the policy's); raises RedisUnavailableError when
        # Redis cannot decide in time.
        return self._guard.run(call, client)

    # -- profiles --------------------------------------------------------------

    def set_user_profile(self, profile: UserProfile) -> None:
        """Store ``profile``; every replica applies it at its next decision.

        Raises:
            InvalidInputError: ``profile`` is not a valid ``UserProfile``.
            RedisUnavailableError: Redis did not answer in time.
            BackendError: Redis answered with an unexpected error.
        """
        profile = _outcomes.checked_profile(profile)
        self._run(_outcomes.profile_call(self.keys, profile))

    def get_user_profile(self, user_id: str) -> UserProfile:
        """Return the stored profile, or the default tier's when none is.

        Raises:
            CorruptProfileError: the stored profile is unreadable.
        """
        raw = self._client.hgetall(self.keys.user(user_id).profile)
        return _core.hash_to_profile(user_id, raw, self.rules)

    def delete_user_profile(self, user_id: str) -> bool:
        """Remove a stored profile; the user falls back to the default tier."""
        return bool(self._client.delete(self.keys.user(user_id).profile))

    def block_user(self, user_id: str, reason: str = "") -> None:
        """Block ``user_id`` from starting services, on every replica."""
        self._set_blocked(user_id, True, reason)

    def unblock_user(self, user_id: str) -> None:
        """Lift a block set by :meth:`block_user` and an automatic block,
        and forget the user's strikes."""
        self._set_blocked(user_id, False, "")
        keys = self.keys.user(user_id)
        try:
            self._client.delete(keys.auto_block, keys.strikes)
        except RedisError as exc:
            raise BackendError(f"unblock failed: {type(exc).__name__}") from exc

    def _set_blocked(self, user_id: str, blocked: bool, reason: str) -> None:
        profile = _outcomes.block_profile(
            user_id, blocked, reason, self.rules.default_tier
        )
        self._run(
            _outcomes.profile_call(self.keys, profile, _outcomes.BLOCK_FIELDS)
        )

    # -- request rate ------------------------------------------------------------

    def check_rate_limit(self, user_id: str, cost: float = 1) -> RateLimitResult:
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
            reply = self._run(call)
        except RedisUnavailableError:
            return self.resilience.rate_limit(user_id, cost)
        result, events = _outcomes.rate_decision(user_id, cost, reply)
        self.resilience.remember_limit(user_id, result.limit)
        for event in events:
            self.anomalies.record(event)
        return result

    def check_many(
        self, requests: Sequence[Union[str, tuple[str, float]]]
    ) -> list[RateLimitResult]:
        """Debit many requests in one round trip; as
        :meth:`SecurityPolicy.check_many`."""
        debits = _outcomes.many_calls(self.rules, requests)
        try:
            replies = self._guard.run_many([call for *_, call in debits])
        except RedisUnavailableError:
            replies = [None] * len(debits)
        return self.resilience.settle_debits(
            debits, replies, self.anomalies.record
        )

    # -- services ----------------------------------------------------------------

    def check_can_start_service(
        self,
        user_id: str,
        service_id: str,
        port: Optional[int] = None,
        memory_mb: float = 0,
        cpu_percent: float = 0,
    ) -> SecurityCheckResult:
        """Check every limit and, when all pass, reserve the service's slot.

        The checks and their order are those of
        :meth:`SecurityPolicy.check_can_start_service`, automatic blocking
        included. A granted slot is a lease this policy renews until
        :meth:`unregister_service`. Without Redis in time, the result
        comes from ``start_fail_mode``, says ``degraded=True`` and reserves
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
            outcome = _core.parse_start(self._run(check.call))
        except RedisUnavailableError:
            return self.resilience.start(user_id)
        decision = check.decide(outcome)
        if decision.lease is not None:
            self._hold(user_id, service_id, decision.lease)
        for event in decision.events:
            self.anomalies.record(event)
        self._strike(decision.strikes)
        return decision.result

    def _strike(self, strikes: tuple[_outcomes.Strike, ...]) -> None:
        """Count ``strikes``; record the block one of them sets."""
        for strike in strikes:
            try:
                blocked = strike.blocked_event(self._run(strike.call))
            except BackendError as exc:
                # The decision stands; only this strike goes uncounted.
                logger.warning("cannot count a strike: %s", exc)
                continue
            if blocked is not None:
                self.anomalies.record(blocked)

    def _hold(self, user_id: str, service_id: str, lease: HeldLease) -> None:
        with self._held_lock:
            self._held.setdefault(user_id, {})[service_id] = lease
            self._lost_fences.forget(user_id, service_id)
            if self.auto_renew and self._renewer is None and not self._closed:
                self._renewer = threading.Thread(
                    target=self._renew_forever,
                    name="pactown-redis lease renewer",
                    daemon=True,
                )
                self._renewer.start()

    def _drop(
        self, user_id: str, service_id: str, lost_fence: Optional[int] = None
    ) -> None:
        """Stop holding ``service_id``; with ``lost_fence``, remember it as
        the lease found lost, else forget any such lease."""
        with self._held_lock:
            held = self._held.get(user_id)
            if held is not None:
                held.pop(service_id, None)
                if not held:
                    del self._held[user_id]
            if lost_fence is None:
                self._lost_fences.forget(user_id, service_id)
            else:
                self._lost_fences.remember(user_id, service_id, lost_fence)

    def _held_lease(self, user_id: str, service_id: str) -> Optional[HeldLease]:
        with self._held_lock:
            return self._held.get(user_id, {}).get(service_id)

    def register_service(self, user_id: str, service_id: str) -> int:
        """Confirm or renew the slot of a running service; idempotent.

        Returns the lease's fencing token.

        Raises:
            LeaseLostError: the service holds no slot (it was never
                reserved, expired, or was released).
            RedisUnavailableError: Redis did not answer in time.
            BackendError: Redis answered with an unexpected error.
        """
        check_id(service_id, "service_id")
        held = self._held_lease(user_id, service_id)
        lost: list[tuple[str, str]] = []
        outcome = self._renew(self._client, user_id, {service_id: held}, lost)[0]
        self._report_lost(lost)
        if outcome.status == "lost":
            raise LeaseLostError(user_id, service_id)
        return outcome.fence

    def unregister_service(self, user_id: str, service_id: str) -> bool:
        """Free a service's slot; returns whether a slot was freed.

        Only the lease this policy holds (or last held, if it found the
        lease lost) is freed; a service this policy never held frees
        whichever lease holds it.
        """
        with self._held_lock:
            held = self._held.get(user_id, {}).get(service_id)
            fence = self._lost_fences.release_fence(user_id, service_id, held)
        call = _core.release_call(self.rules, user_id, service_id, fence)
        with self._renew_lock:
            removed = bool(self._run(call))
            self._drop(user_id, service_id)
        return removed

    def renew_leases(self) -> list[_core.RenewOutcome]:
        """Renew every lease this policy holds, now; the renewal thread
        calls this every ``lease_ttl / 3``. Lost leases are dropped and
        reported (``LEASE_LOST`` anomaly and ``on_lease_lost``).

        Raises:
            RedisUnavailableError: Redis did not answer in time; leases
                renewed before the failure stay renewed.
            BackendError: Redis answered with an unexpected error.
        """
        return self._renew_all(self._client)

    def _renew_all(self, client: Any) -> list[_core.RenewOutcome]:
        outcomes: list[_core.RenewOutcome] = []
        lost: list[tuple[str, str]] = []
        try:
            with self._renew_lock:
                with self._held_lock:
                    snapshot = {u: dict(h) for u, h in self._held.items()}
                for user_id, held in snapshot.items():
                    outcomes += self._renew(client, user_id, dict(held), lost)
        finally:
            # Reported outside the lock, so a handler may release services.
            self._report_lost(lost)
        return outcomes

    def _renew(
        self,
        client: Any,
        user_id: str,
        leases: dict[str, Optional[HeldLease]],
        lost: list[tuple[str, str]],
    ) -> list[_core.RenewOutcome]:
        """Renew ``leases``; appends the held ones found lost to ``lost``
        after dropping them."""
        call = _core.renew_call(self.rules, user_id, leases)
        outcomes = _core.parse_renew(list(leases), self._run(call, client))
        for outcome, held in zip(outcomes, leases.values()):
            if outcome.status == "lost":
                if held is not None:
                    self._drop(user_id, outcome.service_id, held.fence)
                    lost.append((user_id, outcome.service_id))
                continue
            self._hold(
                user_id,
                outcome.service_id,
                _outcomes.renewed_lease(outcome, held),
            )
        return outcomes

    def _report_lost(self, lost: list[tuple[str, str]]) -> None:
        for user_id, service_id in lost:
            self.anomalies.record(
                _outcomes.lease_lost_event(user_id, service_id)
            )
            if self.on_lease_lost is not None:
                try:
                    self.on_lease_lost(user_id, service_id)
                except Exception:  # noqa: BLE001 - a handler's bug is its own
                    logger.warning("on_lease_lost handler failed", exc_info=True)

    def _renew_forever(self) -> None:
        client = self._client
        if isinstance(client, redis_sync.Redis):
            # A client of its own over the same pool: a renewal never waits
            # for, or shares a socket with, the caller's commands, even when
            # the caller's client pins a single connection.
            client = redis_sync.Redis(connection_pool=client.connection_pool)
        period = self.lease_ttl / 3
        while not self._stop.wait(period):
            try:
                self._renew_all(client)
            except Exception as exc:  # noqa: BLE001 - retried next period
                logger.warning("lease renewal failed, retrying: %s", exc)

    def held_leases(self) -> dict[str, dict[str, HeldLease]]:
        """Return a copy of the leases this policy holds, by user."""
        with self._held_lock:
            return {user: dict(held) for user, held in self._held.items()}

    # -- reading state -----------------------------------------------------------

    def get_user_state(self, user_id: str) -> _core.UserState:
        """Return the user's tokens, live leases and recent starts.

        Raises:
            CorruptProfileError: the stored profile is unreadable.
        """
        reply = self._run(_core.inspect_call(self.rules, user_id))
        return _core.parse_inspect(user_id, reply)

    def get_user_service_count(self, user_id: str) -> int:
        """Return how many services of the user hold a live slot."""
        return self.get_user_state(user_id).running

    def get_services_started_last_hour(self, user_id: str) -> int:
        """Return how many services the user started in the last hour."""
        return self.get_user_state(user_id).started_last_hour

    def get_anomaly_summary(self, hours: float = 24) -> dict[str, Any]:
        """Return anomaly totals by type and severity, the top users and
        the recent critical events of the last ``hours``."""
        span_ms = _outcomes.summary_span_ms(hours)
        now_ms = self._now_ms()
        events = self.anomalies.since(max(0, now_ms - span_ms))
        return summarize(events, hours)

    def _now_ms(self) -> int:
        # Stream ids carry the server's time, even under a test clock.
        return _cluster.time_ms(self._client.time())
