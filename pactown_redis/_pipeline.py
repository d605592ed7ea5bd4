"""Automatic pipelining: concurrent script calls share round trips.

A policy sends every script call through one :class:`AutoPipeline`, which
owns a few connections, its *lanes*. A call made while nothing is in
flight goes out at once, alone, so one task alone pays one round trip per
call. A call made while other calls are in flight waits for the event
loop's current pass to end: the tasks woken by the last replies make their
next calls in that pass, and they leave together, as one write per free
lane (or on the first lane to come free), their replies read back in
order. Many tasks thus pay one round trip per batch. The waiting calls
are split evenly between the free lanes, so that Redis runs one batch
while the client reads the other's replies and writes the next; sent as
one batch, the calls of tasks woken together would keep Redis and the
client taking turns. The calls of one ``call_many`` are never split.

Pipelining changes no decision: each call is still one ``EVALSHA`` that
Redis runs atomically and on its own; only the packets are shared.

Recovery, per call:

- ``NOSCRIPT`` (the server lost its script cache) means that call did not
  run; it is sent again, alone, as ``EVAL``. The rest of its batch ran
  once and is answered normally.
- Any other error reply belongs to its call alone.
- A broken connection fails the calls whose replies were not read yet.
  Those are sent once more on a new connection, if ``may_retry`` says
  there is time; sending a call twice never applies it twice (see
  :class:`pactown_redis.resilience.AsyncGuard`).

Deadlines: each call has its own. A batch is given its most urgent call's
deadline, and a call whose deadline passed while it waited is answered
with ``TimeoutError`` without being sent.

On a standalone server or behind Sentinel each lane is one connection
made by the client's pool, with the pool's settings (address, TLS,
credentials, protocol). On a Redis Cluster a batch is split by node and
sent by the cluster client.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any, Callable, Coroutine, Optional, Sequence, TypeVar

import redis.exceptions as rx

from ._cluster import is_cluster
from .scripts import ScriptCall

__all__ = ["AutoPipeline", "LANES", "MAX_BATCH", "MIN_SHARE"]

T = TypeVar("T")

#: Batches in flight at once. Two keep both Redis and the client busy;
#: more only split the same work into smaller batches.
LANES = 2

#: The most calls one batch carries; more wait for the next batch, so one
#: burst cannot build a reply larger than the client reads comfortably.
MAX_BATCH = 512

#: The smallest share of waiting calls a lane takes when they are split
#: between free lanes; fewer calls than that are not split.
MIN_SHARE = 8

# Failures after which a cluster client must learn the topology again.
_CLUSTER_MOVING = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterDownError,
    rx.SlotNotCoveredError,
)

# A call waiting for a batch: the future its caller awaits, the loop time
# by which the caller must have its answer, and whether it is the last of
# the calls made together (by one call_many), which share one batch.
_Waiting = tuple[ScriptCall, "asyncio.Future[Any]", float, bool]

# A call's place among the replies before its reply is read.
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
        lanes: batches in flight at once (each on its own connection).
    """

    def __init__(
        self,
        client: Any,
        may_retry: Callable[[BaseException, float], bool],
        lanes: int = LANES,
    ) -> None:
        self._client = client
        self._cluster = is_cluster(client)
        self._may_retry = may_retry
        self._lanes = lanes
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._reset()

    def _reset(self) -> None:
        # Connections and futures belong to one event loop.
        self._conns: list[Any] = [None] * self._lanes
        self._free = list(range(self._lanes))
        self._waiting: list[_Waiting] = []
        self._drainers: set[asyncio.Task[None]] = set()
        self._kick_due = False

    async def close(self) -> None:
        """Close the lanes' connections; a later call opens new ones."""
        # Connections of another (perhaps closed) loop are only forgotten.
        self._bind_loop()
        conns, self._conns = self._conns, [None] * self._lanes
        for conn in conns:
            if conn is not None:
                await conn.disconnect()

    # -- calls ------------------------------------------------------------------

    async def call(self, call: ScriptCall, timeout: float) -> Any:
        """Return the reply of ``call``, within ``timeout`` seconds.

        Raises:
            asyncio.TimeoutError: no reply in time.
            redis.exceptions.RedisError: the call's error reply, or the
                connection's failure.
            OSError: the connection failed.
        """
        reply = (await self.call_many((call,), timeout))[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def call_many(
        self, calls: Sequence[ScriptCall], timeout: float
    ) -> list[Any]:
        """Return the replies of ``calls``, in order, within ``timeout``
        seconds. They leave together, in order: at once when nothing is
        in flight, else with the calls made in the same pass of the event
        loop; more than ``MAX_BATCH`` leave that many at a time, each part
        once the previous one is answered. A call's error reply, or its
        failure, takes its place in the list.

        Raises:
            asyncio.TimeoutError: no reply in time (sent at once).
            redis.exceptions.RedisError, OSError: the connection failed
                (sent at once).
        """
        loop = self._bind_loop()
        if not calls:
            return []
        deadline = loop.time() + timeout
        if len(calls) > MAX_BATCH:
            return await self._in_parts(calls, deadline)
        if len(self._free) == self._lanes and not self._waiting:
            # Nothing in flight: no batch to join, so no reason to wait.
            lane = self._free.pop()
            try:
                replies = await _until(deadline, self._send(lane, list(calls)))
            finally:
                self._done_with(lane)
            return [r.error if isinstance(r, _Failed) else r for r in replies]
        last = len(calls) - 1
        futures = [
            self._enqueue(call, deadline, i == last)
            for i, call in enumerate(calls)
        ]
        if self._free and not self._kick_due:
            # Other calls are in flight, so more are likely on their way:
            # the tasks their replies woke run before the kick does, and
            # leave with this call in one batch on the free lane.
            self._kick_due = True
            loop.call_soon(self._kick)
        if len(futures) == 1:
            # Awaited directly, a cancelled caller cancels its future, and
            # the batch then leaves the call out.
            try:
                return [await futures[0]]
            except (rx.RedisError, OSError) as exc:
                return [exc]
        await asyncio.wait(futures)
        return [_outcome(future) for future in futures]

    async def _in_parts(
        self, calls: Sequence[ScriptCall], deadline: float
    ) -> list[Any]:
        # One part at a time, each once the previous one is answered, so
        # that the calls keep their order. A part that fails fails its own
        # calls; once the deadline has passed, the rest are not sent.
        assert self._loop is not None
        replies: list[Any] = []
        for start in range(0, len(calls), MAX_BATCH):
            part = calls[start:start + MAX_BATCH]
            left = deadline - self._loop.time()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError()
                replies += await self.call_many(part, left)
            except (asyncio.TimeoutError, rx.RedisError, OSError) as exc:
                replies += [_copy_error(exc) for _ in part]
        return replies

    # -- waiting ----------------------------------------------------------------

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A policy moved to another loop (a test's, a thread's) starts
            # afresh; the old loop's connections cannot be used from here.
            self._loop = loop
            self._reset()
        return loop

    def _enqueue(
        self, call: ScriptCall, deadline: float, last: bool
    ) -> "asyncio.Future[Any]":
        assert self._loop is not None
        future = self._loop.create_future()
        self._waiting.append((call, future, deadline, last))
        return future

    def _kick(self) -> None:
        self._kick_due = False
        while self._waiting and self._free:
            self._done_with(self._free.pop())

    def _done_with(self, lane: int) -> None:
        # A lane that comes free serves the calls that waited for it.
        if not self._waiting:
            self._free.append(lane)
            return
        assert self._loop is not None
        task = self._loop.create_task(
            self._drain(lane, self._share()), name="pactown-redis pipeline"
        )
        self._drainers.add(task)
        task.add_done_callback(self._drainers.discard)

    def _share(self) -> list[_Waiting]:
        # Takes one lane's share of the waiting calls, split evenly with
        # the other free lanes (see the module's notes).
        waiting = self._waiting
        count = len(waiting)
        size = -(-count // (1 + len(self._free)))
        if size < MIN_SHARE:
            size = count
        size = min(size, MAX_BATCH)
        # The calls of one call_many stay together, and so in order: the
        # cut moves to the end of their group, or before it when that end
        # lies beyond MAX_BATCH (a group is never longer).
        end = size
        while end < count and not waiting[end - 1][3]:
            end += 1
        if end > MAX_BATCH:
            end = size
            while end > 1 and not waiting[end - 1][3]:
                end -= 1
        batch = waiting[:end]
        del waiting[:end]
        return batch

    async def _drain(self, lane: int, batch: list[_Waiting]) -> None:
        assert self._loop is not None
        try:
            while batch:
                now = self._loop.time()
                for _, future, deadline, _ in batch:
                    if deadline <= now and not future.done():
                        future.set_exception(asyncio.TimeoutError())
                live = [each for each in batch if not each[1].done()]
                if live:
                    await self._answer(lane, live)
                batch = self._share() if self._waiting else []
                if self._waiting and self._free:
                    self._kick()
        finally:
            self._free.append(lane)

    async def _answer(self, lane: int, batch: list[_Waiting]) -> None:
        # One deadline for the batch, its most urgent call's: a call that
        # waited for the previous batch has less time left than a new one.
        deadline = min(deadline for _, _, deadline, _ in batch)
        try:
            replies = await _until(
                deadline, self._send(lane, [each[0] for each in batch])
            )
        except BaseException as exc:
            for _, future, _, _ in batch:
                if not future.done():
                    future.set_exception(_copy_error(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future, _, _), reply in zip(batch, replies):
            if future.done():
                continue
            if isinstance(reply, _Failed):
                future.set_exception(reply.error)
            else:
                future.set_result(reply)

    # -- sending ----------------------------------------------------------------

    async def _send(self, lane: int, calls: list[ScriptCall]) -> list[Any]:
        started = time.monotonic()
        replies: list[Any] = [_UNSENT] * len(calls)
        try:
            await self._exchange(lane, calls, replies)
        except rx.ConnectionError as exc:
            # The replies already read are kept; of the calls that may have
            # run without an answer, only the replayable ones are unsent.
            failure: BaseException = exc
            unsent = any(reply is _UNSENT for reply in replies)
            if unsent and self._may_retry(exc, started):
                try:
                    await self._exchange(lane, calls, replies)
                except rx.ConnectionError as again:
                    failure = again
            for i, reply in enumerate(replies):
                if reply is _UNSENT:
                    replies[i] = _Failed(_copy_error(failure))
        return replies

    async def _exchange(
        self, lane: int, calls: list[ScriptCall], replies: list[Any]
    ) -> None:
        unsent = [i for i, reply in enumerate(replies) if reply is _UNSENT]
        if not unsent:
            return
        await self._pipeline(lane, calls, unsent, replies, cached=True)
        # Refused with NOSCRIPT, a call did not run; EVAL runs it once and
        # caches the script again. The rest of the batch is not re-sent.
        unknown = [i for i in unsent if _no_script(replies[i])]
        if unknown:
            for i in unknown:
                replies[i] = _UNSENT
            await self._pipeline(lane, calls, unknown, replies, cached=False)

    async def _pipeline(
        self,
        lane: int,
        calls: list[ScriptCall],
        indexes: Sequence[int],
        replies: list[Any],
        *,
        cached: bool,
    ) -> None:
        # Sends the calls at ``indexes`` in one write, as EVALSHA when the
        # script is ``cached``, else as EVAL, and stores each reply at its
        # call's index.
        if self._cluster:
            commands = [_command(calls[i], cached) for i in indexes]
            await self._cluster_pipeline(calls, commands, indexes, replies)
            return
        conn = self._connection(lane)
        sent = False
        try:
            if not conn.is_connected:
                # connect() is what a Sentinel-managed connection overrides
                # to ask the sentinels where the primary is.
                await conn.connect()
            if cached:
                packed = [calls[i].packed_evalsha() for i in indexes]
            else:
                packed = conn.pack_commands(
                    [_command(calls[i], cached) for i in indexes]
                )
            sent = True
            await conn.send_packed_command(packed, check_health=False)
            for i in indexes:
                try:
                    replies[i] = await conn.read_response()
                except rx.ResponseError as exc:
                    replies[i] = _Failed(exc)
        except BaseException as exc:
            # A reply may still be on its way; the connection cannot be
            # reused without reading it, so it is dropped.
            self._conns[lane] = None
            await _drop(conn)
            if sent:
                _settle_unanswered(calls, indexes, replies, exc)
            raise

    async def _cluster_pipeline(
        self,
        calls: list[ScriptCall],
        commands: list[tuple[Any, ...]],
        indexes: Sequence[int],
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
        except _CLUSTER_MOVING as exc:
            # A node is gone or the slots moved: closing the client makes
            # it map the cluster again before its next command. Which
            # calls ran is not known.
            await self._client.aclose()
            _settle_unanswered(calls, indexes, replies, exc)
            raise
        for i, result in zip(indexes, results):
            failed = isinstance(result, Exception)
            replies[i] = _Failed(result) if failed else result

    def _connection(self, lane: int) -> Any:
        conn = self._conns[lane]
        if conn is not None and _closed_by_server(conn):
            # Sending on it would fail only after the write, when a debit
            # can no longer be sent again; a new connection is safe.
            self._conns[lane] = conn = None
        if conn is None:
            conn = self._client.connection_pool.make_connection()
            # Every call carries its own deadline; a socket timeout on top
            # would only add a timer to every read.
            conn.socket_timeout = None
            self._conns[lane] = conn
        return conn


async def _until(deadline: float, work: Coroutine[Any, Any, T]) -> T:
    # The deadline is the event loop's time.
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(deadline):
            return await work
    remaining = deadline - asyncio.get_running_loop().time()
    return await asyncio.wait_for(work, max(0.0, remaining))  # pragma: no cover


def _outcome(future: "asyncio.Future[Any]") -> Any:
    # A settled future's result, or its exception as a value.
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception() or future.result()


def _settle_unanswered(
    calls: list[ScriptCall],
    indexes: Sequence[int],
    replies: list[Any],
    exc: BaseException,
) -> None:
    # After a write, an unanswered call may have run: one that must not run
    # twice fails with the connection's error, the others stay unsent.
    for i in indexes:
        if replies[i] is _UNSENT and not calls[i].replayable:
            replies[i] = _Failed(_copy_error(exc))


def _closed_by_server(conn: Any) -> bool:
    # The stream reader of a redis-py connection sees the server's FIN as
    # soon as the event loop polls the socket, long before a write would.
    reader = getattr(conn, "_reader", None)
    at_eof = getattr(reader, "at_eof", None)
    return bool(at_eof is not None and at_eof())


def _command(call: ScriptCall, cached: bool) -> tuple[Any, ...]:
    if cached:
        return ("EVALSHA", *call.evalsha_args())
    return ("EVAL", *call.eval_args())


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
