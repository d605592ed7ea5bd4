"""The security policy, shown step by step.

Runs on the Redis at ``REDIS_URL`` when it is set, and otherwise on an
in-process Redis (fakeredis with Lua), so it works on a machine with
nothing else installed. Its first line says which.

On a real Redis it works in a namespace of its own and deletes that
namespace's keys when it ends.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import sys
from typing import Any, Optional

from pactown_redis import (
    PactownRedisError,
    SecurityPolicy,
    UserProfile,
    UserTier,
)
from pactown_redis.policy import connect

OK, NO = "\u2713", "\u2717"


def tenths_up(seconds: float) -> float:
    """Round a wait up to tenths: telling a user to wait less than needed
    would only earn another refusal."""
    return math.ceil(seconds * 10 - 1e-9) / 10


async def open_redis() -> tuple[Any, str]:
    """Return a client and a line saying which Redis it talks to."""
    url = os.environ.get("REDIS_URL")
    if url:
        client = connect(url)
        host = client.connection_pool.connection_kwargs.get("host", "?")
        port = client.connection_pool.connection_kwargs.get("port", "?")
        return client, f"Using the Redis server at {host}:{port} (REDIS_URL)."
    try:
        import fakeredis
    except ImportError:  # pragma: no cover - depends on the installation
        sys.exit(
            "Set REDIS_URL, or install fakeredis[lua] for an in-process Redis."
        )
    client = fakeredis.FakeAsyncRedis(protocol=3)
    return client, (
        "Using an in-process Redis (fakeredis with Lua); "
        "set REDIS_URL to use a real server."
    )


async def demo(policy: SecurityPolicy) -> None:
    """Print the demo's steps, deciding each through ``policy``."""
    print("=== Security Policy Demo ===")
    print()
    print("Creating user profiles...")
    for user_id, tier in (("free_user", UserTier.FREE), ("pro_user", UserTier.PRO)):
        profile = UserProfile.from_tier(user_id, tier)
        await policy.set_user_profile(profile)
        print(
            f"  {OK} {user_id} ({tier.name} tier): "
            f"max {profile.max_concurrent_services} concurrent services"
        )

    print()
    print("Testing rate limiting...")
    for number in range(1, 22):
        result = await policy.check_rate_limit("free_user")
        if number not in (1, 21):
            if number == 2:
                print("  ...")
            continue
        if result.allowed:
            print(f"  Request {number}: {OK} allowed")
        else:
            print(
                f"  Request {number}: {NO} rate limited "
                f"(wait {tenths_up(result.retry_after):.1f}s)"
            )

    print()
    print("Testing concurrent limits...")
    profile = await policy.get_user_profile("free_user")
    for number in range(1, 4):
        result = await policy.check_can_start_service(
            "free_user", f"service-{number}"
        )
        outcome = f"{OK} allowed"
        if not result.allowed:
            running = await policy.get_user_service_count("free_user")
            limit = profile.max_concurrent_services
            outcome = f"{NO} limit reached ({running}/{limit})"
        print(f"  free_user starting service {number}: {outcome}")

    print()
    print("Anomaly log:")
    for event in await policy.anomalies.recent():
        print(
            f"  [{event.anomaly_type.name}] {event.user_id} - {event.details}"
        )


async def run() -> None:
    client, where = await open_redis()
    print(where)
    namespace = "pactown-demo-" + secrets.token_hex(4)
    # The demo must show the same lines on any machine, however busy, so
    # this replica's own CPU and memory checks are off.
    policy = SecurityPolicy(
        client,
        namespace=namespace,
        cpu_threshold=None,
        memory_threshold=None,
    )
    try:
        async with policy:
            await demo(policy)
            for user_id in ("free_user", "pro_user"):
                await policy.unregister_service(user_id, "service-1")
                await policy.unregister_service(user_id, "service-2")
        await _delete_namespace(client, namespace)
    finally:
        await client.aclose()


async def _delete_namespace(client: Any, namespace: str) -> None:
    async for key in client.scan_iter(match=namespace + ":*", count=500):
        await client.delete(key)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the demo; returns the process exit code."""
    del argv
    try:
        asyncio.run(run())
    except PactownRedisError as exc:
        print(f"demo stopped: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
