"""Many processes, many tasks, one user: the shared limits hold.

Each test starts worker processes (this file run as a script), each with
many asyncio tasks hammering one user on the session's real redis-server
with the server's own clock. Workers wait at a barrier in Redis so they
all start together, and report what they were allowed as JSON.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aredis

from pactown_redis import TIER_LIMITS, SecurityPolicy, UserProfile, UserTier

pytestmark = pytest.mark.slow

PROCESSES = 3
TASKS = 8
USER = "tenant:contended"
WORKER_TIMEOUT_S = 30.0

# Start-rate settings that never refuse a start, so the limit under test is
# the only one that can, and a deadline no busy machine reaches, so every
# decision is the shared one (never a degraded local one).
WORKER_OPTIONS: dict[str, Any] = dict(
    start_burst=1_000_000,
    default_rate_limit=100_000_000,
    cpu_threshold=None,
    memory_threshold=None,
    timeout=WORKER_TIMEOUT_S,
)


# -- the worker ----------------------------------------------------------------


async def _rate_task(policy: SecurityPolicy, cost: float, until: float) -> dict:
    allowed = denied = 0.0
    while time.monotonic() < until:
        result = await policy.check_rate_limit(USER, cost)
        assert not result.degraded
        if result.allowed:
            allowed += cost
        else:
            denied += 1
    return {"allowed_cost": allowed, "denied": denied}


async def _slot_task(
    policy: SecurityPolicy, client: aredis.Redis, name: str, until: float
) -> dict:
    """Start, hold briefly, stop; log the start's fence and the server
    time read just before stopping."""
    events: list[list[Any]] = []
    denied: dict[str, int] = {}
    count = 0
    while time.monotonic() < until:
        service = f"{name}-{count}"
        count += 1
        result = await policy.check_can_start_service(USER, service)
        assert not result.degraded
        if not result.allowed:
            key = (result.reason or "").split(" (")[0]
            denied[key] = denied.get(key, 0) + 1
            continue
        events.append(["acquire", result.fence, service])
        await asyncio.sleep(random.uniform(0, 0.01))
        seconds, micros = await client.time()
        events.append(["release", int(seconds) * 1_000_000 + int(micros), service])
        await policy.unregister_service(USER, service)
    return {"events": events, "denied": denied}


async def _start_task(policy: SecurityPolicy, name: str, until: float) -> dict:
    """Start (and at once stop) services until the hourly limit refuses."""
    allowed = 0
    denied: dict[str, int] = {}
    count = 0
    while time.monotonic() < until and sum(denied.values()) < 5:
        service = f"{name}-{count}"
        count += 1
        result = await policy.check_can_start_service(USER, service)
        assert not result.degraded
        if result.allowed:
            allowed += 1
            await policy.unregister_service(USER, service)
        else:
            key = (result.reason or "").split(" (")[0]
            denied[key] = denied.get(key, 0) + 1
    return {"allowed": allowed, "denied": denied}


async def worker(config: dict) -> dict:
    """Wait at the barrier, run ``config['tasks']`` tasks of one kind for
    ``config['seconds']``, and return their merged results."""
    client = aredis.from_url(config["url"], protocol=3)
    policy = SecurityPolicy(
        client, namespace=config["namespace"], **WORKER_OPTIONS
    )
    try:
        await client.incr(config["ready_key"])
        if await client.blpop([config["go_key"]], timeout=WORKER_TIMEOUT_S) is None:
            raise TimeoutError("the barrier never opened")
        until = time.monotonic() + config["seconds"]
        name = f"w{config['index']}"
        kind = config["kind"]
        if kind == "rate":
            jobs = [
                _rate_task(policy, 1.0 if i % 2 else 2.5, until)
                for i in range(config["tasks"])
            ]
        elif kind == "slots":
            jobs = [
                _slot_task(policy, client, f"{name}-t{i}", until)
                for i in range(config["tasks"])
            ]
        else:
            jobs = [
                _start_task(policy, f"{name}-t{i}", until)
                for i in range(config["tasks"])
            ]
        return {"tasks": await asyncio.gather(*jobs)}
    finally:
        await policy.close()
        await client.aclose()


# -- the harness -----------------------------------------------------------------


async def _server_us(client: aredis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def run_workers(
    client: aredis.Redis, url: str, namespace: str, kind: str, seconds: float
) -> tuple[list[dict], int, int]:
    """Run ``PROCESSES`` workers together.

    Returns their results and the server's time (us) read before the
    barrier opened and after every worker exited.
    """
    ready_key = f"{namespace}:test:ready"
    go_key = f"{namespace}:test:go"
    procs = []
    for index in range(PROCESSES):
        config = dict(
            url=url, namespace=namespace, kind=kind, seconds=seconds,
            tasks=TASKS, index=index, ready_key=ready_key, go_key=go_key,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), json.dumps(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while int(await client.get(ready_key) or 0) < PROCESSES:
            dead = [p.returncode for p in procs if p.poll() is not None]
            assert not dead, f"a worker exited before the barrier: {dead}"
            assert time.monotonic() < deadline, "workers never got ready"
            await asyncio.sleep(0.02)
        started = await _server_us(client)
        await client.rpush(go_key, *["go"] * PROCESSES)
        results = []
        for proc in procs:
            out, err = await asyncio.to_thread(
                proc.communicate, timeout=WORKER_TIMEOUT_S
            )
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        ended = await _server_us(client)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results, started, ended


@pytest.fixture
async def real(redis_server):
    """A client of the session's redis-server and a fresh namespace."""
    client = aredis.from_url(redis_server.url, protocol=3)
    try:
        yield client, redis_server.url, f"cont{uuid.uuid4().hex[:8]}"
    finally:
        await client.aclose()


def _merge_denials(tasks: list[dict]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for task in tasks:
        for reason, count in task["denied"].items():
            merged[reason] = merged.get(reason, 0) + count
    return merged


async def test_requests_never_exceed_capacity_plus_refill(real):
    """Across processes, allowed cost <= capacity + refill while running."""
    client, url, namespace = real
    rpm = 600
    admin = SecurityPolicy(client, namespace=namespace, **WORKER_OPTIONS)
    profile = UserProfile.from_tier(USER, UserTier.PRO)
    await admin.set_user_profile(
        profile.model_copy(update={"max_requests_per_minute": rpm})
    )

    results, started, ended = await run_workers(
        client, url, namespace, "rate", seconds=1.5
    )

    tasks = [task for result in results for task in result["tasks"]]
    allowed = sum(task["allowed_cost"] for task in tasks)
    refill = (ended - started) * rpm / 60e6
    assert allowed <= rpm + refill
    # The bucket was really drained: all but less than one largest cost.
    assert allowed > rpm - 2.5
    assert sum(task["denied"] for task in tasks) > 0
    await admin.close()


def replay(events: list[list[Any]]) -> tuple[int, int]:
    """Return the most services running at once, and how many ran, from an
    acquire/release ledger timed by the server (ties: releases first)."""
    acquired = {e[2]: e[1] for e in events if e[0] == "acquire"}
    timeline = []
    for kind, stamp, service in events:
        if kind == "release":
            # A fence may lead the server clock by a few us (it is one more
            # than the last when starts share a microsecond); any later
            # start's fence is larger still.
            stamp = max(stamp, acquired[service] + 1)
        timeline.append((stamp, 0 if kind == "release" else 1))
    running = peak = 0
    for _, is_acquire in sorted(timeline):
        running += 1 if is_acquire else -1
        assert running >= 0
        peak = max(peak, running)
    return peak, len(acquired)


@pytest.mark.parametrize(
    ("events", "peak"),
    [
        ([["acquire", 1, "a"], ["release", 5, "a"],
          ["acquire", 5, "b"], ["release", 9, "b"]], 1),
        ([["acquire", 1, "a"], ["acquire", 2, "b"],
          ["release", 3, "a"], ["release", 4, "b"]], 2),
        ([["acquire", 7, "a"], ["release", 6, "a"]], 1),
    ],
)
def test_replay_counts_overlaps(events, peak):
    """The ledger replay counts overlapping services, releases first."""
    assert replay(events)[0] == peak


async def test_running_services_never_exceed_the_limit(real):
    """Replaying every worker's ledger never shows more than the limit."""
    client, url, namespace = real
    limit = 3
    admin = SecurityPolicy(client, namespace=namespace, **WORKER_OPTIONS)
    profile = UserProfile.from_tier(USER, UserTier.ENTERPRISE)
    await admin.set_user_profile(
        profile.model_copy(
            update={
                "max_concurrent_services": limit,
                "max_services_per_hour": 1_000_000,
            }
        )
    )

    results, _, _ = await run_workers(
        client, url, namespace, "slots", seconds=1.5
    )

    tasks = [task for result in results for task in result["tasks"]]
    events = [event for task in tasks for event in task["events"]]
    fences = [e[1] for e in events if e[0] == "acquire"]
    assert len(set(fences)) == len(fences)
    peak, started = replay(events)
    assert peak == limit
    assert started > limit
    denied = _merge_denials(tasks)
    assert set(denied) == {"Max concurrent services reached"}
    assert await admin.get_user_service_count(USER) == 0
    await admin.close()


async def test_starts_per_hour_are_exact(real):
    """Exactly max_services_per_hour starts pass across all processes."""
    client, url, namespace = real
    per_hour = 25
    admin = SecurityPolicy(client, namespace=namespace, **WORKER_OPTIONS)
    profile = UserProfile.from_tier(USER, UserTier.ENTERPRISE)
    await admin.set_user_profile(
        profile.model_copy(update={"max_services_per_hour": per_hour})
    )

    results, _, _ = await run_workers(
        client, url, namespace, "starts", seconds=5.0
    )

    tasks = [task for result in results for task in result["tasks"]]
    assert sum(task["allowed"] for task in tasks) == per_hour
    assert set(_merge_denials(tasks)) == {"Hourly service limit reached"}
    assert await admin.get_services_started_last_hour(USER) == per_hour
    await admin.close()


EXAMPLE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "examples",
    "multi_tenant.py",
)


@pytest.mark.parametrize("own_server", [False, True], ids=["REDIS_URL", "own"])
def test_simulation_reports_every_limit_held(redis_server, own_server):
    """The multi-tenant simulation says which Redis it used and that every
    tenant's limits held on every row."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    if not own_server:
        env["REDIS_URL"] = redis_server.url
    done = subprocess.run(
        [sys.executable, EXAMPLE, "--seconds", "1", "--replicas", "2",
         "--tenants", "4"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    expected = "a redis-server started" if own_server else "the server at REDIS_URL"
    assert expected in lines[0]
    rows = [line for line in lines if line.startswith("tenant-")]
    assert len(rows) == 4
    assert all(row.endswith("| yes") for row in rows), done.stdout
    assert lines[-1] == "every limit held"


def _load_example():
    spec = importlib.util.spec_from_file_location("multi_tenant", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("change", "held"),
    [
        ({}, True),
        ({"allowed": 31}, False),
        ({"starts_allowed": 6}, False),
        ({"ledger": [["start", 1, "a"], ["start", 2, "b"], ["start", 3, "c"],
                     ["stop", 9, "a"], ["stop", 9, "b"], ["stop", 9, "c"]]},
         False),
        ({"degraded": 1}, False),
    ],
)
def test_simulation_flags_a_broken_limit(change, held):
    """A row over any limit (or decided without Redis) says NO."""
    example = _load_example()
    row = example.Row("t", UserTier.FREE, TIER_LIMITS[UserTier.FREE])
    row.add({"asked": 40, "allowed": 20, "starts_asked": 9,
             "starts_allowed": 5, "degraded": 0, "ledger": [], **change})
    # 30 s of server time refills 10 of the free tier's 20 requests/minute.
    assert row.checks(30_000_000)[2] is held


def test_simulation_without_redis_says_so():
    """With no REDIS_URL and no redis-server, it says how to get one."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PATH"] = ""
    done = subprocess.run(
        [sys.executable, EXAMPLE, "--seconds", "1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("Redis: none.")
    assert "redis-server" in done.stderr


if __name__ == "__main__":
    print(json.dumps(asyncio.run(worker(json.loads(sys.argv[1])))))
