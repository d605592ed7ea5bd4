"""Bounded memory: after a long random workload nothing grows without end.

Every key but a profile and the anomaly stream carries a TTL no longer than
its state needs, the stream stays within its cap, and a user idle for
longer than every window leaves nothing behind but the profile.

The real server's TTLs run on wall time and cannot be fast-forwarded, so
there each TTL is checked against the bound its stored state implies. On
fakeredis the server's wall clock is moved forward past every bound, and
the keys are then counted.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import fakeredis
import fakeredis._socket._base as fake_socket

from pactown_redis import LeaseLostError, UserProfile, UserTier
from pactown_redis.keys import decode_user

SEED = 7
USERS = [f"user-{i}" for i in range(40)]
SERVICES = [f"svc-{i}" for i in range(4)]
OPERATIONS = 2000
STREAM_CAP = 20
LEASE_S = 30
GRACE_S = 3600  # the fencing counter's grace, Rules.fence_grace_ms
STRIKE_WINDOW_S = 600
BLOCK_S = 600
START_BURST = 10
STARTS_PER_MINUTE = 60
HOUR_S = 3600
#: Every kind of key that carries a TTL, by the suffix keys.py gives it.
TIMED_KINDS = (
    "rl", "sr", "svc", "svcmeta", "fence", "starts", "strikes",
    "autoblock",
)
#: Redis's default stream-node-max-entries.
DEFAULT_STREAM_NODE = 100
#: Every TTL bound below is at most this, in seconds.
LONGEST_S = LEASE_S + GRACE_S


def workload_policy(make_policy, **options):
    return make_policy(
        **options,
        lease_ttl=LEASE_S,
        stream_maxlen=STREAM_CAP,
        start_burst=START_BURST,
        default_rate_limit=STARTS_PER_MINUTE,
        auto_block_threshold=2,
        auto_block_window=STRIKE_WINDOW_S,
        auto_block_duration=BLOCK_S,
        timeout=5.0,
    )


def random_profiles(rng: random.Random) -> dict[str, UserProfile]:
    """Profiles for half the users; the rest use the default tier."""
    profiles = {}
    for user in USERS[::2]:
        base = UserProfile.from_tier(user, rng.choice(list(UserTier)))
        ports = rng.choice([None, [8000], [8000, 8001]])
        profiles[user] = UserProfile.parse(
            {**base.model_dump(), "allowed_ports": ports}
        )
    return profiles


async def run_workload(policy, clock, rng: random.Random) -> None:
    """Thousands of calls over many users while the clock moves on."""
    for _ in range(OPERATIONS):
        user = rng.choice(USERS)
        service = rng.choice(SERVICES)
        roll = rng.random()
        if roll < 0.35:
            await policy.check_rate_limit(user, rng.choice([0.5, 1, 3, 25]))
        elif roll < 0.65:
            port = rng.choice([None, 8000, 22])
            await policy.check_can_start_service(
                user, service, port=port, memory_mb=rng.choice([0, 64, 128])
            )
        elif roll < 0.75:
            await policy.unregister_service(user, service)
        elif roll < 0.80:
            try:
                await policy.register_service(user, service)
            except LeaseLostError:
                pass
        elif roll < 0.86:
            await policy.renew_leases()
        elif roll < 0.88:
            await policy.block_user(user, "workload")
        elif roll < 0.92:
            await policy.unblock_user(user)
        else:
            await policy.get_user_state(user)
        clock.advance(rng.uniform(0, 3))
    await policy.anomalies.flush()


def profile_of(profiles: dict[str, UserProfile], user: str) -> UserProfile:
    """The profile the user's decisions were made with."""
    return profiles.get(user) or UserProfile.from_tier(user, UserTier.FREE)


def ttl_bound_ms(suffix: str, content: Any, policy) -> float:
    """The longest TTL the stored ``content`` of a key may carry, in ms."""
    if suffix in ("rl", "sr"):
        # A bucket is the nanosecond it is full again, never further off
        # than a whole refill (the test clock only moves forward), and
        # its TTL is at most that refill.
        refill_ms = 60_000 if suffix == "rl" else (
            START_BURST * 60_000 / STARTS_PER_MINUTE
        )
        assert content.isdigit(), content
        owed_ms = (int(content) - policy.rules.clock() * 1e9) / 1e6
        assert owed_ms <= refill_ms, (content, owed_ms)
        return math.ceil(refill_ms) + 1
    if suffix in ("svc", "svcmeta"):
        return LEASE_S * 1000
    if suffix == "fence":
        return (LEASE_S + GRACE_S) * 1000
    if suffix == "starts":
        return HOUR_S * 1000
    if suffix == "strikes":
        assert len(content) < policy.auto_block.threshold
        return STRIKE_WINDOW_S * 1000
    if suffix == "autoblock":
        assert float(content) > 0
        return BLOCK_S * 1000
    raise AssertionError(f"unexpected key kind {suffix!r}")


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read(client, key: bytes) -> tuple[Any, int]:
    """(content, PTTL) of a key; content is None when the key expired
    while being read (nothing writes during the checks)."""
    kind = (await client.type(key)).decode()
    pttl = await client.pttl(key)
    if kind == "zset":
        content: Any = await client.zrange(key, 0, -1, withscores=True)
    elif kind == "hash":
        content = await client.hgetall(key)
    else:
        content = await client.get(key)
    return (content or None), pttl


async def check_every_key(client, policy, profiles) -> Counter[str]:
    """Check each key's TTL against its state; return how many keys of each
    kind other than profiles and the stream exist."""
    prefix = f"{policy.namespace}:".encode()
    stream = policy.keys.anomalies.encode()
    timed: Counter[str] = Counter()
    async for key in client.scan_iter(count=1000):
        assert key.startswith(prefix), key
        if key == stream:
            assert await client.pttl(key) == -1
            continue
        content, pttl = await read(client, key)
        if content is None:
            continue
        tag, suffix = key[len(prefix):].decode().split("}:", 1)
        user = decode_user(tag.lstrip("{"))
        if suffix == "profile":
            assert pttl == -1, key
            continue
        profile = profile_of(profiles, user)
        bound = ttl_bound_ms(suffix, content, policy)
        # PTTL reads 0 in the last millisecond before a key expires.
        assert 0 <= pttl <= bound, (key, pttl, bound, content)
        if suffix == "starts":
            assert len(content) <= profile.max_services_per_hour
        if suffix == "svc":
            meta = await client.hgetall(key[: -len("svc")] + b"svcmeta")
            assert set(meta) == {member for member, _ in content}
        timed[suffix] += 1
    return timed


async def check_stream_cap(client, policy, backend: str) -> None:
    """XLEN stays within the cap plus one stream node of slack, which
    ``MAXLEN ~`` may leave before trimming a whole node (fakeredis, which
    has no CONFIG GET, is held to Redis's default node size)."""
    slack = DEFAULT_STREAM_NODE
    if backend == "real":
        config = await client.config_get("stream-node-max-entries")
        slack = int({_str(k): v for k, v in config.items()}[
            "stream-node-max-entries"
        ])
    length = await client.xlen(policy.keys.anomalies)
    assert 0 < length <= STREAM_CAP + slack
    events = await policy.anomalies.recent(STREAM_CAP + slack + 1)
    assert len(events) == length


async def test_long_workload_keeps_every_key_bounded(
    make_policy, redis_client, clock, backend, monkeypatch
):
    """After thousands of random calls every key's TTL fits its state, the
    stream keeps its cap, and idle users leave only their profiles."""
    rng = random.Random(SEED)
    events: list = []
    policy = workload_policy(make_policy, on_anomaly=events.append)
    profiles = random_profiles(rng)
    for profile in profiles.values():
        await policy.set_user_profile(profile)
    await run_workload(policy, clock, rng)

    kinds = await check_every_key(redis_client, policy, profiles)
    assert set(kinds) == set(TIMED_KINDS), kinds
    await check_stream_cap(redis_client, policy, backend)
    recorded = {event.anomaly_type.value for event in events}
    assert {"user_auto_blocked", "rate_limit_exceeded"} <= recorded

    # Idle past every window: by the policy's clock, nothing is left...
    clock.advance(LONGEST_S + 1)
    for user in USERS:
        state = await policy.get_user_state(user)
        assert state.running == 0 and state.started_last_hour == 0
        profile = profile_of(profiles, user)
        assert state.tokens == profile.max_requests_per_minute
        assert state.start_tokens == START_BURST
    for outcome in await policy.renew_leases():
        assert outcome.status == "lost"
    assert not policy.held_leases()

    # ...and by the server's clock every timed key goes within its bound.
    if backend == "real":
        # Wall-clock TTLs cannot be moved on: each is held to its bound
        # again, after the renewal above dropped the lost leases.
        kinds = await check_every_key(redis_client, policy, profiles)
        assert "svc" not in kinds or kinds["svc"] < len(USERS)
        return
    shift_fake_server_clock(monkeypatch, LONGEST_S + 1)
    left = {key async for key in redis_client.scan_iter(count=1000)}
    left.remove(policy.keys.anomalies.encode())
    # Profiles set before the workload, and those blocking wrote, persist.
    assert {policy.keys.user(u).profile.encode() for u in profiles} <= left
    assert all(key.endswith(b":profile") for key in left), left


def shift_fake_server_clock(monkeypatch, seconds: float) -> None:
    """Move fakeredis's wall clock, which decides key expiry, forward."""
    real = fake_socket.time

    class Later:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def time(self) -> float:
            return real.time() + seconds

    monkeypatch.setattr(fake_socket, "time", Later())


async def test_fake_clock_shift_expires_keys(monkeypatch):
    """The fakeredis clock shift used above really expires keys (so the
    check that relies on it cannot pass by accident)."""
    client = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    await client.set("k", "v", px=5_000)
    await client.set("kept", "v")
    shift_fake_server_clock(monkeypatch, 6)
    assert await client.exists("k", "kept") == 1
    await client.aclose()
