"""Anomaly events: one Redis stream per namespace, readable by any tool.

Every replica appends to ``<namespace>:anomalies`` with ``XADD ... MAXLEN
~ cap``, so the stream stays bounded. Appends run in the background, off
the decision's path; readers of this module first wait for this replica's
own pending appends, so a replica always reads what it wrote.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Union

from ._core import text
from .models import AnomalyEvent, AnomalyType, Severity

__all__ = ["AnomalyLog", "summarize"]

logger = logging.getLogger(__name__)

AnomalyHandler = Callable[[AnomalyEvent], Union[None, Awaitable[None]]]

#: Entries read per round trip when scanning the stream backwards.
_PAGE = 500


def summarize(events: list[AnomalyEvent], hours: float) -> dict[str, Any]:
    """Return totals by type and severity, top users and recent critical
    events for ``events`` (already limited to the period)."""
    by_user = Counter(e.user_id for e in events if e.user_id)
    return {
        "period_hours": hours,
        "total_anomalies": len(events),
        "by_type": dict(Counter(e.anomaly_type.value for e in events)),
        "by_severity": dict(Counter(e.severity.value for e in events)),
        "top_users": dict(by_user.most_common(10)),
        "recent_critical": [
            e.to_dict() for e in events if e.severity is Severity.CRITICAL
        ][-10:],
    }


def append_to_file(path: Path, event: AnomalyEvent) -> None:
    """Append ``event`` as one JSON line; a failure is logged, not raised."""
    try:
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event.to_dict()) + "\n")
    except OSError as exc:
        logger.warning("cannot append anomaly to %s: %s", path, exc)


def parse_entries(entries: Any) -> list[AnomalyEvent]:
    """Read ``XRANGE``/``XREVRANGE`` entries, skipping foreign ones."""
    events = []
    for _entry_id, raw in entries or ():
        fields = {text(k): text(v) for k, v in raw.items()}
        try:
            events.append(AnomalyEvent.from_fields(fields))
        except (KeyError, ValueError):
            logger.debug("skipping a stream entry not written by pactown")
    return events


class AnomalyLog:
    """Writes and reads the anomaly stream of one namespace.

    Reached as ``SecurityPolicy.anomalies``.
    """

    def __init__(
        self,
        client: Any,
        stream_key: str,
        *,
        maxlen: int,
        log_path: Optional[Path],
        on_anomaly: Optional[AnomalyHandler],
    ) -> None:
        self._client = client
        self.stream_key = stream_key
        self.maxlen = maxlen
        self.log_path = log_path
        self.on_anomaly = on_anomaly
        self._queue: list[AnomalyEvent] = []
        self._publisher: Optional[asyncio.Task[None]] = None

    def record(self, event: AnomalyEvent) -> AnomalyEvent:
        """Publish ``event`` to the file, the handler and (in the
        background) the stream, and return it. Events reach the stream
        and the handler in the order they were recorded."""
        if self.log_path is not None:
            append_to_file(self.log_path, event)
        self._queue.append(event)
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.ensure_future(self._publish())
        return event

    async def _publish(self) -> None:
        # One task publishes everything, so events keep their order; the
        # events recorded while one batch is sent leave as the next one.
        while self._queue:
            batch, self._queue = self._queue, []
            await self._append(batch)
            if self.on_anomaly is not None:
                for event in batch:
                    await self._hand_over(event)

    async def _append(self, batch: list[AnomalyEvent]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for event in batch:
            pipe.xadd(
                self.stream_key,
                event.to_fields(),
                maxlen=self.maxlen,
                approximate=True,
            )
        try:
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - an event must not fail a decision
            logger.warning("cannot append anomaly to the stream: %s", exc)

    async def _hand_over(self, event: AnomalyEvent) -> None:
        assert self.on_anomaly is not None
        try:
            outcome = self.on_anomaly(event)
            if inspect.isawaitable(outcome):
                await outcome
        except Exception:  # noqa: BLE001 - a handler's bug is its own
            logger.warning("on_anomaly handler failed", exc_info=True)

    async def flush(self) -> None:
        """Wait until this replica's pending events are published."""
        while self._publisher is not None and not self._publisher.done():
            await asyncio.shield(self._publisher)

    async def recent(self, count: int = 100) -> list[AnomalyEvent]:
        """Return up to ``count`` newest events, oldest first."""
        return await self._scan(lambda e: True, count)

    async def by_user(self, user_id: str, count: int = 100) -> list[AnomalyEvent]:
        """Return up to ``count`` newest events of ``user_id``, oldest first."""
        return await self._scan(lambda e: e.user_id == user_id, count)

    async def by_type(
        self, anomaly_type: AnomalyType | str, count: int = 100
    ) -> list[AnomalyEvent]:
        """Return up to ``count`` newest events of a type, oldest first."""
        wanted = AnomalyType(anomaly_type)
        return await self._scan(lambda e: e.anomaly_type is wanted, count)

    async def since(self, start_ms: int) -> list[AnomalyEvent]:
        """Return every event appended at or after ``start_ms`` (Redis
        time, milliseconds), oldest first."""
        await self.flush()
        entries = await self._client.xrange(self.stream_key, min=f"{start_ms}-0")
        return parse_entries(entries)

    async def _scan(
        self, keep: Callable[[AnomalyEvent], bool], count: int
    ) -> list[AnomalyEvent]:
        await self.flush()
        found: list[AnomalyEvent] = []
        upper = "+"
        while len(found) < count:
            page = await self._client.xrevrange(
                self.stream_key, max=upper, min="-", count=_PAGE
            )
            if not page:
                break
            found += [e for e in parse_entries(page) if keep(e)]
            upper = "(" + text(page[-1][0])
        return list(reversed(found[:count]))
