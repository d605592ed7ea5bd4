"""Automatic pipelining and check_many: shared round trips, same decisions.

Concurrent calls from one event loop leave in batches; every test here
checks that the decisions are exactly those of calls sent one by one, and
that the recovery rules (NOSCRIPT, error replies, deadlines) still hold
per call.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import fakeredis
import pytest
import redis

from pactown_redis import (
    AnomalyType,
    BackendError,
    InvalidInputError,
    SyncSecurityPolicy,
    TIER_LIMITS,
    UserProfile,
    UserTier,
)
from pactown_redis import _core, _pipeline
from pactown_redis._pipeline import AutoPipeline
from pactown_redis.scripts import script

FREE_LIMIT = 20


class BatchSpy:
    """Counts the EVALSHA batches an AutoPipeline writes (not the EVAL
    re-sends after NOSCRIPT); every batch still goes to Redis."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        original = AutoPipeline._pipeline

        async def counted(pipe, lane, calls, indexes, replies, *, cached):
            if cached:
                self.sizes.append(len(indexes))
            await original(pipe, lane, calls, indexes, replies, cached=cached)

        monkeypatch.setattr(AutoPipeline, "_pipeline", counted)


@pytest.fixture
def sync_admin(backend: str, request: pytest.FixtureRequest) -> Any:
    """An empty Redis of the backend under test, through a blocking client."""
    if backend == "fake":
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer(), protocol=3)
    else:
        server = request.getfixturevalue("redis_server")
        client = redis.Redis.from_url(server.url, protocol=3)
        client.flushall()
    yield client
    client.close()


@pytest.fixture
def make_sync_policy(sync_admin: Any, clock: Any) -> Any:
    """Build blocking policies on ``sync_admin``, closed at the end."""
    made: list[SyncSecurityPolicy] = []

    def build(**options: Any) -> SyncSecurityPolicy:
        options.setdefault("clock", clock)
        options.setdefault("cpu_threshold", None)
        options.setdefault("memory_threshold", None)
        options.setdefault("auto_renew", False)
        options.setdefault("timeout", 10.0)
        made.append(SyncSecurityPolicy(sync_admin, **options))
        return made[-1]

    yield build
    for policy in made:
        policy.close()


async def commandstats(client: Any) -> Counter[str]:
    """Calls per command since the last reset, on a real server."""
    info = await client.info("commandstats")
    return Counter(
        {name.removeprefix("cmdstat_"): stat["calls"] for name, stat in info.items()}
    )


# -- concurrent calls -----------------------------------------------------------


async def test_concurrent_debits_decide_as_one_by_one(policy):
    """Thirty debits at once of one FREE user: exactly twenty pass, each
    sees a different remaining count, and the bucket is empty after."""
    results = await asyncio.gather(
        *(policy.check_rate_limit("u") for _ in range(30))
    )
    allowed = [r for r in results if r.allowed]
    assert len(allowed) == FREE_LIMIT
    assert sorted(r.remaining for r in allowed) == list(range(FREE_LIMIT))
    assert (await policy.get_user_state("u")).tokens == 0
    await policy.anomalies.flush()
    denied = await policy.anomalies.by_type(AnomalyType.RATE_LIMIT_EXCEEDED)
    assert len(denied) == 10


# fakeredis answers without ever suspending the caller, so its calls never
# overlap: batching is a matter of real sockets.
@pytest.mark.parametrize("backend", ["real"], indirect=True)
async def test_concurrent_calls_share_round_trips(policy, monkeypatch):
    """64 calls at once leave in a handful of batches, not 64 writes."""
    spy = BatchSpy(monkeypatch)
    users = [f"u{n}" for n in range(64)]
    results = await asyncio.gather(*(policy.check_rate_limit(u) for u in users))
    assert all(r.allowed and r.remaining == FREE_LIMIT - 1 for r in results)
    assert sum(spy.sizes) == 64
    assert len(spy.sizes) <= _pipeline.LANES + 2, spy.sizes


async def test_starts_and_debits_mix_in_one_batch(policy):
    """Starts, releases and debits sent together each get their own
    answer."""
    starts = [policy.check_can_start_service("u", f"s{n}") for n in range(3)]
    debits = [policy.check_rate_limit("u") for _ in range(5)]
    results = await asyncio.gather(*starts, *debits)
    # Calls made at once have no order among them: any two of the three
    # starts may be the ones granted (FREE: two services at once).
    granted = [f"s{n}" for n, r in enumerate(results[:3]) if r.allowed]
    assert len(granted) == 2
    assert [r.allowed for r in results[3:]] == [True] * 5
    assert await policy.get_user_service_count("u") == 2
    assert await asyncio.gather(
        *(policy.unregister_service("u", s) for s in granted)
    ) == [True, True]
    assert await policy.get_user_service_count("u") == 0


async def test_an_error_reply_fails_only_its_own_call(policy, redis_client):
    """A user whose profile key holds the wrong type gets BackendError; the
    calls batched with it are answered normally."""
    await redis_client.set(policy.keys.user("bad").profile, "not a hash")
    outcomes = await asyncio.gather(
        *(policy.check_rate_limit(u) for u in ("a", "bad", "b", "c")),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], BackendError)
    assert [o.remaining for i, o in enumerate(outcomes) if i != 1] == [19] * 3


async def test_a_flushed_script_cache_mid_batch_counts_each_call_once(
    policy, redis_client
):
    """After SCRIPT FLUSH, each call of a concurrent burst is answered once:
    the calls refused with NOSCRIPT run again as EVAL, the rest not."""
    await policy.check_rate_limit("warm")
    await redis_client.script_flush()
    results = await asyncio.gather(
        *(policy.check_rate_limit("u") for _ in range(12))
    )
    assert sorted(r.remaining for r in results) == list(range(8, 20))
    assert (await policy.get_user_state("u")).tokens == 8


async def test_noscript_in_a_batch_resends_only_the_refused_calls(
    policy, redis_client
):
    """In one batch where one script is cached and the other is not, only
    the refused calls run again (as EVAL); each call is applied once."""
    await redis_client.script_flush()
    await redis_client.script_load(script("inspect_user.lua").source)
    rules = policy.rules
    calls = [
        _core.rate_limit_call(rules, "u", 1),
        _core.inspect_call(rules, "u"),
        _core.rate_limit_call(rules, "u", 2),
        _core.inspect_call(rules, "v"),
    ]
    spy_sizes: list[tuple[bool, int]] = []
    original = AutoPipeline._pipeline

    async def counted(pipe, lane, calls, indexes, replies, *, cached):
        spy_sizes.append((cached, len(indexes)))
        await original(pipe, lane, calls, indexes, replies, cached=cached)

    AutoPipeline._pipeline = counted  # type: ignore[method-assign]
    try:
        replies = await policy._guard.run_many(calls)
    finally:
        AutoPipeline._pipeline = original  # type: ignore[method-assign]
    assert spy_sizes == [(True, 4), (False, 2)]
    assert [_core.parse_rate_limit("u", replies[i]).remaining for i in (0, 2)] == [
        19, 17
    ]
    assert (await policy.get_user_state("u")).tokens == 17


@pytest.mark.parametrize("backend", ["real"], indirect=True)
async def test_one_command_per_allowed_decision(policy, redis_client):
    """In the steady state an allowed decision is one EVALSHA sent by the
    client: no script loading, no EVAL, nothing else."""
    users = [f"u{n}" for n in range(200)]
    await asyncio.gather(*(policy.check_rate_limit(u) for u in users))
    await redis_client.config_resetstat()
    for _ in range(3):
        results = await asyncio.gather(
            *(policy.check_rate_limit(u) for u in users)
        )
        assert all(r.allowed for r in results)
    for user in users[:50]:
        assert (await policy.check_rate_limit(user)).allowed
    calls = await commandstats(redis_client)
    sent_by_scripts = {"time", "hgetall", "get", "set"}
    client_sent = {
        name: n
        for name, n in calls.items()
        if name not in sent_by_scripts and name != "config|resetstat"
    }
    assert client_sent == {"evalsha": 3 * 200 + 50}


async def test_a_cancelled_caller_leaves_the_pipeline_working(policy):
    """Cancelling callers that wait for a batch neither stalls the others
    nor later calls."""
    tasks = [
        asyncio.ensure_future(policy.check_rate_limit(f"u{n}"))
        for n in range(40)
    ]
    await asyncio.sleep(0)
    for task in tasks[10:20]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    kept = [d for i, d in enumerate(done) if not 10 <= i < 20]
    assert all(r.allowed for r in kept)
    assert (await policy.check_rate_limit("after")).remaining == 19


def test_a_policy_moves_between_event_loops(redis_server):
    """A policy used from one event loop and then another opens new
    connections for the second and decides on the same state."""
    from pactown_redis import SecurityPolicy

    policy = SecurityPolicy(
        redis_server.url,
        namespace="loops",
        cpu_threshold=None,
        memory_threshold=None,
        timeout=10.0,
    )

    async def debit() -> int:
        results = await asyncio.gather(
            *(policy.check_rate_limit("u") for _ in range(3))
        )
        return min(r.remaining for r in results)

    try:
        assert asyncio.run(debit()) == 17
        assert asyncio.run(debit()) == 14
    finally:
        async def clean() -> None:
            await policy._client.delete(*policy.keys.user("u").all())
            await policy.close()

        asyncio.run(clean())


# -- check_many -----------------------------------------------------------------


async def test_check_many_decides_in_order(policy):
    """Ids and (id, cost) pairs are debited in order, a user repeated as
    often as listed, each denial recorded."""
    await policy.set_user_profile(UserProfile.from_tier("pro", UserTier.PRO))
    results = await policy.check_many(
        ["a", ("a", 18), ("a", 2), "pro", ("b", 0.5)]
    )
    assert [r.allowed for r in results] == [True, True, False, True, True]
    assert [r.remaining for r in results[:2]] == [19, 1]
    assert results[2].retry_after == pytest.approx(3.0)
    assert results[3].limit == TIER_LIMITS[UserTier.PRO]["max_requests_per_minute"]
    assert results[4].remaining == 19
    await policy.anomalies.flush()
    (denied,) = await policy.anomalies.by_type(AnomalyType.RATE_LIMIT_EXCEEDED)
    assert denied.user_id == "a"


async def test_check_many_is_one_batch(policy, monkeypatch):
    """A few hundred debits leave as one batch when nothing else is in
    flight."""
    spy = BatchSpy(monkeypatch)
    results = await policy.check_many([f"u{n}" for n in range(300)])
    assert len(results) == 300 and all(r.allowed for r in results)
    assert spy.sizes == [300]


async def test_check_many_beyond_one_batch_keeps_order(policy, monkeypatch):
    """More debits than two batches carry are split between the lanes, no
    batch over MAX_BATCH, and answered in order."""
    count = 2 * _pipeline.MAX_BATCH + 40
    await policy.set_user_profile(
        UserProfile.from_tier("big", UserTier.ADMIN).model_copy(
            update={"max_requests_per_minute": 4_000}
        )
    )
    # A bucket lives in Redis for as long as it takes to refill, measured
    # by Redis's own clock, not the test's. Emptied by half first, it
    # lives half a minute: ample, however slow the machine.
    assert (await policy.check_rate_limit("big", cost=2_000)).remaining == 2_000
    spy = BatchSpy(monkeypatch)
    results = await policy.check_many(["big"] * count)
    assert [r.remaining for r in results] == [
        2_000 - n for n in range(1, count + 1)
    ]
    assert sorted(spy.sizes) == [40, _pipeline.MAX_BATCH, _pipeline.MAX_BATCH]


async def test_check_many_in_parts_fails_only_the_parts_out_of_time(
    make_policy, monkeypatch
):
    """Beyond one batch, a part that misses the deadline is decided by the
    fail mode, the parts before it stand, and the rest are not sent."""
    policy = make_policy(timeout=0.3, rate_limit_fail_mode="closed")
    await policy.set_user_profile(
        UserProfile.from_tier("big", UserTier.ADMIN).model_copy(
            update={"max_requests_per_minute": 4_000}
        )
    )
    assert (await policy.check_rate_limit("big", cost=2_000)).remaining == 2_000
    batches = 0
    original = AutoPipeline._pipeline

    async def second_part_hangs(pipe, lane, calls, indexes, replies, **kw):
        nonlocal batches
        batches += 1
        if batches == 2:
            await asyncio.Event().wait()  # until the deadline cancels it
        await original(pipe, lane, calls, indexes, replies, **kw)

    monkeypatch.setattr(AutoPipeline, "_pipeline", second_part_hangs)
    results = await policy.check_many(["big"] * (2 * _pipeline.MAX_BATCH + 40))
    first, rest = results[: _pipeline.MAX_BATCH], results[_pipeline.MAX_BATCH :]
    assert [r.remaining for r in first] == [
        2_000 - n for n in range(1, _pipeline.MAX_BATCH + 1)
    ]
    assert not any(r.degraded for r in first)
    assert all(r.degraded and not r.allowed for r in rest)
    assert batches == 2
    monkeypatch.undo()
    state = await policy.get_user_state("big")
    assert state.tokens == 2_000 - _pipeline.MAX_BATCH


@pytest.mark.parametrize(
    ("groups", "other_free", "taken"),
    [
        ([1] * 40, 1, 20),  # halved with the other free lane
        ([1] * 41, 1, 21),
        ([1] * 40, 0, 40),  # no other lane free: all of them
        ([1] * 15, 1, 8),  # halves of at least MIN_SHARE
        ([1] * 14, 1, 14),  # smaller halves: not split
        ([1] * 3, 1, 3),
        ([1] * (2 * _pipeline.MAX_BATCH + 2), 1, _pipeline.MAX_BATCH),
        ([16, 16, 16], 1, 32),  # one call_many's calls stay together
        ([1, 30, 1], 1, 31),
        ([500, 30], 0, 500),  # the cut moves back within MAX_BATCH
    ],
)
def test_waiting_calls_are_split_between_free_lanes(groups, other_free, taken):
    """A lane takes its share of the waiting calls, so that calls made
    together leave as batches Redis and the client work on in turn; the
    calls of one call_many are never parted."""
    pipe = AutoPipeline(object(), lambda *_: False)
    pipe._waiting = [
        (None, None, 0.0, i == size - 1)  # type: ignore[misc]
        for size in groups
        for i in range(size)
    ]
    pipe._free = list(range(other_free))
    assert len(pipe._share()) == taken
    assert len(pipe._waiting) == sum(groups) - taken


@pytest.mark.parametrize(
    "requests",
    [
        "a",
        [("a", 1, 2)],
        [("a", 0)],
        [("a", -1)],
        [("a", float("nan"))],
        [""],
        [b"a"],
        [None],
        ["ok", ("a", "1")],
        ["u"] * 10_001,
    ],
)
async def test_check_many_refuses_bad_input_and_debits_nothing(
    policy, requests
):
    """A malformed batch raises InvalidInputError before any debit."""
    with pytest.raises(InvalidInputError):
        await policy.check_many(requests)
    assert (await policy.get_user_state("ok")).tokens == FREE_LIMIT


async def test_check_many_of_nothing_is_nothing(policy):
    """An empty batch returns an empty list."""
    assert await policy.check_many([]) == []


def test_sync_check_many_decides_in_order(make_sync_policy):
    """The blocking twin debits a batch in one pipeline, in order."""
    policy = make_sync_policy()
    results = policy.check_many([("a", 19), "a", "a", "b"])
    assert [r.allowed for r in results] == [True, True, False, True]
    assert [r.remaining for r in results] == [1, 0, 0, 19]
    with pytest.raises(InvalidInputError):
        policy.check_many([("a", 0)])


def test_sync_check_many_reloads_a_flushed_script(make_sync_policy, sync_admin):
    """After SCRIPT FLUSH the blocking batch runs each debit once."""
    policy = make_sync_policy()
    policy.check_rate_limit("warm")
    sync_admin.script_flush()
    results = policy.check_many(["u"] * 5)
    assert [r.remaining for r in results] == [19, 18, 17, 16, 15]
