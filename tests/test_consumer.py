"""The alert consumer: anomaly events reach a handler at least once,
through a consumer group, on both backends; a consumer killed mid-batch
and the webhook example on a real server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
import redis
import redis.asyncio

from pactown_redis import (
    AnomalyConsumer,
    AnomalyEvent,
    AnomalyType,
    InvalidInputError,
    RedisUnavailableError,
    Severity,
    UserProfile,
)
from pactown_redis._core import text
from pactown_redis.acl import acl_setuser_line
from pactown_redis.consumer import ConsumerStats
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "webhook_alerts.py"
GROUP = "pactown-alerts"
STREAM = "pactown:anomalies"
DEAD = "pactown:anomalies:dead"
HOUR_MS = 3_600_000


# -- helpers -------------------------------------------------------------------


class Recorder:
    """A handler that records each call and raises for the ids in
    ``failing``."""

    def __init__(self, failing: Iterable[str] = ()) -> None:
        self.failing = set(failing)
        self.calls: list[str] = []
        self.done: list[tuple[str, AnomalyEvent]] = []

    async def __call__(self, event: AnomalyEvent, entry_id: str) -> None:
        self.calls.append(entry_id)
        if entry_id in self.failing:
            raise RuntimeError("alert receiver is down")
        self.done.append((entry_id, event))

    @property
    def ids(self) -> list[str]:
        return [entry_id for entry_id, _event in self.done]


async def produce(policy: Any, count: int, user: str = "mallory") -> None:
    """Record ``count`` HIGH anomalies: service starts refused to a blocked
    user, one per service ``svc-<i>``."""
    await policy.block_user(user, "abuse")
    for i in range(count):
        result = await policy.check_can_start_service(user, f"svc-{i}")
        assert not result.allowed
    await policy.anomalies.flush()


async def entries(client: Any, key: str = STREAM) -> list[tuple[str, dict]]:
    """Return the stream's entries as ``(id, text fields)``, oldest first."""
    return [
        (text(entry_id), {text(k): text(v) for k, v in fields.items()})
        for entry_id, fields in await client.xrange(key)
    ]


async def stream_ids(client: Any) -> list[str]:
    return [entry_id for entry_id, _fields in await entries(client)]


async def pending(client: Any) -> dict[str, tuple[str, int]]:
    """Return the group's pending entries: id -> (owner, deliveries)."""
    rows = await client.xpending_range(
        STREAM, GROUP, min="-", max="+", count=10_000
    )
    return {
        text(row["message_id"]): (text(row["consumer"]), row["times_delivered"])
        for row in rows
    }


async def age(client: Any, owner: str, idle_ms: int = HOUR_MS) -> None:
    """Make the entries pending for ``owner`` look idle for ``idle_ms``:
    XCLAIM to the same owner with IDLE and JUSTID keeps the owner and the
    delivery count, and moves Redis's idea of the last delivery back."""
    ids = [i for i, (who, _n) in (await pending(client)).items() if who == owner]
    if ids:
        await client.xclaim(STREAM, GROUP, owner, 0, ids, idle=idle_ms, justid=True)


async def eventually(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Wait until ``check()`` holds; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def event_fields(**changes: str) -> dict[str, str]:
    """Return the stream fields of a valid event, with ``changes``."""
    event = AnomalyEvent(
        timestamp=datetime(2030, 1, 1, tzinfo=timezone.utc),
        anomaly_type=AnomalyType.SUSPICIOUS_PATTERN,
        user_id="u",
        details="synthetic",
    )
    return {**event.to_fields(), **changes}


@pytest.fixture
async def make_consumer(redis_client):
    """Build consumers on the backend under test, named c0, c1..., with a
    short blocking read; closed at the end."""
    made: list[AnomalyConsumer] = []

    def build(handler: Any, **options: Any) -> AnomalyConsumer:
        options.setdefault("consumer", f"c{len(made)}")
        options.setdefault("block_ms", 10)
        consumer = AnomalyConsumer(redis_client, handler, **options)
        made.append(consumer)
        return consumer

    yield build
    for consumer in made:
        await consumer.close()


# -- delivery ------------------------------------------------------------------


async def test_events_reach_the_handler_once_in_order_and_are_acked(
    make_policy, make_consumer, redis_client
):
    """Each event goes to the handler once, in stream order, and is acked."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder)
    assert await consumer.ensure_group()
    await produce(policy, 5)
    stored = await entries(redis_client)

    assert await consumer.run_once() == 5
    assert recorder.ids == [entry_id for entry_id, _fields in stored]
    assert [event for _id, event in recorder.done] == [
        AnomalyEvent.from_fields(fields) for _id, fields in stored
    ]
    assert {event.service_id for _id, event in recorder.done} == {
        f"svc-{i}" for i in range(5)
    }
    assert all(
        event.anomaly_type is AnomalyType.UNAUTHORIZED_ACCESS
        and event.severity is Severity.HIGH
        for _id, event in recorder.done
    )
    assert await pending(redis_client) == {}
    assert await consumer.run_once() == 0
    assert len(recorder.calls) == 5
    assert consumer.stats == ConsumerStats(handled=5)


@pytest.mark.parametrize(("start_id", "expected"), [("$", 2), ("0", 5)])
async def test_start_id_chooses_new_or_retained_events(
    make_policy, make_consumer, start_id, expected
):
    """A group made at '$' sees only later events, at '0' all retained."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder, start_id=start_id)
    await produce(policy, 3, user="early")
    assert await consumer.ensure_group()
    await produce(policy, 2, user="late")

    assert await consumer.run_once() == expected
    assert [e.user_id for _id, e in recorder.done][-2:] == ["late", "late"]


async def test_group_creation_is_idempotent(
    make_policy, make_consumer, redis_client
):
    """Creating an existing group changes nothing, its position included."""
    policy = make_policy()
    first = make_consumer(Recorder(), start_id="0")
    assert await first.ensure_group() is True
    await produce(policy, 3)
    assert await first.run_once() == 3

    again = make_consumer(Recorder(), start_id="0")
    assert await again.ensure_group() is False
    assert await again.run_once() == 0
    groups = await redis_client.xinfo_groups(STREAM)
    assert [text(g["name"]) for g in groups] == [GROUP]


async def test_group_and_stream_are_created_on_first_use(
    make_consumer, redis_client
):
    """run_once on an empty Redis makes the stream and the group."""
    consumer = make_consumer(Recorder())
    assert await consumer.run_once() == 0
    assert await redis_client.xlen(STREAM) == 0
    assert len(await redis_client.xinfo_groups(STREAM)) == 1


async def test_handler_failure_leaves_the_entry_pending_then_retries_it(
    make_policy, make_consumer, redis_client, caplog
):
    """A raising handler leaves its entry pending; it comes back once idle."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder, claim_idle_ms=60_000)
    await consumer.ensure_group()
    await produce(policy, 3)
    ids = await stream_ids(redis_client)
    recorder.failing = {ids[1]}

    with caplog.at_level(logging.WARNING, logger="pactown_redis.consumer"):
        assert await consumer.run_once() == 2
    assert await pending(redis_client) == {ids[1]: (consumer.consumer, 1)}
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert ids[1] in caplog.records[0].getMessage()
    assert await consumer.run_once() == 0
    assert recorder.calls == ids

    await age(redis_client, consumer.consumer)
    recorder.failing = set()
    assert await consumer.run_once() == 1
    assert recorder.calls == ids + [ids[1]]
    assert await pending(redis_client) == {}
    assert consumer.stats == ConsumerStats(handled=3, failed=1, claimed=1)


async def test_two_consumers_split_the_entries(
    make_policy, make_consumer, redis_client
):
    """Two consumers of one group handle every entry exactly once in all."""
    policy = make_policy()
    left, right = Recorder(), Recorder()
    a = make_consumer(left, batch=3)
    b = make_consumer(right, batch=3)
    await a.ensure_group()
    await produce(policy, 10)

    while (await a.run_once()) + (await b.run_once()):
        pass
    assert Counter(left.calls + right.calls) == Counter(
        await stream_ids(redis_client)
    )
    assert left.calls and right.calls
    assert await pending(redis_client) == {}


async def test_entries_of_a_dead_consumer_are_claimed_once_idle(
    make_policy, make_consumer, redis_client
):
    """Entries a vanished consumer read are taken over after claim_idle_ms."""
    policy = make_policy()
    recorder = Recorder()
    live = make_consumer(recorder, claim_idle_ms=60_000)
    await live.ensure_group()
    await produce(policy, 4)
    ids = await stream_ids(redis_client)
    await redis_client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=10)

    assert await live.run_once() == 0
    await age(redis_client, "ghost")
    assert await live.run_once() == 4
    assert recorder.calls == ids
    assert live.stats.claimed == 4
    assert await pending(redis_client) == {}


async def test_own_pending_entries_are_retried_on_restart(
    make_policy, make_consumer, redis_client
):
    """A consumer restarted under its name retries its entries at once."""
    policy = make_policy()
    recorder = Recorder()
    restarted = make_consumer(recorder, consumer="worker-1", claim_idle_ms=HOUR_MS)
    await restarted.ensure_group()
    await produce(policy, 3)
    ids = await stream_ids(redis_client)
    await redis_client.xreadgroup(GROUP, "worker-1", {STREAM: ">"}, count=10)

    assert await restarted.run_once() == 3
    assert recorder.calls == ids
    assert await pending(redis_client) == {}


@pytest.mark.parametrize("way", ["claimed", "own"])
async def test_pending_entries_trimmed_away_are_skipped(
    make_policy, make_consumer, redis_client, way
):
    """Pending entries trimmed from the stream are dropped, not delivered."""
    policy = make_policy()
    recorder = Recorder()
    owner = "ghost" if way == "claimed" else "c0"
    consumer = make_consumer(recorder, consumer="c0", claim_idle_ms=60_000)
    await consumer.ensure_group()
    await produce(policy, 3)
    await redis_client.xreadgroup(GROUP, owner, {STREAM: ">"}, count=10)
    await age(redis_client, owner)
    await redis_client.xtrim(STREAM, maxlen=0)

    assert await consumer.run_once() == 0
    assert recorder.calls == []
    assert consumer.stats.skipped == 3
    assert await pending(redis_client) == {}


# -- dead letters ----------------------------------------------------------------


async def test_entry_goes_to_the_dead_letter_stream_after_max_deliveries(
    make_policy, make_consumer, redis_client
):
    """An entry failing max_deliveries times is dead-lettered and acked."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder, max_deliveries=3, claim_idle_ms=60_000)
    await consumer.ensure_group()
    await produce(policy, 2)
    stored = await entries(redis_client)
    poisoned = stored[0][0]
    recorder.failing = {poisoned}

    assert await consumer.run_once() == 1
    for _ in range(3):
        await age(redis_client, consumer.consumer)
        assert await consumer.run_once() == 0
    assert recorder.calls.count(poisoned) == 3
    assert await pending(redis_client) == {}

    [(_dead_id, dead)] = await entries(redis_client, DEAD)
    assert dead["dead_id"] == poisoned
    assert dead["dead_deliveries"] == "3"
    assert dead["dead_group"] == GROUP
    assert dead["dead_consumer"] == consumer.consumer
    assert dead["dead_reason"] == "RuntimeError: alert receiver is down"
    assert AnomalyEvent.from_fields(dead) == AnomalyEvent.from_fields(stored[0][1])
    assert consumer.stats == ConsumerStats(
        handled=1, failed=3, dead_lettered=1, claimed=2
    )


async def test_entry_past_max_deliveries_skips_the_handler(
    make_policy, make_consumer, redis_client
):
    """An entry delivered max_deliveries times already skips the handler."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder, max_deliveries=5)
    await consumer.ensure_group()
    await produce(policy, 1)
    [entry_id] = await stream_ids(redis_client)
    await redis_client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=10)
    await redis_client.xclaim(
        STREAM, GROUP, "ghost", 0, [entry_id], idle=HOUR_MS, retrycount=5,
        justid=True,
    )

    assert await consumer.run_once() == 0
    assert recorder.calls == []
    [(_id, dead)] = await entries(redis_client, DEAD)
    assert (dead["dead_id"], dead["dead_deliveries"]) == (entry_id, "6")
    assert dead["dead_reason"] == "not acknowledged after 5 deliveries"
    assert await pending(redis_client) == {}


async def test_dead_letter_stream_is_capped(make_consumer, redis_client):
    """The dead-letter stream is trimmed with MAXLEN ~ dead_maxlen."""
    recorder = Recorder()
    consumer = make_consumer(
        recorder, max_deliveries=1, dead_maxlen=10, batch=1000, start_id="0"
    )
    pipe = redis_client.pipeline(transaction=False)
    for _ in range(300):
        pipe.xadd(STREAM, event_fields())
    await pipe.execute()
    recorder.failing = set(await stream_ids(redis_client))

    assert await consumer.run_once() == 0
    assert consumer.stats.dead_lettered == 300
    assert 10 <= await redis_client.xlen(DEAD) < 300


# -- foreign entries -------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"hello": "world"},
        event_fields(ts="yesterday"),
        event_fields(type="meteor_strike"),
        event_fields(severity="apocalyptic"),
        event_fields(metadata="{not json"),
        event_fields(metadata="[1, 2]"),
    ],
    ids=["foreign", "ts", "type", "severity", "json", "metadata"],
)
async def test_unreadable_entries_are_acked_and_skipped(
    make_policy, make_consumer, redis_client, caplog, fields
):
    """An entry that is no anomaly event is acked, skipped and logged."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder)
    await consumer.ensure_group()
    await produce(policy, 1, user="a")
    foreign = text(await redis_client.xadd(STREAM, fields))
    await produce(policy, 1, user="b")

    with caplog.at_level(logging.WARNING, logger="pactown_redis.consumer"):
        assert await consumer.run_once() == 2
    assert [e.user_id for _id, e in recorder.done] == ["a", "b"]
    assert foreign not in recorder.calls
    assert consumer.stats.skipped == 1
    assert await pending(redis_client) == {}
    assert any(
        r.levelno == logging.WARNING and foreign in r.getMessage()
        for r in caplog.records
    )


# -- running ---------------------------------------------------------------------


async def test_run_delivers_until_stopped(make_policy, make_consumer, redis_client):
    """run() hands over events as they come and returns after stop()."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder, block_ms=20)
    await consumer.ensure_group()
    task = asyncio.ensure_future(consumer.run())
    await produce(policy, 4)

    await eventually(lambda: len(recorder.done) == 4)
    consumer.stop()
    await asyncio.wait_for(task, 5)
    assert recorder.ids == await stream_ids(redis_client)
    assert await pending(redis_client) == {}


async def test_cancelled_handler_leaves_its_entry_pending(
    make_policy, make_consumer, redis_client
):
    """Cancelling run() inside the handler acks nothing; a restart retries."""
    policy = make_policy()
    started = asyncio.Event()

    async def stuck(event: AnomalyEvent, entry_id: str) -> None:
        started.set()
        await asyncio.Event().wait()

    consumer = make_consumer(stuck, consumer="w")
    await consumer.ensure_group()
    await produce(policy, 1)
    [entry_id] = await stream_ids(redis_client)
    task = asyncio.ensure_future(consumer.run())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pending(redis_client) == {entry_id: ("w", 1)}

    recorder = Recorder()
    assert await make_consumer(recorder, consumer="w").run_once() == 1
    assert recorder.calls == [entry_id]


@pytest.mark.parametrize("loss", ["group destroyed", "stream deleted"])
async def test_a_lost_group_is_created_again(
    make_policy, make_consumer, redis_client, caplog, loss
):
    """When the group or its stream vanishes, the next cycle recreates it."""
    policy = make_policy()
    recorder = Recorder()
    consumer = make_consumer(recorder)
    assert await consumer.run_once() == 0
    if loss == "group destroyed":
        await redis_client.xgroup_destroy(STREAM, GROUP)
    else:
        await redis_client.delete(STREAM)

    with caplog.at_level(logging.WARNING, logger="pactown_redis.consumer"):
        assert await consumer.run_once() == 0
    assert "creating it again" in caplog.records[0].getMessage()
    await produce(policy, 2)
    assert await consumer.run_once() == 2


def nowhere() -> str:
    """Return the URL of a local port nothing listens on."""
    return f"redis://127.0.0.1:{free_port()}/0"


async def test_run_outlives_redis_errors_until_stopped(caplog):
    """run() logs Redis failures, waits, retries, and still stops."""
    consumer = AnomalyConsumer(nowhere(), Recorder(), block_ms=1, timeout=1.0)
    with caplog.at_level(logging.WARNING, logger="pactown_redis.consumer"):
        task = asyncio.ensure_future(consumer.run())
        await eventually(lambda: len(caplog.records) >= 2)
        consumer.stop()
        await asyncio.wait_for(task, 5)
    await consumer.close()
    assert "XGROUP CREATE failed: ConnectionError" in caplog.records[0].getMessage()


async def test_run_once_reports_an_unreachable_redis():
    """run_once() raises RedisUnavailableError, with the cause kept."""
    consumer = AnomalyConsumer(nowhere(), Recorder(), timeout=1.0)
    with pytest.raises(RedisUnavailableError) as caught:
        await consumer.run_once()
    await consumer.close()
    assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)


@pytest.mark.parametrize("backend", ["real"])
async def test_a_url_consumer_owns_and_closes_its_client(
    make_policy, redis_client, redis_server
):
    """Built from a URL, a consumer makes its client and closes it on exit."""
    async def clients() -> int:
        return int((await redis_client.info("clients"))["connected_clients"])

    await produce(make_policy(), 2)
    recorder = Recorder()
    before = await clients()
    async with AnomalyConsumer(
        redis_server.url, recorder, block_ms=10, start_id="0"
    ) as consumer:
        assert await consumer.run_once() == 2
        assert await clients() == before + 1
    assert await clients() == before


@pytest.mark.parametrize("backend", ["real"])
async def test_the_namespace_acl_user_may_consume(
    make_policy, redis_client, redis_server
):
    """The namespace's ACL user may send every command the consumer uses."""
    password = "alerts-" + "x" * 16
    line = acl_setuser_line("pactown", "alerts", password)
    await redis_client.execute_command(*shlex.split(line))
    url = f"redis://alerts:{password}@127.0.0.1:{redis_server.port}/0"
    try:
        await produce(make_policy(), 2)
        ids = await stream_ids(redis_client)
        recorder = Recorder(failing=ids[:1])
        async with AnomalyConsumer(
            url, recorder, consumer="a", start_id="0", max_deliveries=2,
            block_ms=10,
        ) as consumer:
            assert await consumer.run_once() == 1
            await age(redis_client, "a")
            assert await consumer.run_once() == 0
    finally:
        await redis_client.execute_command("ACL", "DELUSER", "alerts")
    assert recorder.calls == [ids[0], ids[1], ids[0]]
    assert [f["dead_id"] for _i, f in await entries(redis_client, DEAD)] == ids[:1]
    assert await pending(redis_client) == {}


@pytest.mark.parametrize("backend", ["real"])
async def test_a_resp2_client_reads_the_same(
    make_policy, redis_client, redis_server
):
    """New, own pending and claimed entries arrive through a RESP2 client."""
    await produce(make_policy(), 6)
    ids = await stream_ids(redis_client)
    await redis_client.xgroup_create(STREAM, GROUP, id="0")
    await redis_client.xreadgroup(GROUP, "a", {STREAM: ">"}, count=2)
    await redis_client.xreadgroup(GROUP, "ghost", {STREAM: ">"}, count=2)
    await age(redis_client, "ghost")
    old_protocol = redis.asyncio.from_url(redis_server.url, protocol=2)
    recorder = Recorder()
    try:
        consumer = AnomalyConsumer(old_protocol, recorder, consumer="a")
        assert await consumer.run_once() == 6
    finally:
        await old_protocol.aclose()
    assert recorder.calls == ids
    assert consumer.stats.claimed == 2


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"handler": None}, "handler must be callable"),
        ({"namespace": "a b"}, "namespace"),
        ({"group": ""}, "group must not be empty"),
        ({"consumer": 7}, "consumer must be str"),
        ({"batch": 0}, "batch must be >= 1"),
        ({"batch": True}, "batch must be an int"),
        ({"batch": 2.5}, "batch must be an int"),
        ({"block_ms": 0}, "block_ms must be >= 1"),
        ({"block_ms": 60_001}, "block_ms must be >= 1 and <= 60000"),
        ({"claim_idle_ms": 0}, "claim_idle_ms must be >= 1"),
        ({"max_deliveries": 0}, "max_deliveries must be >= 1"),
        ({"dead_maxlen": 0}, "dead_maxlen must be >= 1"),
        ({"start_id": "1-0"}, "start_id must be '$' or '0'"),
        ({"start_id": ">"}, "start_id must be '$' or '0'"),
        ({"timeout": 0}, "timeout"),
        ({"redis": "nope://x"}, "cannot use Redis URL"),
    ],
)
def test_bad_options_are_refused(options, message):
    """Every option is checked before anything reaches Redis."""
    arguments: dict[str, Any] = {"redis": "redis://127.0.0.1:1", "handler": Recorder()}
    arguments.update(options)
    with pytest.raises(InvalidInputError, match=message.replace("$", r"\$")):
        AnomalyConsumer(arguments.pop("redis"), arguments.pop("handler"), **arguments)


def test_default_consumer_name_is_host_and_pid():
    """Without a name, a consumer is called <hostname>-<pid>."""
    consumer = AnomalyConsumer("redis://127.0.0.1:1", Recorder())
    assert consumer.consumer == f"{socket.gethostname()}-{os.getpid()}"


# -- a consumer killed mid-batch ---------------------------------------------------

WORKER = """
import asyncio, os, signal, sys
from pactown_redis import AnomalyConsumer

url, log_path, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
handled = 0

async def handle(event, entry_id):
    global handled
    with open(log_path, "a") as log:
        log.write(entry_id + "\\n")
        log.flush()
        os.fsync(log.fileno())
    handled += 1
    if handled == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

async def main():
    async with AnomalyConsumer(
        url, handle, consumer="doomed", start_id="0", batch=1000, block_ms=100
    ) as consumer:
        await consumer.run()

asyncio.run(main())
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["real"])
async def test_a_consumer_killed_mid_batch_loses_nothing(
    make_policy, make_consumer, redis_client, redis_server, tmp_path
):
    """After kill -9 mid-batch, a rescuer claims the rest; none is lost."""
    policy = make_policy()
    await produce(policy, 20)
    ids = await stream_ids(redis_client)
    log = tmp_path / "handled"
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WORKER, redis_server.url, str(log), "7", cwd=ROOT
    )
    assert await asyncio.wait_for(worker.wait(), 60) == -signal.SIGKILL
    first = log.read_text().split()
    assert first == ids[:7]
    assert await pending(redis_client) == {i: ("doomed", 1) for i in ids[6:]}

    recorder = Recorder()
    rescuer = make_consumer(recorder, consumer="rescuer", claim_idle_ms=100)

    async def idle_enough() -> bool:
        rows = await redis_client.xpending_range(
            STREAM, GROUP, min="-", max="+", count=100, idle=100
        )
        return len(rows) == 14

    deadline = time.monotonic() + 2
    while not await idle_enough():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    while await rescuer.run_once():
        pass

    assert recorder.calls == ids[6:]
    assert set(first) | set(recorder.calls) == set(ids)
    assert set(first) & set(recorder.calls) == {ids[6]}
    assert await pending(redis_client) == {}


# -- the webhook example -----------------------------------------------------------


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("webhook_alerts", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


webhook = load_example()


class Receiver:
    """An HTTP server on 127.0.0.1 that records each request and answers
    with the next of ``statuses`` (200 once they run out; 0 never
    answers)."""

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.url = ""
        self._done = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Receiver":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._done.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    @property
    def bodies(self) -> list[Any]:
        return [json.loads(body) for _method, _headers, body in self.requests]

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.append(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            headers = dict(
                (name.strip().lower(), value.strip())
                for name, value in (line.split(":", 1) for line in lines if line)
            )
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            self.requests.append((request_line.split(" ")[0], headers, body))
            status = self.statuses.pop(0) if self.statuses else 200
            if status == 0:
                await self._done.wait()
                return
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def webhook_args(url: str, *more: str) -> Any:
    return webhook.parse_args(
        ["--webhook-url", url, "--drain", "--start-id", "0", "--block-ms", "10",
         "--backoff", "0", "--retries", "2", *more]
    )


async def mixed_events(policy: Any) -> None:
    """Record HIGH (blocked starts), MEDIUM (rate limit), CRITICAL and LOW
    events, through the policy's anomaly log."""
    await produce(policy, 2, user="mallory")
    await policy.set_user_profile(UserProfile.from_tier("busy", "free"))
    for _ in range(21):
        await policy.check_rate_limit("busy")
    for severity in (Severity.CRITICAL, Severity.LOW):
        policy.anomalies.record(
            AnomalyEvent(
                timestamp=datetime.now(timezone.utc),
                anomaly_type=AnomalyType.SUSPICIOUS_PATTERN,
                user_id="eve",
                details=f"{severity.value} pattern",
                severity=severity,
            )
        )
    await policy.anomalies.flush()


async def expected_alerts(client: Any) -> list[dict[str, Any]]:
    return [
        {"id": entry_id, **event.to_dict()}
        for entry_id, event in (
            (i, AnomalyEvent.from_fields(f)) for i, f in await entries(client)
        )
        if event.severity in (Severity.HIGH, Severity.CRITICAL)
    ]


async def test_webhook_posts_high_and_critical_events(make_policy, redis_client):
    """The example POSTs each high/critical event as JSON, keyed by its id."""
    policy = make_policy()
    await mixed_events(policy)
    async with Receiver() as receiver:
        await webhook.forward(webhook_args(receiver.url), redis_client)

    expected = await expected_alerts(redis_client)
    assert [e["severity"] for e in expected] == ["high", "high", "critical"]
    assert receiver.bodies == expected
    assert [h["idempotency-key"] for _m, h, _b in receiver.requests] == [
        e["id"] for e in expected
    ]
    assert {m for m, _h, _b in receiver.requests} == {"POST"}
    assert all(
        h["content-type"] == "application/json" for _m, h, _b in receiver.requests
    )
    assert (await redis_client.xpending(STREAM, "pactown-webhook"))["pending"] == 0


async def test_webhook_retries_a_busy_receiver(make_policy, redis_client):
    """A 503 then a 200: the alert is sent again and acknowledged."""
    policy = make_policy()
    await produce(policy, 1)
    async with Receiver([503]) as receiver:
        await webhook.forward(webhook_args(receiver.url), redis_client)

    assert len(receiver.requests) == 2
    assert receiver.bodies[0] == receiver.bodies[1]
    assert (await redis_client.xpending(STREAM, "pactown-webhook"))["pending"] == 0


@pytest.mark.parametrize(
    ("statuses", "attempts"),
    [([500, 500, 500], 3), ([404], 1), ([0, 0, 0], 3)],
    ids=["server-error", "not-retryable", "no-answer"],
)
async def test_webhook_failure_leaves_the_alert_pending(
    make_policy, redis_client, caplog, statuses, attempts
):
    """An alert the receiver never takes stays pending for a later try."""
    policy = make_policy()
    await produce(policy, 1)
    [entry_id] = await stream_ids(redis_client)
    with caplog.at_level(logging.WARNING, logger="pactown_redis.consumer"):
        async with Receiver(statuses) as receiver:
            await webhook.forward(
                webhook_args(receiver.url, "--timeout", "0.2"), redis_client
            )

    assert len(receiver.requests) == attempts
    rows = await redis_client.xpending_range(
        STREAM, "pactown-webhook", min="-", max="+", count=10
    )
    assert [text(row["message_id"]) for row in rows] == [entry_id]
    assert "WebhookError" in caplog.text


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--webhook-url", "http://a/x"], {}, "http://a/x"),
        ([], {"PACTOWN_WEBHOOK_URL": "http://b/y"}, "http://b/y"),
        (["--webhook-url", "http://a/x"], {"PACTOWN_WEBHOOK_URL": "http://b/y"},
         "http://a/x"),
        ([], {}, None),
    ],
)
def test_webhook_url_comes_from_the_flag_or_the_environment(
    monkeypatch, argv, env, expected
):
    """--webhook-url wins over PACTOWN_WEBHOOK_URL; without both it exits 2."""
    monkeypatch.delenv("PACTOWN_WEBHOOK_URL", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if expected is None:
        with pytest.raises(SystemExit) as caught:
            webhook.parse_args(argv)
        assert caught.value.code == 2
    else:
        assert webhook.parse_args(argv).webhook_url == expected


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["real"])
async def test_webhook_example_runs_as_a_script(
    make_policy, redis_client, redis_server
):
    """python examples/webhook_alerts.py --drain sends the alerts, exits 0."""
    policy = make_policy()
    await mixed_events(policy)
    async with Receiver() as receiver:
        script = await asyncio.create_subprocess_exec(
            sys.executable, str(EXAMPLE), "--redis-url", redis_server.url,
            "--drain", "--start-id", "0", "--block-ms", "50",
            env={**_clean_env(), "PACTOWN_WEBHOOK_URL": receiver.url},
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await asyncio.wait_for(script.communicate(), 60)
    assert script.returncode == 0, err.decode()
    assert receiver.bodies == await expected_alerts(redis_client)
    assert len(receiver.bodies) == 3


def _clean_env() -> dict[str, str]:
    """Return this process's environment without any Redis or webhook URL."""
    dropped = {"PACTOWN_WEBHOOK_URL", "PACTOWN_REDIS_URL", "REDIS_URL"}
    return {k: v for k, v in os.environ.items() if k not in dropped}
