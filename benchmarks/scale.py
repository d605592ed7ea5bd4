"""Measure what pactown-redis costs Redis as tenants and services grow.

Run from the repository root::

    python benchmarks/scale.py
    REDIS_URL=redis://127.0.0.1:6379/0 python benchmarks/scale.py

Without ``REDIS_URL`` it starts a private ``redis-server`` (through
``tests/servers.py``) and stops it at the end; with it, it uses that server
and deletes the keys of its own namespace (``pactown-bench``) at the end.
It prints four markdown tables:

1. Redis memory per active tenant after a typical workload: a BASIC
   profile, three requests and two running services.
2. Latency of ``check_rate_limit`` and ``check_can_start_service`` with
   1 000 and with 100 000 such tenants in Redis.
3. The cost of a denied request, whose anomaly goes to the stream.
4. The cost of a start as one ADMIN tenant's running services grow to its
   limit of 100, and of renewing all 100 in one call.

Tenants are written with pipelined script calls, the same scripts and
arguments a policy sends; latency is measured one call at a time through
the public API, from call to result, so it includes the client and the
loopback network. "server" columns come from Redis's own command
statistics (microseconds per ``EVALSHA`` inside Redis). Leases last an
hour here so that the services stay running throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pactown_redis import SecurityPolicy, UserProfile, UserTier  # noqa: E402
from pactown_redis import _core, _outcomes  # noqa: E402
from pactown_redis.scripts import ScriptCall, script  # noqa: E402

NAMESPACE = "pactown-bench"

#: The typical tenant: its tier, requests made and services running.
TYPICAL_TIER = UserTier.BASIC
TYPICAL_REQUESTS = 3
TYPICAL_SERVICES = 2
CALLS_PER_TENANT = 1 + TYPICAL_SERVICES + TYPICAL_REQUESTS
SERVICE_MEMORY_MB = 128
SERVICE_CPU_PERCENT = 10

#: Script calls per pipeline round trip while populating.
BATCH = 2000

#: ADMIN tenants that each grow to 100 running services.
GROWTH_TENANTS = 50
GROWTH_STEPS = (1, 10, 25, 50, 75, 100)

KEY_NAMES = (
    "profile",
    "requests",
    "starts_rate",
    "leases",
    "lease_meta",
    "starts",
    "fence",
)


def tenant(n: int) -> str:
    return f"tenant-{n}"


def make_policy(client: Any, **options: Any) -> SecurityPolicy:
    """A policy as an application would build it, with an hour-long lease,
    no load checks, and a deadline that never turns a slow call into a
    fail-mode decision (which would not measure Redis)."""
    options.setdefault("lease_ttl", 3600.0)
    return SecurityPolicy(
        client,
        namespace=NAMESPACE,
        cpu_threshold=None,
        memory_threshold=None,
        timeout=5.0,
        **options,
    )


def typical_calls(policy: SecurityPolicy, user: str) -> Iterator[ScriptCall]:
    """The script calls of one typical tenant, as the policy sends them."""
    profile = UserProfile.from_tier(user, TYPICAL_TIER)
    yield _outcomes.profile_call(policy.keys, profile)
    for i in range(TYPICAL_SERVICES):
        yield _core.start_call(
            policy.rules,
            user,
            f"svc-{i}",
            port=None,
            memory_mb=SERVICE_MEMORY_MB,
            cpu_percent=SERVICE_CPU_PERCENT,
            overloaded=False,
        )
    for _ in range(TYPICAL_REQUESTS):
        yield _core.rate_limit_call(policy.rules, user, 1)


async def load_scripts(client: Any) -> None:
    for name in ("write_profile.lua", "rate_limit.lua", "start_service.lua"):
        await client.script_load(script(name).source)


async def populate(
    client: Any, policy: SecurityPolicy, first: int, last: int
) -> float:
    """Write tenants ``first`` to ``last - 1``; return the seconds taken.

    Two pipelines are in flight at once, so that the client builds one
    while Redis runs the other.

    Raises:
        RuntimeError: a script refused a tenant's start or request.
    """
    began = time.perf_counter()
    per_batch = max(1, BATCH // CALLS_PER_TENANT)
    batches = iter(range(first, last, per_batch))

    async def worker() -> None:
        for start in batches:
            pipe = client.pipeline(transaction=False)
            for n in range(start, min(start + per_batch, last)):
                for call in typical_calls(policy, tenant(n)):
                    pipe.evalsha(*call.evalsha_args())
            for reply in await pipe.execute():
                if isinstance(reply, list) and _core.text(reply[0]) != "ok":
                    raise RuntimeError(f"population refused: {reply!r}")

    await asyncio.gather(worker(), worker())
    return time.perf_counter() - began


async def reset_stats(client: Any) -> None:
    await client.config_resetstat()


async def server_usec_per_call(client: Any) -> float:
    stats = await client.info("commandstats")
    entry = stats.get("cmdstat_evalsha", {})
    return float(entry.get("usec_per_call", 0.0))


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def timed(calls: Sequence[Callable[[], Any]]) -> tuple[list[float], int]:
    """Await each call in turn; return the latencies in ms and how many
    results were made without Redis (``degraded``)."""
    latencies = []
    degraded = 0
    for call in calls:
        began = time.perf_counter()
        result = await call()
        latencies.append((time.perf_counter() - began) * 1000)
        degraded += bool(getattr(result, "degraded", False))
    return latencies, degraded


# -- 1. memory ---------------------------------------------------------------


async def tenant_memory(
    client: Any, policy: SecurityPolicy, users: Sequence[str]
) -> dict[str, list[int]]:
    """``MEMORY USAGE`` of each key of each user, by key name; a key that
    does not exist (it expired or was never written) is left out."""
    pipe = client.pipeline(transaction=False)
    for user in users:
        keys = policy.keys.user(user)
        for name in KEY_NAMES:
            pipe.memory_usage(getattr(keys, name), samples=0)
    replies = iter(await pipe.execute())
    sizes: dict[str, list[int]] = {name: [] for name in KEY_NAMES}
    for _ in users:
        for name in KEY_NAMES:
            size = next(replies)
            if size is not None:
                sizes[name].append(int(size))
    return sizes


def memory_table(sizes: dict[str, list[int]], tenants: int) -> list[str]:
    rows = [
        "| key | tenants holding it | bytes, mean where held |",
        "|---|---:|---:|",
    ]
    total = 0.0
    for name in KEY_NAMES:
        held = sizes[name]
        if not held:
            rows.append(f"| `{name}` | 0 % | - |")
            continue
        mean = statistics.fmean(held)
        total += sum(held) / tenants
        share = 100 * len(held) / tenants
        rows.append(f"| `{name}` | {share:.0f} % | {mean:.0f} |")
    rows.append(f"| **all keys of a tenant** | | **{total:.0f}** |")
    return rows


async def print_at_rest(
    client: Any, policy: SecurityPolicy, tenants: int
) -> None:
    """Print what up to 1 000 random tenants hold once the population is
    done: by then most request buckets have run out their TTL, while
    profiles, leases, start history and fences remain."""
    picks = random.Random(0).sample(range(tenants), min(tenants, 1000))
    users = [tenant(n) for n in picks]
    sizes = await tenant_memory(client, policy, users)
    keys = sum(len(held) for held in sizes.values()) / len(users)
    size = sum(sum(held) for held in sizes.values()) / len(users)
    print(
        f"After {tenants:,} tenants: a random {len(users):,} of them hold "
        f"{keys:.1f} keys and {size:.0f} bytes each (MEMORY USAGE)."
    )


# -- 2. latency ----------------------------------------------------------------


async def measure_latency(
    client: Any, policy: SecurityPolicy, tenants: int, samples: int, run: int
) -> dict[str, Any]:
    users = [tenant(n) for n in range(tenants)]
    rng = random.Random(tenants)

    picks = [rng.choice(users) for _ in range(samples)]
    await reset_stats(client)
    rate, rate_degraded = await timed(
        [partial(policy.check_rate_limit, u) for u in picks]
    )
    rate_server = await server_usec_per_call(client)

    # One new service for each of ``samples`` tenants: a grant, the
    # common case, on a tenant already running two services.
    starters = rng.sample(users, min(samples, tenants))
    await reset_stats(client)
    start, start_degraded = await timed(
        [
            partial(
                policy.check_can_start_service,
                u, f"probe-{run}", memory_mb=SERVICE_MEMORY_MB,
                cpu_percent=SERVICE_CPU_PERCENT,
            )
            for u in starters
        ]
    )
    start_server = await server_usec_per_call(client)
    memory = (await client.info("memory"))["used_memory"]
    return {
        "tenants": tenants,
        "memory": memory,
        "rate": rate,
        "rate_server": rate_server,
        "start": start,
        "start_server": start_server,
        "degraded": rate_degraded + start_degraded,
    }


def latency_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    rows = [
        "| active tenants | Redis used_memory | check_rate_limit p50 / p99 "
        "| server | check_can_start_service p50 / p99 | server |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        rows.append(
            f"| {run['tenants']:,} | {run['memory'] / 2**20:.1f} MiB "
            f"| {percentile(run['rate'], 0.5):.3f} / "
            f"{percentile(run['rate'], 0.99):.3f} ms "
            f"| {run['rate_server']:.1f} µs "
            f"| {percentile(run['start'], 0.5):.3f} / "
            f"{percentile(run['start'], 0.99):.3f} ms "
            f"| {run['start_server']:.1f} µs |"
        )
    return rows


async def measure_denials(
    client: Any, policy: SecurityPolicy, samples: int
) -> list[str]:
    """Time requests of a tenant whose bucket is empty: each is denied and
    appends one anomaly to the stream, in the background."""
    user = "tenant-0"
    while (await policy.check_rate_limit(user, cost=60)).allowed:
        pass
    await policy.anomalies.flush()
    await reset_stats(client)
    latencies, _ = await timed(
        [partial(policy.check_rate_limit, user, 60) for _ in range(samples)]
    )
    await policy.anomalies.flush()
    stats = await client.info("commandstats")
    script_us = float(stats["cmdstat_evalsha"]["usec_per_call"])
    xadd_us = float(stats["cmdstat_xadd"]["usec_per_call"])
    return [
        "| denied check_rate_limit p50 / p99 | server, script | "
        "server, XADD to the stream |",
        "|---:|---:|---:|",
        f"| {percentile(latencies, 0.5):.3f} / "
        f"{percentile(latencies, 0.99):.3f} ms | {script_us:.1f} µs "
        f"| {xadd_us:.1f} µs |",
    ]


# -- 3. growth -------------------------------------------------------------------


async def measure_growth(client: Any) -> tuple[list[str], int]:
    """Start services 1..100 for each of ``GROWTH_TENANTS`` ADMIN tenants;
    return the table and the number of degraded results."""
    # A burst as large as the limit, and no rapid-restart events: this
    # measures the start script alone, not the anomaly stream.
    policy = make_policy(
        client, start_burst=1000, rapid_restart_threshold=1_000_000
    )
    users = [f"admin-{n}" for n in range(GROWTH_TENANTS)]
    for user in users:
        await policy.set_user_profile(UserProfile.from_tier(user, UserTier.ADMIN))

    per_step: dict[int, tuple[list[float], float]] = {}
    degraded = 0
    for k in range(1, 101):
        await reset_stats(client)
        latencies, bad = await timed(
            [
                partial(
                    policy.check_can_start_service,
                    u, f"svc-{k}", memory_mb=64, cpu_percent=1,
                )
                for u in users
            ]
        )
        degraded += bad
        per_step[k] = (latencies, await server_usec_per_call(client))
    running = await policy.get_user_service_count(users[0])
    if running != 100:
        raise RuntimeError(f"expected 100 running services, found {running}")

    await reset_stats(client)
    began = time.perf_counter()
    await policy.renew_leases()
    renew_ms = (time.perf_counter() - began) * 1000 / len(users)
    renew_server = await server_usec_per_call(client)
    sizes = await tenant_memory(client, policy, users)
    per_tenant = sum(sum(v) for v in sizes.values()) / len(users)
    await policy.close()

    rows = [
        "| running services before the start | p50 | p99 | server |",
        "|---:|---:|---:|---:|",
    ]
    for k in GROWTH_STEPS:
        latencies, server = per_step[k]
        rows.append(
            f"| {k - 1} | {percentile(latencies, 0.5):.3f} ms "
            f"| {percentile(latencies, 0.99):.3f} ms | {server:.1f} µs |"
        )
    rows.append(
        f"| renewing all 100 leases (one call) | {renew_ms:.3f} ms (mean) "
        f"| | {renew_server:.1f} µs |"
    )
    rows.append("")
    rows.append(
        f"Memory of an ADMIN tenant with 100 running services: "
        f"{per_tenant / 1024:.1f} KiB."
    )
    return rows, degraded


# -- driver ----------------------------------------------------------------------


async def delete_namespace(client: Any) -> None:
    """Delete every key of the benchmark's namespace."""
    batch = []
    async for key in client.scan_iter(match=NAMESPACE + ":*", count=5000):
        batch.append(key)
        if len(batch) == 5000:
            await client.unlink(*batch)
            batch = []
    if batch:
        await client.unlink(*batch)


async def main(args: argparse.Namespace) -> None:
    async with AsyncExitStack() as stack:
        url = os.environ.get("REDIS_URL")
        if url is None:
            from servers import RedisServer

            server = RedisServer().start()
            stack.callback(server.close)
        client = aredis.from_url(url or server.url, protocol=3)
        stack.push_async_callback(client.aclose)
        if url is not None:
            # Someone else's server: leave it as it was found.
            stack.push_async_callback(delete_namespace, client)
            await delete_namespace(client)
        await load_scripts(client)
        info = await client.info("server")

        print(
            f"# pactown-redis scale benchmark\n\n"
            f"Redis {info['redis_version']} on {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}; "
            f"client and server share the machine; load average at the "
            f"start {os.getloadavg()[0]:.2f}.\n"
        )

        policy = make_policy(client)
        stack.push_async_callback(policy.close)
        sizes_of = list(args.tenants)
        populated = 0
        runs = []
        degraded = 0
        for run, tenants in enumerate(sizes_of):
            before = (await client.info("memory"))["used_memory"]
            seconds = await populate(client, policy, populated, tenants)
            if run == 0:
                # Read at once: the request buckets are deleted by their TTL
                # a few seconds after the last request.
                users = [tenant(n) for n in range(min(tenants, 1000))]
                sizes = await tenant_memory(client, policy, users)
                after = (await client.info("memory"))["used_memory"]
                print(
                    f"## Memory per active tenant\n\n"
                    f"A {TYPICAL_TIER.value.upper()} profile, "
                    f"{TYPICAL_REQUESTS} requests and {TYPICAL_SERVICES} "
                    f"running services, read right after the workload "
                    f"(MEMORY USAGE over {len(users)} tenants):\n"
                )
                print("\n".join(memory_table(sizes, len(users))))
                print(
                    f"\nused_memory grew by "
                    f"{(after - before) / (tenants - populated):.0f} bytes "
                    f"per tenant (key names, dictionary entries and TTLs "
                    f"included).\n"
                )
            rate = CALLS_PER_TENANT * (tenants - populated) / seconds
            print(
                f"Populated {tenants - populated:,} tenants in "
                f"{seconds:.1f} s ({rate:,.0f} script calls/s, pipelined)."
            )
            if run == len(sizes_of) - 1 and run > 0:
                await print_at_rest(client, policy, tenants)
            populated = tenants
            result = await measure_latency(
                client, policy, tenants, args.samples, run
            )
            degraded += result["degraded"]
            runs.append(result)

        print("\n## Decision latency\n")
        print(
            f"{args.samples} calls each, one at a time; p50 / p99 from call "
            f"to result; server = µs per EVALSHA inside Redis.\n"
        )
        print("\n".join(latency_table(runs)))

        print("\n## A denial, and its anomaly\n")
        print(
            f"{args.samples} requests of one tenant with an empty bucket, "
            f"one at a time; every one is denied and appended to the "
            f"anomaly stream in the background.\n"
        )
        print("\n".join(await measure_denials(client, policy, args.samples)))

        print("\n## A start as running services grow (ADMIN tier)\n")
        rows, bad = await measure_growth(client)
        degraded += bad
        print(
            f"{GROWTH_TENANTS} tenants each start service 1, 2, ... 100, "
            f"each with 64 MB and 1 % CPU (so the quota check sums every "
            f"running service).\n"
        )
        print("\n".join(rows))
        print(f"\nLoad average at the end: {os.getloadavg()[0]:.2f}.")
        if degraded:
            print(f"\nWARNING: {degraded} results were made without Redis.")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tenants",
        type=int,
        nargs="+",
        default=[1000, 100_000],
        help="active tenant counts to measure at, ascending",
    )
    parser.add_argument(
        "--samples", type=int, default=2000, help="calls per latency figure"
    )
    args = parser.parse_args(argv)
    if args.tenants != sorted(args.tenants) or args.tenants[0] < 1:
        parser.error("--tenants must be positive and ascending")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
