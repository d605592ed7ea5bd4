"""A multi-tenant SaaS in miniature: replicas in their own processes share
one Redis while tenants of mixed tiers send requests and start and stop
services through whichever replica they reach.

    python examples/multi_tenant.py [--seconds 3] [--replicas 4] [--tenants 12]

Runs on the Redis at ``REDIS_URL`` when it is set, and otherwise on a
``redis-server`` it starts for the run (bound to 127.0.0.1, nothing saved);
its first line says which. It works in a namespace of its own and deletes
that namespace's keys at the end.

It ends with one row per tenant: its tier and limits, what it asked for and
what all replicas together allowed, and whether each limit held:

* requests: allowed <= capacity + what refilled during the run, with the
  run's length read from the Redis server's clock;
* running services: the most running at once, replayed from a ledger each
  replica keeps (start at the lease's fence, stop at the server time read
  just before releasing), <= the concurrent limit;
* starts: allowed <= the hourly limit.

The exit code is 0 when every limit held, 1 when one did not, 2 when the
run could not take place.
"""

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import redis.asyncio as aredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from pactown_redis import TIER_LIMITS, SecurityPolicy, UserProfile, UserTier

TIERS = (UserTier.FREE, UserTier.BASIC, UserTier.PRO, UserTier.ENTERPRISE)
STARTUP_TIMEOUT_S = 30.0

# Replicas decide with the server only: a deadline no busy laptop reaches
# (a late answer would otherwise be decided locally by the fail mode), and
# no overload check (the simulation itself loads the machine).
REPLICA_OPTIONS: dict[str, Any] = dict(
    cpu_threshold=None, memory_threshold=None, timeout=STARTUP_TIMEOUT_S
)


def tenant_names(count: int) -> list[str]:
    return [f"tenant-{i:02d}" for i in range(1, count + 1)]


def tier_of(index: int) -> UserTier:
    """Tenants cycle through the paid and free tiers."""
    return TIERS[index % len(TIERS)]


# -- one replica --------------------------------------------------------------


@dataclass
class TenantLog:
    """What one replica saw of one tenant."""

    asked: int = 0
    allowed: int = 0
    starts_asked: int = 0
    starts_allowed: int = 0
    degraded: int = 0
    # ["start", fence, service] and ["stop", server time in us, service]
    ledger: list[list[Any]] = field(default_factory=list)


async def _server_us(client: Any) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)


async def tenant_traffic(
    policy: SecurityPolicy,
    client: Any,
    tenant: str,
    replica: int,
    until: float,
    rng: random.Random,
) -> TenantLog:
    """One tenant's traffic through one replica until ``until``
    (monotonic): mostly requests, some starts, and stops of services this
    replica started."""
    log = TenantLog()
    running: list[str] = []

    async def stop(service: str) -> None:
        log.ledger.append(["stop", await _server_us(client), service])
        await policy.unregister_service(tenant, service)

    while time.monotonic() < until:
        roll = rng.random()
        if roll < 0.75:
            result = await policy.check_rate_limit(tenant)
            log.asked += 1
            log.allowed += result.allowed
            log.degraded += result.degraded
        elif roll < 0.9 or not running:
            service = f"{tenant}.r{replica}.{log.starts_asked}"
            started = await policy.check_can_start_service(tenant, service)
            log.starts_asked += 1
            log.degraded += started.degraded
            if started.allowed:
                log.starts_allowed += 1
                log.ledger.append(["start", started.fence, service])
                running.append(service)
        else:
            await stop(running.pop(rng.randrange(len(running))))
        await asyncio.sleep(rng.uniform(0, 0.005))
    for service in running:
        await stop(service)
    return log


async def replica_main(config: dict[str, Any]) -> dict[str, Any]:
    """Wait for the start signal, run every tenant's traffic through this
    replica for ``config['seconds']``, and return the logs by tenant."""
    client = aredis.from_url(config["url"], protocol=3)
    policy = SecurityPolicy(
        client, namespace=config["namespace"], **REPLICA_OPTIONS
    )
    rng = random.Random(config["seed"])
    try:
        await client.incr(config["ready_key"])
        opened = await client.blpop([config["go_key"]], timeout=STARTUP_TIMEOUT_S)
        if opened is None:
            raise TimeoutError("the start signal never came")
        until = time.monotonic() + config["seconds"]
        tenants = config["tenants"]
        logs = await asyncio.gather(
            *(
                tenant_traffic(
                    policy, client, tenant, config["replica"], until,
                    random.Random(rng.random()),
                )
                for tenant in tenants
            )
        )
        return {t: log.__dict__ for t, log in zip(tenants, logs)}
    finally:
        await policy.close()
        await client.aclose()


# -- the Redis server -------------------------------------------------------------


class LocalRedis:
    """A throwaway ``redis-server`` on 127.0.0.1 that saves nothing."""

    def __init__(self, program: str) -> None:
        self.dir = tempfile.mkdtemp(prefix="pactown-sim-")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [program, "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        client = aredis.from_url(self.url)
        try:
            while True:
                try:
                    await client.ping()
                    return
                except (OSError, RedisConnectionError):
                    if self.proc.poll() is not None or (
                        time.monotonic() > deadline
                    ):
                        raise RuntimeError(
                            f"redis-server did not start on port {self.port}"
                        ) from None
                    await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the whole run ------------------------------------------------------------------


def peak_running(ledger: list[list[Any]]) -> int:
    """Return the most services running at once in a ledger; at equal
    times a stop comes before a start."""
    started = {service: stamp for kind, stamp, service in ledger if kind == "start"}
    timeline = []
    for kind, stamp, service in ledger:
        if kind == "stop":
            # A fence may lead the server clock by a microsecond or two
            # when starts share one; every later start's fence is larger.
            timeline.append((max(stamp, started[service] + 1), -1))
        else:
            timeline.append((stamp, 1))
    running = peak = 0
    for _, step in sorted(timeline):
        running += step
        peak = max(peak, running)
    return peak


@dataclass
class Row:
    """One tenant's totals across every replica."""

    tenant: str
    tier: UserTier
    limits: dict[str, int]
    asked: int = 0
    allowed: int = 0
    starts_asked: int = 0
    starts_allowed: int = 0
    degraded: int = 0
    ledger: list[list[Any]] = field(default_factory=list)

    def add(self, log: dict[str, Any]) -> None:
        for name in ("asked", "allowed", "starts_asked", "starts_allowed",
                     "degraded"):
            setattr(self, name, getattr(self, name) + log[name])
        self.ledger += log["ledger"]

    def checks(self, run_us: int) -> tuple[float, int, bool]:
        """Return the request bound, the peak of running services, and
        whether every limit held."""
        rpm = self.limits["max_requests_per_minute"]
        bound = rpm + run_us * rpm / 60e6
        peak = peak_running(self.ledger)
        held = (
            self.allowed <= bound
            and peak <= self.limits["max_concurrent_services"]
            and self.starts_allowed <= self.limits["max_services_per_hour"]
            and self.degraded == 0
        )
        return bound, peak, held


def print_table(rows: list[Row], run_us: int) -> bool:
    """Print one row per tenant; return whether every limit held."""
    print(
        f"{'tenant':<10} {'tier':<10} {'rpm':>5} {'conc':>4} {'/hour':>5}"
        f" | {'requests':>8} {'allowed':>7} {'bound':>7}"
        f" | {'starts':>6} {'allowed':>7} {'peak':>4} | held"
    )
    all_held = True
    for row in rows:
        bound, peak, held = row.checks(run_us)
        all_held &= held
        limits = row.limits
        print(
            f"{row.tenant:<10} {row.tier.value:<10}"
            f" {limits['max_requests_per_minute']:>5}"
            f" {limits['max_concurrent_services']:>4}"
            f" {limits['max_services_per_hour']:>5}"
            f" | {row.asked:>8} {row.allowed:>7} {bound:>7.1f}"
            f" | {row.starts_asked:>6} {row.starts_allowed:>7} {peak:>4}"
            f" | {'yes' if held else 'NO'}"
        )
    return all_held


async def simulate(url: str, args: argparse.Namespace) -> bool:
    """Run the replicas against ``url`` and print the table; return whether
    every limit held."""
    namespace = f"sim-{secrets.token_hex(4)}"
    client = aredis.from_url(url, protocol=3)
    admin = SecurityPolicy(client, namespace=namespace, **REPLICA_OPTIONS)
    tenants = tenant_names(args.tenants)
    rows = []
    for index, tenant in enumerate(tenants):
        tier = tier_of(index)
        await admin.set_user_profile(UserProfile.from_tier(tenant, tier))
        rows.append(Row(tenant, tier, TIER_LIMITS[tier]))

    ready_key, go_key = f"{namespace}:sim:ready", f"{namespace}:sim:go"
    procs = []
    try:
        for replica in range(args.replicas):
            config = dict(
                url=url, namespace=namespace, tenants=tenants,
                seconds=args.seconds, replica=replica, seed=args.seed + replica,
                ready_key=ready_key, go_key=go_key,
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__),
                     "--replica", json.dumps(config)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while int(await client.get(ready_key) or 0) < args.replicas:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a replica exited before the start")
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not get ready")
            await asyncio.sleep(0.02)
        print(
            f"{args.replicas} replicas, {args.tenants} tenants, "
            f"{args.seconds:g} s, namespace {namespace}"
        )
        began = await _server_us(client)
        await client.rpush(go_key, *["go"] * args.replicas)
        outputs = [
            await asyncio.to_thread(p.communicate, timeout=args.seconds + 60)
            for p in procs
        ]
        ended = await _server_us(client)
        for proc, (out, _) in zip(procs, outputs):
            if proc.returncode != 0:
                raise RuntimeError(f"a replica failed (exit {proc.returncode})")
            logs = json.loads(out)
            for row in rows:
                row.add(logs[row.tenant])
        return print_table(rows, ended - began)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        await admin.close()
        async for key in client.scan_iter(match=f"{namespace}:*"):
            await client.delete(key)
        await client.aclose()


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="multi_tenant.py",
        description="Replicas in processes share one Redis; check that "
        "every tenant's limits held.",
    )
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--replica", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replica is None and not (
        0 < args.seconds <= 3600 and 1 <= args.replicas <= 64
        and 1 <= args.tenants <= 1000
    ):
        parser.error(
            "need 0 < --seconds <= 3600, 1 <= --replicas <= 64 and "
            "1 <= --tenants <= 1000"
        )
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the simulation; returns the process exit code."""
    args = parse(argv)
    if args.replica is not None:
        print(json.dumps(asyncio.run(replica_main(json.loads(args.replica)))))
        return 0

    url = os.environ.get("REDIS_URL")
    server = None
    if url:
        print("Redis: the server at REDIS_URL")
    else:
        program = shutil.which("redis-server")
        if program is None:
            print(
                "Redis: none. Set REDIS_URL to a running server, or install "
                "redis-server (e.g. apt-get install redis-server) so that the "
                "simulation can start its own.",
                file=sys.stderr,
            )
            return 2
        server = LocalRedis(program)
        url = server.url
        print(f"Redis: a redis-server started for this run on {url}")
    try:
        if server is not None:
            asyncio.run(server.wait_ready())
        held = asyncio.run(simulate(url, args))
    except (RuntimeError, OSError, RedisError) as exc:
        print(f"simulation stopped: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
    print("every limit held" if held else "A LIMIT DID NOT HOLD")
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
