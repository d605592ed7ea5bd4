"""Deliver anomaly events to alerting, at least once, through a consumer
group on the anomaly stream.

Every replica of an alerting service builds an :class:`AnomalyConsumer`
with the same ``group``. Redis hands each entry of ``<namespace>:anomalies``
to one consumer of the group, which passes it to the handler and
acknowledges it (``XACK``) only after the handler returned. So:

- an entry whose handler raised stays pending, and is handed over again
  (to this consumer or another) once it has been idle ``claim_idle_ms``;
- the entries a consumer held when it died are taken over by a live one
  with ``XAUTOCLAIM`` once idle ``claim_idle_ms``; a consumer restarted
  under the same name retries its own pending entries at once;
- an entry handed over ``max_deliveries`` times without an ``XACK`` is
  copied to ``<namespace>:anomalies:dead`` and acknowledged, so that one
  entry no handler can take does not come back forever;
- an entry that is not an anomaly event is acknowledged and skipped.

Delivery is at least once, not exactly once: a consumer that dies after
its handler returned but before its ``XACK`` reached Redis has that entry
handled again by another. The stream id given to the handler with each
event is the same on every delivery; a handler that must not act twice
keys on it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Sequence, Union

from redis.exceptions import RedisError

from ._core import text
from ._validate import check_id, check_number
from .errors import BackendError, InvalidInputError, RedisUnavailableError
from .keys import KeySpace
from .models import AnomalyEvent
from .resilience import (
    check_timeout,
    client_options,
    close_client,
    describe,
    is_unavailable,
    make_client,
)

__all__ = ["AnomalyConsumer", "ConsumerStats", "EventHandler"]

logger = logging.getLogger(__name__)

#: Called (or awaited) with each event and its stream id; returning
#: acknowledges the entry, raising leaves it pending.
EventHandler = Callable[[AnomalyEvent, str], Union[None, Awaitable[None]]]

#: Where a new group starts: ``$`` after the newest entry (only events
#: appended from now on), ``0`` at the oldest entry the stream retains.
START_IDS = ("$", "0")

MAX_BATCH = 10_000
MAX_BLOCK_MS = 60_000
MAX_CLAIM_IDLE_MS = 86_400_000
MAX_DELIVERIES = 1_000
MAX_DEAD_MAXLEN = 100_000_000
#: Longest pause, in seconds, between attempts of :meth:`run` while Redis
#: keeps failing.
MAX_PAUSE = 30.0


@dataclass
class ConsumerStats:
    """What one consumer did with the entries it was handed.

    Attributes:
        handled: handler returned, entry acknowledged.
        failed: handler raised; the entry stayed pending (or, on its last
            delivery, went to the dead-letter stream).
        dead_lettered: entries copied to the dead-letter stream and
            acknowledged.
        skipped: entries acknowledged without a handler call: not an
            anomaly event, or trimmed from the stream while pending.
        claimed: entries taken over from idle deliveries by ``XAUTOCLAIM``.
    """

    handled: int = 0
    failed: int = 0
    dead_lettered: int = 0
    skipped: int = 0
    claimed: int = 0


class AnomalyConsumer:
    """Hands each anomaly event to ``handler`` at least once, shared by
    the consumers of one group.

    Args:
        redis: a ``redis.asyncio`` client (``RedisCluster`` included; left
            open by :meth:`close`; its socket timeout must exceed
            ``block_ms``), or a URL or list of cluster startup nodes as
            :func:`pactown_redis.policy.connect` takes (a client is made
            and closed by :meth:`close`).
        handler: ``handler(event, entry_id)``, a coroutine function (or a
            plain function); returning acknowledges the entry, raising
            leaves it pending. It should finish well within
            ``claim_idle_ms``, or another consumer takes the entry over
            and handles it too.
        namespace: the policies' namespace; the stream is
            ``<namespace>:anomalies``.
        group: the consumer group; consumers of one group share the work,
            each group gets every event.
        consumer: this consumer's name in the group, ``<hostname>-<pid>``
            by default. A restarted consumer that keeps its name retries
            its own pending entries first.
        batch: entries read or claimed per round trip.
        block_ms: milliseconds a read waits for new entries.
        claim_idle_ms: milliseconds an entry stays pending without an
            acknowledgement before any consumer of the group takes it over.
        max_deliveries: deliveries of one entry, counted by Redis, after
            which it goes to the dead-letter stream instead of the handler.
        start_id: where the group starts when this consumer creates it:
            ``"$"`` (default) only events appended from then on, so that an
            alerting service started on an old stream does not alert on
            its history; ``"0"`` every event the stream still holds. A
            group that exists keeps its position.
        dead_maxlen: approximate cap on the dead-letter stream.
        timeout: seconds a Redis call may take, on top of ``block_ms`` for
            a blocking read.

    Raises:
        InvalidInputError: an argument is out of range or of a wrong type.
    """

    def __init__(
        self,
        redis: Union[Any, str, Sequence[tuple[str, int]]],
        handler: EventHandler,
        *,
        namespace: str = "pactown",
        group: str = "pactown-alerts",
        consumer: Optional[str] = None,
        batch: int = 100,
        block_ms: int = 1000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        start_id: str = "$",
        dead_maxlen: int = 10_000,
        timeout: float = 5.0,
    ) -> None:
        if not callable(handler):
            raise InvalidInputError(
                f"handler must be callable, not {type(handler).__name__}"
            )
        if start_id not in START_IDS:
            raise InvalidInputError(
                f"start_id must be '$' or '0', got {start_id!r}"
            )
        keys = KeySpace(namespace)
        self.handler = handler
        self.stream = keys.anomalies
        self.dead_stream = keys.dead_anomalies
        self.group = check_id(group, "group")
        self.consumer = check_id(
            consumer or f"{socket.gethostname()}-{os.getpid()}", "consumer"
        )
        self.batch = _whole(batch, "batch", 1, MAX_BATCH)
        self.block_ms = _whole(block_ms, "block_ms", 1, MAX_BLOCK_MS)
        self.claim_idle_ms = _whole(
            claim_idle_ms, "claim_idle_ms", 1, MAX_CLAIM_IDLE_MS
        )
        self.max_deliveries = _whole(
            max_deliveries, "max_deliveries", 1, MAX_DELIVERIES
        )
        self.dead_maxlen = _whole(dead_maxlen, "dead_maxlen", 1, MAX_DEAD_MAXLEN)
        self.start_id = start_id
        self.timeout = check_timeout(timeout)
        self.stats = ConsumerStats()

        if isinstance(redis, (str, list, tuple)):
            options = client_options(self.timeout)
            options["socket_timeout"] = self.block_ms / 1000 + self.timeout
            self._client = make_client(redis, **options)
            self._owns_client = True
        else:
            self._client = redis
            self._owns_client = False
        self._closed = False
        self._group_ready = False
        self._recovered = False
        self._cursor = "0-0"
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> "AnomalyConsumer":
        await self.ensure_group()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        await self.close()

    async def close(self) -> None:
        """Close the client if this consumer made it. Entries handed to it
        and not acknowledged stay pending for the group."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await close_client(self._client)

    def stop(self) -> None:
        """Make :meth:`run` return after its current cycle, which waits at
        most ``block_ms`` for new entries and finishes the batch it read.
        A stopped consumer stays stopped."""
        self._stopping.set()

    async def ensure_group(self) -> bool:
        """Create the group at ``start_id`` (and the stream, if missing).

        Returns:
            ``True`` if it was created, ``False`` if it existed (left as
            it was).

        Raises:
            RedisUnavailableError: Redis did not answer in time or refused.
            BackendError: Redis answered with another error.
        """
        try:
            await self._redis(
                "XGROUP CREATE",
                self._client.xgroup_create(
                    self.stream, self.group, id=self.start_id, mkstream=True
                ),
            )
        except BackendError as exc:
            if not _error_code(exc, "BUSYGROUP"):
                raise
            created = False
        else:
            created = True
        self._group_ready = True
        return created

    async def run(self) -> None:
        """Consume until :meth:`stop` is called or the task is cancelled.

        An entry whose handler was interrupted by cancellation stays
        pending. Redis errors are logged and retried after a pause that
        starts at ``block_ms`` and doubles up to 30 seconds.
        """
        pause = self.block_ms / 1000
        while not self._stopping.is_set():
            try:
                await self.run_once()
            except BackendError as exc:
                # Alerting outlives a Redis outage: the entries wait in the
                # stream and the group until Redis answers again.
                logger.warning(
                    "anomaly consumer %s: %s; retrying in %.1f s",
                    self.consumer,
                    exc,
                    pause,
                )
                await self._pause(pause)
                pause = min(pause * 2, MAX_PAUSE)
            else:
                pause = self.block_ms / 1000

    async def run_once(self) -> int:
        """Run one cycle: create the group if needed; on the first cycle
        retry this consumer's own pending entries; take over one batch of
        entries idle for ``claim_idle_ms``; then read one batch of new
        entries, waiting up to ``block_ms`` for them when nothing else was
        found.

        A group that disappeared (its stream deleted) is created again at
        ``start_id``.

        Returns:
            How many entries the handler returned for (and were
            acknowledged) in this cycle.

        Raises:
            RedisUnavailableError: Redis did not answer in time or refused.
            BackendError: Redis answered with another error.
        """
        async with self._lock:
            before = self.stats.handled
            try:
                await self._cycle()
            except BackendError as exc:
                if not _error_code(exc, "NOGROUP"):
                    raise
                # Entries appended between the loss and now are read only
                # from start_id "0"; with "$" they are not alerted on.
                logger.warning(
                    "consumer group %s of %s is gone; creating it again",
                    self.group,
                    self.stream,
                )
                self._cursor = "0-0"
                await self.ensure_group()
            return self.stats.handled - before

    async def _cycle(self) -> None:
        if not self._group_ready:
            await self.ensure_group()
        found = False
        if not self._recovered:
            found = await self._recover_own()
            self._recovered = True
        found = await self._claim_idle() or found
        await self._read_new(block=not found)

    async def _recover_own(self) -> bool:
        """Hand over again the entries still pending for this consumer's
        name, left by an earlier run; return whether there were any."""
        after = "0"
        found = False
        while True:
            reply = await self._redis(
                "XREADGROUP",
                self._client.xreadgroup(
                    self.group,
                    self.consumer,
                    {self.stream: after},
                    count=self.batch,
                ),
            )
            entries = _entries(reply)
            if not entries:
                return found
            found = True
            await self._deliver_counted(entries)
            if len(entries) < self.batch:
                return found
            after = text(entries[-1][0])

    async def _claim_idle(self) -> bool:
        """Take over one batch of entries idle for ``claim_idle_ms``, this
        consumer's own failed ones included; return whether any were."""
        reply = await self._redis(
            "XAUTOCLAIM",
            self._client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                self.claim_idle_ms,
                start_id=self._cursor,
                count=self.batch,
            ),
        )
        self._cursor = text(reply[0])
        entries = list(reply[1] or ())
        trimmed = list(reply[2]) if len(reply) > 2 and reply[2] else []
        if trimmed:
            # Redis drops them from the group itself; they cannot be read.
            self.stats.skipped += len(trimmed)
            logger.warning(
                "%d pending anomalies were trimmed from %s before delivery",
                len(trimmed),
                self.stream,
            )
        if not entries:
            return False
        self.stats.claimed += len(entries)
        await self._deliver_counted(entries)
        return True

    async def _read_new(self, *, block: bool) -> None:
        wait_ms = self.block_ms if block else None
        reply = await self._redis(
            "XREADGROUP",
            self._client.xreadgroup(
                self.group,
                self.consumer,
                {self.stream: ">"},
                count=self.batch,
                block=wait_ms,
            ),
            waits=self.block_ms / 1000 if block else 0.0,
        )
        for entry_id, fields in _entries(reply):
            await self._deliver(text(entry_id), fields, 1)

    async def _deliver_counted(self, entries: list[Any]) -> None:
        """Deliver entries handed over again, with Redis's delivery count;
        one another consumer took meanwhile is left to it."""
        ids = [text(entry_id) for entry_id, _fields in entries]
        counts = await self._delivery_counts(ids)
        for entry_id, (_raw_id, fields) in zip(ids, entries):
            deliveries = counts.get(entry_id)
            if deliveries is not None:
                await self._deliver(entry_id, fields, deliveries)

    async def _delivery_counts(self, ids: list[str]) -> dict[str, int]:
        """Return the delivery count of each of ``ids`` still pending for
        this consumer."""
        pipe = self._client.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xpending_range(
                self.stream,
                self.group,
                min=entry_id,
                max=entry_id,
                count=1,
                consumername=self.consumer,
            )
        replies = await self._redis("XPENDING", pipe.execute())
        counts: dict[str, int] = {}
        for rows in replies:
            for row in rows or ():
                counts[text(row["message_id"])] = int(row["times_delivered"])
        return counts

    async def _deliver(self, entry_id: str, fields: Any, deliveries: int) -> None:
        """Hand one entry to the handler and settle it: acknowledge,
        leave pending, dead-letter or skip."""
        if fields is None:
            # History reads return deleted entries without their fields.
            logger.warning(
                "pending anomaly %s was deleted from %s before delivery",
                entry_id,
                self.stream,
            )
            await self._ack(entry_id)
            self.stats.skipped += 1
            return
        decoded = {text(k): text(v) for k, v in fields.items()}
        try:
            event = AnomalyEvent.from_fields(decoded)
        except (KeyError, TypeError, ValueError):
            logger.warning(
                "skipping entry %s of %s: not an anomaly event",
                entry_id,
                self.stream,
            )
            await self._ack(entry_id)
            self.stats.skipped += 1
            return
        if deliveries > self.max_deliveries:
            # Consumers died holding it: the handler may be what kills them.
            await self._dead_letter(
                entry_id,
                decoded,
                deliveries,
                f"not acknowledged after {deliveries - 1} deliveries",
            )
            return

        try:
            outcome = self.handler(event, entry_id)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception as exc:  # noqa: BLE001 - the entry stays pending
            self.stats.failed += 1
            logger.warning(
                "anomaly handler failed on entry %s (delivery %d of %d)",
                entry_id,
                deliveries,
                self.max_deliveries,
                exc_info=True,
            )
            if deliveries >= self.max_deliveries:
                await self._dead_letter(
                    entry_id, decoded, deliveries, describe(exc)
                )
            return
        await self._ack(entry_id)
        self.stats.handled += 1

    async def _dead_letter(
        self,
        entry_id: str,
        fields: dict[str, str],
        deliveries: int,
        reason: str,
    ) -> None:
        """Copy an entry to the dead-letter stream, then acknowledge it.

        The copy keeps the event's fields, so the dead-letter stream reads
        like the anomaly stream, and adds ``dead_*`` fields. Dying between
        the two steps copies the entry twice, never loses it.
        """
        record = {
            **fields,
            "dead_id": entry_id,
            "dead_group": self.group,
            "dead_consumer": self.consumer,
            "dead_deliveries": str(deliveries),
            "dead_reason": reason,
        }
        await self._redis(
            "XADD",
            self._client.xadd(
                self.dead_stream,
                record,
                maxlen=self.dead_maxlen,
                approximate=True,
            ),
        )
        await self._ack(entry_id)
        self.stats.dead_lettered += 1
        logger.warning(
            "moved anomaly %s to %s after %d deliveries: %s",
            entry_id,
            self.dead_stream,
            deliveries,
            reason,
        )

    async def _ack(self, entry_id: str) -> None:
        await self._redis(
            "XACK", self._client.xack(self.stream, self.group, entry_id)
        )

    async def _redis(
        self, what: str, work: Awaitable[Any], *, waits: float = 0.0
    ) -> Any:
        """Await one Redis call within ``timeout`` (plus ``waits`` seconds
        of blocking), turning its failure into this package's errors."""
        try:
            return await asyncio.wait_for(work, self.timeout + waits)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            kind = (
                RedisUnavailableError
                if is_unavailable(exc) or isinstance(exc, asyncio.TimeoutError)
                else BackendError
            )
            raise kind(f"{what} failed: {describe(exc)}") from exc

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass


def _whole(value: Any, what: str, low: int, high: int) -> int:
    return int(check_number(value, what, low=low, high=high, integer=True))


def _error_code(exc: BaseException, code: str) -> bool:
    """Return whether ``exc`` was caused by a Redis error reply ``code``."""
    cause = exc.__cause__
    return isinstance(cause, RedisError) and str(cause).startswith(code)


def _entries(reply: Any) -> list[Any]:
    """Return the ``(id, fields)`` entries of a one-stream ``XREADGROUP``
    reply, RESP2 (``[[stream, entries]]``) or RESP3 (``{stream:
    [entries]}``)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        chunks = [
            value[0] if value and isinstance(value[0], list) else value
            for value in reply.values()
        ]
    else:
        chunks = [item[1] for item in reply]
    return [entry for chunk in chunks for entry in chunk]
