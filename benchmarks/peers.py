"""The contenders of ``benchmarks/compare.py``: pactown-redis's decisions,
four peer rate limiters configured as per-user token buckets, and the
client's floor (a bare ``EVALSHA`` of a script that does nothing).

Each contender opens its own clients on one Redis URL and makes decisions
through its library's public async API, exactly as an application would.
All of them speak RESP3 through redis-py with hiredis, so the figures
compare the libraries, not the clients.

A contender's ``step(n)`` makes the decisions of one call, for the tenants
``n``, ``n + 1``, ... (modulo the tenant count), and returns how many were
allowed; ``per_call`` says how many decisions one call makes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import redis.asyncio as aredis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pactown_redis import SecurityPolicy, UserProfile, UserTier  # noqa: E402

__all__ = [
    "CONTENDERS",
    "Contender",
    "MissingFeature",
    "POOL_SIZE",
    "Setup",
    "make",
]

#: Keys of every contender's state start with one of these, so that the
#: memory phase can tell them apart from anything else in the server.
PREFIX = "bench"

#: The tier of pactown tenants without a stored profile: FREE, 20 requests
#: per minute, the limit of the memory phase.
DEFAULT_TIER = UserTier.FREE

#: Profile limits that keep every throughput decision allowed: the largest
#: numbers ``UserProfile`` accepts for the counts a start checks.
_OPEN_PROFILE = dict(
    max_concurrent_services=1_000_000,
    max_services_per_hour=1_000_000,
    max_memory_mb=1 << 30,
    max_cpu_percent=1_000_000,
)


class MissingFeature(RuntimeError):
    """The library under test lacks the call a contender needs."""


@dataclass(frozen=True)
class Setup:
    """What every contender is configured with.

    Attributes:
        url: the Redis server, ``redis://host:port/0``.
        rpm: the per-tenant limit, requests per minute; the bucket holds
            as many (a full bucket at rest).
        tenants: how many tenants decisions are spread over.
        batch: decisions per ``check_many`` call.
        store_profiles: write a profile for each tenant (pactown only);
            without one, tenants get the default tier's limits.
        repeat: consecutive decisions of one tenant: decision ``n`` is
            tenant ``n // repeat`` (modulo the tenant count).
        pactown_timeout: the policy's deadline in seconds, ``None`` for
            its default. Throughput runs use a long one, so that no
            decision under heavy load is made by a fail mode instead of
            Redis; the memory phase keeps the default, as a user would.
    """

    url: str
    rpm: int
    tenants: int
    batch: int = 16
    store_profiles: bool = True
    repeat: int = 1
    pactown_timeout: Optional[float] = 5.0


def tenant(n: int) -> str:
    return f"tenant-{n}"


#: Connections a peer's client may open. redis-py's asyncio pool refuses
#: the 101st connection by default (``MaxConnectionsError``), and a peer
#: sends each decision on a connection of its own, so 256 concurrent
#: decisions need a larger pool; pactown-redis pipelines concurrent calls
#: on one connection and needs none.
POOL_SIZE = 512


def client(url: str) -> aredis.Redis:
    """A redis-py asyncio client as pactown-redis makes one: RESP3, and
    hiredis as the parser whenever it is installed (redis-py's default),
    with a pool of ``POOL_SIZE``."""
    return aredis.from_url(url, protocol=3, max_connections=POOL_SIZE)


class Contender:
    """One library's way of making a decision; see the module docstring."""

    #: Short name, as ``--only`` takes it.
    key = ""
    #: Name in tables and charts.
    title = ""
    #: 'pactown', 'peer' or 'floor'.
    kind = "peer"
    #: Decisions made by one ``step``.
    per_call = 1
    #: What a decision is here, and why it is configured so.
    config = ""
    #: Decisions counted as allowed by ``step`` that were in fact made to
    #: wait (a limiter that schedules instead of refusing); cumulative.
    late = 0

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        self.names = [
            tenant(n // setup.repeat)
            for n in range(setup.tenants * setup.repeat)
        ]
        self.tenants = [tenant(n) for n in range(setup.tenants)]

    def name(self, n: int) -> str:
        return self.names[n % len(self.names)]

    async def open(self) -> None:
        """Connect and configure; raises :class:`MissingFeature` when the
        library cannot make this contender's decision."""

    async def step(self, n: int) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        """Close every client this contender opened."""


# -- pactown-redis ------------------------------------------------------------


class _Pactown(Contender):
    kind = "pactown"

    async def open(self) -> None:
        # Overload checks measure this machine, not Redis, and would refuse
        # starts while the benchmark itself loads the CPU.
        options: dict[str, Any] = dict(
            namespace=f"{PREFIX}-pactown",
            default_tier=DEFAULT_TIER,
            cpu_threshold=None,
            memory_threshold=None,
            start_burst=1_000_000,
            default_rate_limit=100_000_000,
            rapid_restart_threshold=1_000_000,
        )
        if self.setup.pactown_timeout is not None:
            options["timeout"] = self.setup.pactown_timeout
        self.policy = SecurityPolicy(self.setup.url, **options)
        self.degraded = 0
        if self.setup.store_profiles:
            for name in self.tenants:
                profile = UserProfile.parse(
                    dict(
                        user_id=name,
                        tier=UserTier.ADMIN,
                        max_requests_per_minute=self.setup.rpm,
                        **_OPEN_PROFILE,
                    )
                )
                await self.policy.set_user_profile(profile)

    async def close(self) -> None:
        await self.policy.close()


class PactownRate(_Pactown):
    key = "pactown"
    title = "pactown check_rate_limit"
    config = (
        "SecurityPolicy.check_rate_limit(user, 1): the user's token bucket "
        "(capacity R, refilled at R per minute), one EVALSHA"
    )

    async def step(self, n: int) -> int:
        result = await self.policy.check_rate_limit(self.name(n), 1)
        self.degraded += result.degraded
        return int(result.allowed)


class PactownStart(_Pactown):
    key = "pactown-start"
    title = "pactown start + unregister"
    config = (
        "check_can_start_service(user, svc) then unregister_service(user, "
        "svc): every start check, a lease reserved and freed; one decision "
        "is the pair"
    )

    async def step(self, n: int) -> int:
        user = self.name(n)
        service = f"svc-{n}"
        check = await self.policy.check_can_start_service(user, service)
        self.degraded += check.degraded
        if check.allowed:
            await self.policy.unregister_service(user, service)
        return int(check.allowed)


class PactownBatch(_Pactown):
    key = "pactown-batch"
    title = "pactown check_many"

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.per_call = setup.batch
        self.config = (
            f"check_many of {setup.batch} (user, 1) requests of different "
            f"users: {setup.batch} decisions in one round trip"
        )

    async def open(self) -> None:
        await super().open()
        if not hasattr(self.policy, "check_many"):
            await self.policy.close()
            raise MissingFeature(
                "SecurityPolicy.check_many does not exist in this checkout"
            )

    async def step(self, n: int) -> int:
        batch = [(self.name(n + i), 1) for i in range(self.per_call)]
        results = await self.policy.check_many(batch)
        self.degraded += sum(r.degraded for r in results)
        return sum(r.allowed for r in results)


# -- the peers ----------------------------------------------------------------


class Limits(Contender):
    key = "limits"
    title = "limits 5.8.0"
    config = (
        "limits.aio SlidingWindowCounterRateLimiter, RedisStorage("
        "implementation='redispy'), RateLimitItemPerMinute(R). limits has "
        "no token bucket; the sliding window counter is the closest: "
        "constant state per user (two counters) and a limit that recovers "
        "gradually, as a refilling bucket does, where the moving window "
        "keeps one list entry per request and the fixed window resets at "
        "once"
    )

    async def open(self) -> None:
        from limits import RateLimitItemPerMinute
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import SlidingWindowCounterRateLimiter

        self.storage = RedisStorage(
            "async+" + self.setup.url,
            implementation="redispy",
            key_prefix=f"{PREFIX}-limits",
            protocol=3,
            max_connections=POOL_SIZE,
        )
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)
        self.item = RateLimitItemPerMinute(self.setup.rpm)

    async def step(self, n: int) -> int:
        return int(await self.limiter.hit(self.item, self.name(n)))

    async def close(self) -> None:
        await self.storage.bridge.get_connection().aclose()


class Throttled(Contender):
    key = "throttled"
    title = "throttled-py 3.5.0"
    config = (
        "throttled.asyncio Throttled(using='token_bucket', quota=per_min(R) "
        "(burst R), store=RedisStore, timeout=-1: answer at once), "
        "limit(user)"
    )

    async def open(self) -> None:
        from throttled.asyncio import RateLimiterType, RedisStore, Throttled
        from throttled.asyncio import per_min

        self.store = RedisStore(
            server=self.setup.url,
            options={
                "CONNECTION_POOL_KWARGS": {
                    "protocol": 3,
                    "max_connections": POOL_SIZE,
                }
            },
        )
        self.throttle = Throttled(
            using=RateLimiterType.TOKEN_BUCKET.value,
            quota=per_min(self.setup.rpm),
            store=self.store,
            key_prefix=f"{PREFIX}-throttled",
        )

    async def step(self, n: int) -> int:
        result = await self.throttle.limit(self.name(n))
        return int(not result.limited)

    async def close(self) -> None:
        # The store hands its client a pool it made, which closing the
        # client leaves open.
        redis = self.store._backend.get_client()
        await redis.aclose()
        await redis.connection_pool.disconnect()


class Pyrate(Contender):
    key = "pyrate"
    title = "pyrate-limiter 4.6.0"
    config = (
        "Limiter over a BucketFactory giving each user a StateBucket("
        "[Rate(R, MINUTE)], TokenBucket(), RedisStateStore(async client)), "
        "try_acquire_async(user, blocking=False); the limiter holds one "
        "asyncio.Lock around every acquire, so a process makes one decision "
        "at a time"
    )

    async def open(self) -> None:
        from pyrate_limiter import (
            BucketFactory,
            Duration,
            Limiter,
            Rate,
            RateItem,
            RedisStateStore,
            StateBucket,
            TokenBucket,
            WallClock,
        )

        redis = client(self.setup.url)
        rates = [Rate(self.setup.rpm, Duration.MINUTE)]
        clock = WallClock()
        algorithm = TokenBucket()

        class PerUser(BucketFactory):
            """One bucket per user; state buckets have nothing to leak."""

            def __init__(self) -> None:
                self.buckets: dict[str, StateBucket] = {}

            def wrap_item(self, name: str, weight: int = 1) -> RateItem:
                return RateItem(name, clock.now(), weight=weight)

            def get(self, item: RateItem) -> StateBucket:
                bucket = self.buckets.get(item.name)
                if bucket is None:
                    store = RedisStateStore(
                        redis, f"{PREFIX}-pyrate:{item.name}"
                    )
                    bucket = StateBucket(rates, algorithm, store)
                    self.buckets[item.name] = bucket
                return bucket

        self.redis = redis
        self.limiter = Limiter(PerUser())

    async def step(self, n: int) -> int:
        allowed = await self.limiter.try_acquire_async(
            self.name(n), blocking=False
        )
        return int(allowed)

    async def close(self) -> None:
        await self.redis.aclose()


class RedisRateLimiters(Contender):
    key = "rrl"
    title = "redis-rate-limiters 0.5.0"
    config = (
        "AsyncTokenBucket(name=user, capacity=R, refill_amount=R, "
        "refill_frequency=60 s), one instance per user, entered with "
        "`async with`. It schedules rather than refuses: a call sleeps "
        "until its slot, and one that slept is counted as denied here. "
        "Refilled one token every 60/R s instead, its script moves the "
        "slot 20 ms ahead whenever a refill is due, so nearly every call "
        "would sleep 20 ms and the figures would measure that sleep"
    )

    async def open(self) -> None:
        from limiters import AsyncTokenBucket

        outer = self

        class Counted(AsyncTokenBucket):  # type: ignore[misc]
            """Counts the entries that had to sleep for their slot."""

            def parse_timestamp(self, timestamp: int) -> float:
                sleep = float(super().parse_timestamp(timestamp))
                outer.late += sleep > 0
                return sleep

        self.redis = client(self.setup.url)
        self.make: Callable[[str], Any] = lambda name: Counted(
            connection=self.redis,
            name=f"{PREFIX}-rrl:{name}",
            capacity=self.setup.rpm,
            refill_amount=self.setup.rpm,
            refill_frequency=60.0,
        )
        self.buckets: dict[str, Any] = {}

    async def step(self, n: int) -> int:
        name = self.name(n)
        bucket = self.buckets.get(name)
        if bucket is None:
            bucket = self.buckets[name] = self.make(name)
        async with bucket:
            pass
        return 1

    async def close(self) -> None:
        await self.redis.aclose()


# -- the floor ----------------------------------------------------------------


class Floor(Contender):
    key = "floor"
    kind = "floor"
    title = "floor: redis-py EVALSHA"
    config = (
        "await client.evalsha(sha, 0) of `return 1`: the client's cost of "
        "one script round trip, with no limiter around it"
    )

    async def open(self) -> None:
        self.redis = client(self.setup.url)
        self.sha = await self.redis.script_load("return 1")

    async def step(self, n: int) -> int:
        return int(await self.redis.evalsha(self.sha, 0))

    async def close(self) -> None:
        await self.redis.aclose()


CONTENDERS: dict[str, type[Contender]] = {
    cls.key: cls
    for cls in (
        PactownRate,
        PactownStart,
        PactownBatch,
        Limits,
        Throttled,
        Pyrate,
        RedisRateLimiters,
        Floor,
    )
}


def make(key: str, setup: Setup) -> Contender:
    """Return the contender named ``key`` (a key of :data:`CONTENDERS`).

    Raises:
        KeyError: no such contender.
    """
    return CONTENDERS[key](setup)

