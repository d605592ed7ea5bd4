"""A replica in its own OS process, for tests of shared limits.

Usage: python process_worker.py REDIS_URL USER TAG REQUESTS STARTS

Sends REQUESTS rate-limit checks and STARTS service starts for USER, all at
once from concurrent tasks, then prints one JSON line with what was allowed.
Leases are released only by expiry, so the parent sees them all.
"""

from __future__ import annotations

import asyncio
import json
import sys

from pactown_redis import SecurityPolicy


async def run(url: str, user: str, tag: str, requests: int, starts: int) -> None:
    # A generous deadline: the test counts shared decisions, and a busy
    # machine must not turn some into local ones.
    async with SecurityPolicy.from_url(
        url, cpu_threshold=None, memory_threshold=None, timeout=10.0
    ) as policy:
        rates = await asyncio.gather(
            *(policy.check_rate_limit(user) for _ in range(requests))
        )
        results = await asyncio.gather(
            *(
                policy.check_can_start_service(user, f"{tag}-{i}")
                for i in range(starts)
            )
        )
        print(
            json.dumps(
                {
                    "requests": sum(r.allowed for r in rates),
                    "starts": [
                        r.fence for r in results if r.allowed
                    ],
                }
            )
        )


if __name__ == "__main__":
    url, user, tag, requests, starts = sys.argv[1:6]
    asyncio.run(run(url, user, tag, int(requests), int(starts)))
