"""Automatic pipelining: concurrent script calls share one round trip.

A policy sends every script call through one :class:`AutoPipeline`. While
no batch is in flight a call goes out at once, alone; calls that arrive
while one is in flight wait and leave together as the next batch, in one
write, and their replies are read back in order. One task alone therefore
pays one round trip per call, and many tasks pay one round trip per batch.

Pipelining changes no decision: each call is still one ``EVALSHA`` that
Redis runs atomically and on its own; only the packets are shared.

Recovery, per call:

- ``NOSCRIPT`` (the server lost its script cache) means that call did not
  run; it is sent again alone as ``EVAL``. The rest of its batch ran once
  and is answered normally.
- Any other error reply belongs to its call alone.
- A broken connection fails the calls whose replies were not read yet.
  Those are sent once more on a new connection, if ``may_retry`` says
  there is time; sending a call twice never applies it twice (see
  :class:`pactown_redis.resilience.AsyncGuard`).

On a standalone server or behind Sentinel the pipeline owns one connection,
made by the client's pool with the pool's settings (address, TLS,
credentials, protocol); deadlines are the caller's, not the socket's. On a
Redis Cluster each batch is split by node by the cluster client.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional, Sequence

import redis.exceptions as rx

from ._cluster import is_cluster
from .scripts import ScriptCall

__all__ = ["AutoPipeline", "MAX_BATCH"]

#: The most calls one batch carries; more wait for the next batch, so one
#: burst cannot build a reply larger than the client reads comfortably.
MAX_BATCH = 512

# Failures after which a cluster client must learn the topology again.
_CLUSTER_MOVING = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterDownError,
    rx.SlotNotCoveredError,
)

# Calls waiting for a batch, each with the future its caller awaits.
_Waiting = list[tuple[ScriptCall, "asyncio.Future[Any]"]]


# A call's place in the replies before its reply is read.
_UNSENT = object()


class _Failed:
    """A call's error reply, kept in line with the other replies."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class AutoPipeline:
    """Sends script calls, coalescing concurrent ones into pipelines.

    Args:
        client: a ``redis.asyncio`` client or ``RedisCluster``.
        may_retry: called with a connection's failure and the monotonic
            time the batch was first sent; returns whether the unanswered
            calls may be sent once more now.
    """

    def __init__(
        self,
        client: Any,
        may_retry: Callable[[BaseException, float], bool],
    ) -> None:
        self._client = client
        self._cluster = is_cluster(client)
        self._may_retry = may_retry
        self._conn: Any = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._busy = False
        self._waiting: _Waiting = []

    async def close(self) -> None:
        """Close the pipeline's own connection; calls after this open a new
        one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect()

    # -- public ---------------------------------------------------------------

    async def call(self, call: ScriptCall) -> Any:
        """Return the reply of ``call``.

        Raises:
            redis.exceptions.RedisError: the call's error reply, or the
                connection's failure.
            OSError: the connection failed.
        """
        self._bind_loop()
        if self._busy:
            return await self._wait_for_batch(call)
        self._busy = True
        try:
            reply = (await self._send([call]))[0]
        finally:
            self._next_batch()
        if isinstance(reply, _Failed):
            raise reply.error
        return reply

    async def call_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Return the replies of ``calls``, in order, sent in one batch when
        nothing else is in flight. A call's error reply takes its place in
        the list as the exception; a failed connection raises.

        Raises:
            redis.exceptions.RedisError, OSError: the connection failed.
        """
        self._bind_loop()
        if not calls:
            return []
        if self._busy:
            futures = [self._enqueue(call) for call in calls]
            return list(
                await asyncio.gather(*futures, return_exceptions=True)
            )
        self._busy = True
        try:
            replies = await self._send(list(calls))
        finally:
            self._next_batch()
        return [r.error if isinstance(r, _Failed) else r for r in replies]

    # -- waiting --------------------------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        # A connection and futures belong to one event loop; a policy
        # moved to another loop (a test's, a thread's) starts afresh.
        self._loop = loop
        self._conn = None
        self._busy = False
        self._waiting = []

    def _enqueue(self, call: ScriptCall) -> "asyncio.Future[Any]":
        assert self._loop is not None
        future = self._loop.create_future()
        self._waiting.append((call, future))
        return future

    async def _wait_for_batch(self, call: ScriptCall) -> Any:
        return await self._enqueue(call)

    def _next_batch(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        assert self._loop is not None
        self._loop.create_task(self._drain(), name="pactown-redis pipeline")

    async def _drain(self) -> None:
        # Runs while calls keep arriving; each pass sends what arrived
        # during the previous one.
        try:
            while self._waiting:
                waiting = self._waiting[:MAX_BATCH]
                del self._waiting[:MAX_BATCH]
                live = [(c, f) for c, f in waiting if not f.done()]
                if live:
                    await self._answer(live)
        finally:
            self._busy = False
            if self._waiting:
                self._busy = True
                self._next_batch()

    async def _answer(self, waiting: _Waiting) -> None:
        try:
            replies = await self._send([call for call, _ in waiting])
        except BaseException as exc:
            for _, future in waiting:
                if not future.done():
                    future.set_exception(_copy_error(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), reply in zip(waiting, replies):
            if future.done():
                continue
            if isinstance(reply, _Failed):
                future.set_exception(reply.error)
            else:
                future.set_result(reply)

    # -- sending --------------------------------------------------------------

    async def _send(self, calls: list[ScriptCall]) -> list[Any]:
        started = time.monotonic()
        replies: list[Any] = [_UNSENT] * len(calls)
        try:
            await self._exchange(calls, replies)
        except rx.ConnectionError as exc:
            if not self._may_retry(exc, started):
                raise
            # The unanswered calls may or may not have run; each is safe
            # to send again, and the replies already read are kept.
            await self._exchange(calls, replies)
        return replies

    async def _exchange(self, calls: list[ScriptCall], replies: list[Any]) -> None:
        unsent = [i for i, reply in enumerate(replies) if reply is _UNSENT]
        await self._pipeline(
            [("EVALSHA", *calls[i].evalsha_args()) for i in unsent],
            unsent,
            replies,
        )
        # Refused with NOSCRIPT, a call did not run; EVAL runs it once and
        # caches the script again. The rest of the batch is not re-sent.
        unknown = [i for i in unsent if _no_script(replies[i])]
        if unknown:
            for i in unknown:
                replies[i] = _UNSENT
            await self._pipeline(
                [("EVAL", *calls[i].eval_args()) for i in unknown],
                unknown,
                replies,
            )

    async def _pipeline(
        self,
        commands: list[tuple[Any, ...]],
        slots: Sequence[int],
        replies: list[Any],
    ) -> None:
        # Sends ``commands`` in one write and stores the reply of the n-th
        # in ``replies[slots[n]]``.
        if self._cluster:
            await self._cluster_pipeline(commands, slots, replies)
            return
        conn = await self._connection()
        try:
            if not conn.is_connected:
                # connect() is what a Sentinel-managed connection overrides
                # to ask the sentinels where the primary is.
                await conn.connect()
            await conn.send_packed_command(
                conn.pack_commands(commands), check_health=False
            )
            for i in slots:
                try:
                    replies[i] = await conn.read_response()
                except rx.ResponseError as exc:
                    replies[i] = _Failed(exc)
        except BaseException:
            # A reply may still be on its way; the connection cannot be
            # reused without reading it, so it is dropped.
            self._conn = None
            await _drop(conn)
            raise

    async def _cluster_pipeline(
        self,
        commands: list[tuple[Any, ...]],
        slots: Sequence[int],
        replies: list[Any],
    ) -> None:
        # The cluster client splits the batch by node and follows MOVED
        # and ASK redirections itself; a failed call is returned in place.
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        try:
            results = await pipe.execute(raise_on_error=False)
            for result in results:
                if isinstance(result, _CLUSTER_MOVING):
                    raise result
        except _CLUSTER_MOVING:
            # A node is gone or the slots moved: closing the client makes
            # it map the cluster again before its next command.
            await self._client.aclose()
            raise
        for i, result in zip(slots, results):
            failed = isinstance(result, Exception)
            replies[i] = _Failed(result) if failed else result

    async def _connection(self) -> Any:
        if self._conn is None:
            conn = self._client.connection_pool.make_connection()
            # Deadlines are enforced per call by the caller; a socket
            # timeout on top would only add a timer to every read.
            conn.socket_timeout = None
            self._conn = conn
        return self._conn


def _no_script(reply: Any) -> bool:
    return isinstance(reply, _Failed) and isinstance(
        reply.error, rx.NoScriptError
    )


async def _drop(conn: Any) -> None:
    try:
        await conn.disconnect(nowait=True)
    except Exception:  # noqa: BLE001 - the connection is gone either way
        pass


def _copy_error(exc: BaseException) -> BaseException:
    # Every waiter raises its own instance, so tracebacks do not pile up
    # on one shared exception object.
    if isinstance(exc, asyncio.CancelledError):
        return asyncio.CancelledError()
    try:
        return type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - an exception type with odd args
        return exc
