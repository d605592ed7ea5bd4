"""Hostile input: ids of every shape, bad numbers and hand-corrupted profiles.

An id either works with state of its own that no other id can reach, or is
refused with ``InvalidIdError`` before anything is written. A number out of
its range is refused with ``InvalidNumberError`` before anything is written.
A stored profile that this package did not write is reported and fails
closed for its user alone, and Python and the Lua scripts agree on which
stored profiles are usable.
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from decimal import Decimal
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from pactown_redis import (
    AnomalyType,
    CorruptProfileError,
    InvalidIdError,
    InvalidInputError,
    InvalidNumberError,
    SecurityPolicy,
    UserProfile,
    UserTier,
)
from pactown_redis._validate import MAX_ID_BYTES
from pactown_redis.keys import encode_user

NS = "pactown"

# Ids that look alike, contain key syntax, or imitate another user's keys.
# Every one of them is valid; the tests give each its own state.
BYSTANDERS = (
    "a",
    "\u0430",  # Cyrillic a
    "A",
    "%41",
    "a:b",
    "a}:rl",
    "pactown:{b}:profile",
    "b",
    unicodedata.normalize("NFC", "caf\u00e9"),
    unicodedata.normalize("NFD", "caf\u00e9"),
    " ",
    "\x00",
)

# Ids of every shape, each either valid or refused as a whole.
HOSTILE_IDS: tuple[Any, ...] = (
    "",
    "x" * 10_000,
    "x" * MAX_ID_BYTES,
    "x" * (MAX_ID_BYTES + 1),
    "\u00e9" * (MAX_ID_BYTES // 2),
    "\u00e9" * (MAX_ID_BYTES // 2) + "x",
    ":",
    "{",
    "}",
    "{}",
    "*",
    "?",
    "[a-z]",
    " ",
    "a b",
    "\n",
    "\r\n",
    "\x00",
    "a\x00b",
    "%",
    "%00",
    "a}:rl",
    "{a}:rl",
    "pactown:{b}:profile",
    "pactown:anomalies",
    "a" + "\u0301",
    "\u0430",
    "\ufeff",
    "\U0001f600",
    "\ud800",
    "a\udc80b",
    b"",
    b"a",
    b"\xff\xfe",
    b"pactown:{b}:profile",
    None,
    42,
)


def short(value: Any) -> str:
    """A test id for ``value`` of readable length."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"int of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:16]}...({len(value)})"


def is_valid_id(value: Any) -> bool:
    """The documented id rule: str of 1 to 256 UTF-8 bytes."""
    if not isinstance(value, str) or not value:
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_ID_BYTES
    except UnicodeEncodeError:
        return False


def user_prefix(user_id: str) -> str:
    return f"{NS}:{{{encode_user(user_id)}}}:"


# -- reading the whole database ------------------------------------------------


async def snapshot(client) -> dict[bytes, tuple[Any, int]]:
    """Every key but the anomaly stream: (content, PTTL)."""
    state = {}
    async for key in client.scan_iter(count=1000):
        kind = (await client.type(key)).decode()
        if kind == "stream":
            continue
        if kind == "hash":
            content: Any = await client.hgetall(key)
        elif kind == "zset":
            content = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "string":
            content = await client.get(key)
        else:
            content = (kind, "unexpected type")
        state[key] = (content, await client.pttl(key))
    return state


def changed_keys(before, after) -> set[bytes]:
    """Keys created, removed, rewritten or given a later expiry."""
    changed = set(before) ^ set(after)
    for key in set(before) & set(after):
        (old, old_ttl), (new, new_ttl) = before[key], after[key]
        # A TTL only counts down unless something wrote the key again.
        if old != new or (old_ttl < 0) != (new_ttl < 0) or new_ttl > old_ttl:
            changed.add(key)
    return changed


async def events_by_user(policy) -> Counter:
    """How many anomaly events each user has in the stream."""
    return Counter(e.user_id for e in await policy.anomalies.recent(10_000))


async def stream_len(policy, client) -> int:
    await policy.anomalies.flush()
    return int(await client.xlen(policy.keys.anomalies))


# -- hostile ids ---------------------------------------------------------------


def long_lived_profile(user_id: str) -> UserProfile:
    """A profile whose buckets take a minute to refill, so that no
    bystander key expires by itself while a test compares them."""
    base = UserProfile.from_tier(user_id, UserTier.PRO)
    return UserProfile.parse(
        {**base.model_dump(), "max_requests_per_minute": 1}
    )


async def give_state(policy, user_id: str) -> None:
    """Give ``user_id`` a profile, a debited bucket and a running service."""
    await policy.set_user_profile(long_lived_profile(user_id))
    assert (await policy.check_rate_limit(user_id)).allowed
    assert (await policy.check_can_start_service(user_id, "svc-1")).allowed


async def exercise_user(policy, user_id: Any) -> None:
    """Every call of the API that takes a user id, in a sensible order."""
    await policy.check_rate_limit(user_id)
    basic = UserProfile.from_tier(user_id, UserTier.BASIC)
    await policy.set_user_profile(basic)
    assert (await policy.get_user_profile(user_id)).user_id == user_id
    assert (await policy.check_can_start_service(user_id, "svc")).allowed
    assert await policy.register_service(user_id, "svc") > 0
    assert (await policy.get_user_state(user_id)).running == 1
    await policy.block_user(user_id, "testing")
    denied = await policy.check_can_start_service(user_id, "svc-2")
    assert not denied.allowed
    await policy.unblock_user(user_id)
    assert await policy.unregister_service(user_id, "svc")
    assert await policy.delete_user_profile(user_id)


async def check_user_id(policy, client, user_id: Any) -> None:
    """Act as ``user_id`` among bystanders with state; see the module doc."""
    await client.flushall()
    others = [b for b in BYSTANDERS if b != user_id]
    for other in others:
        await give_state(policy, other)
    events_before = await events_by_user(policy)
    before = await snapshot(client)
    stream_before = await stream_len(policy, client)

    if not is_valid_id(user_id):
        for call in (
            lambda: policy.check_rate_limit(user_id),
            lambda: policy.check_can_start_service(user_id, "svc"),
            lambda: policy.register_service(user_id, "svc-1"),
            lambda: policy.unregister_service(user_id, "svc-1"),
            lambda: policy.get_user_profile(user_id),
            lambda: policy.delete_user_profile(user_id),
            lambda: policy.block_user(user_id),
            lambda: policy.unblock_user(user_id),
            lambda: policy.get_user_state(user_id),
        ):
            with pytest.raises(InvalidIdError):
                await call()
        with pytest.raises(InvalidIdError):
            UserProfile.from_tier(user_id, UserTier.PRO)
        assert not changed_keys(before, await snapshot(client))
        assert await stream_len(policy, client) == stream_before
        return

    await exercise_user(policy, user_id)
    after = await snapshot(client)
    prefix = user_prefix(user_id).encode()
    written = changed_keys(before, after)
    assert written, "acting as the user wrote nothing"
    assert all(key.startswith(prefix) for key in written), written
    assert len({key_slot(key) for key in written}) == 1
    tag = encode_user(user_id)
    assert not set(tag) & set("{}:*?[] ")
    events = await policy.anomalies.by_user(user_id)
    assert events and all(e.user_id == user_id for e in events)
    events_after = await events_by_user(policy)
    del events_after[user_id]
    assert events_after == events_before


async def exercise_service(policy, user_id: str, service_id: Any) -> None:
    """Every call of the API that takes a service id."""
    assert (await policy.check_can_start_service(user_id, service_id)).allowed
    assert await policy.register_service(user_id, service_id) > 0
    state = await policy.get_user_state(user_id)
    assert service_id in {lease.service_id for lease in state.leases}
    assert await policy.unregister_service(user_id, service_id)


SERVICE_BYSTANDERS = ("s", "\u0455", "s ", "s\x00", "S")


async def leases_of(client, policy, user_id: str) -> dict[bytes, tuple]:
    """Each lease of the user: (expiry score, metadata)."""
    keys = policy.keys.user(user_id)
    scores = dict(await client.zrange(keys.leases, 0, -1, withscores=True))
    meta = await client.hgetall(keys.lease_meta)
    return {member: (scores[member], meta.get(member)) for member in scores}


async def check_service_id(policy, client, service_id: Any) -> None:
    """Act on one service among look-alike services of the same user."""
    await client.flushall()
    user = "victim"
    await policy.set_user_profile(long_lived_profile(user))
    others = [s for s in SERVICE_BYSTANDERS if s != service_id]
    for other in others:
        assert (await policy.check_can_start_service(user, other)).allowed
    leases_before = await leases_of(client, policy, user)
    before = await snapshot(client)

    if not is_valid_id(service_id):
        for call in (
            lambda: policy.check_can_start_service(user, service_id),
            lambda: policy.register_service(user, service_id),
            lambda: policy.unregister_service(user, service_id),
        ):
            with pytest.raises(InvalidIdError):
                await call()
        assert not changed_keys(before, await snapshot(client))
        return

    await exercise_service(policy, user, service_id)
    assert await leases_of(client, policy, user) == leases_before
    prefix = user_prefix(user).encode()
    written = changed_keys(before, await snapshot(client))
    assert written and all(key.startswith(prefix) for key in written)


def hostile_policy(make_policy):
    # Leases and start tokens that outlive the test, so that only the test's
    # own calls change what the snapshots compare.
    return make_policy(lease_ttl=3600, default_rate_limit=0.01)


@pytest.mark.parametrize("user_id", HOSTILE_IDS, ids=short)
async def test_listed_user_ids(make_policy, redis_client, user_id):
    """Each listed id keeps to its own keys, or is refused before a write."""
    await check_user_id(hostile_policy(make_policy), redis_client, user_id)


@pytest.mark.parametrize("service_id", HOSTILE_IDS, ids=short)
async def test_listed_service_ids(make_policy, redis_client, service_id):
    """Each listed service id keeps to its own lease, or is refused."""
    policy = hostile_policy(make_policy)
    await check_service_id(policy, redis_client, service_id)


any_id = st.one_of(
    st.sampled_from(HOSTILE_IDS + BYSTANDERS),
    st.text(),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=8),
    st.text(alphabet=":{}*?%\\ \x00\n\u0430a", max_size=12),
    st.text(min_size=250, max_size=270),
    st.binary(max_size=12),
)

_property = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@_property
@given(user_id=any_id)
async def test_any_user_id(make_policy, redis_client, user_id):
    """Any id keeps to its own keys, or is refused before a write."""
    await check_user_id(hostile_policy(make_policy), redis_client, user_id)


@_property
@given(service_id=any_id)
async def test_any_service_id(make_policy, redis_client, service_id):
    """Any service id keeps to its own lease, or is refused before a write."""
    policy = hostile_policy(make_policy)
    await check_service_id(policy, redis_client, service_id)


def test_look_alikes_are_different_users():
    """Look-alike and differently normalized ids get different keys: ids are
    compared as bytes, never normalized."""
    prefixes = {user_prefix(b) for b in BYSTANDERS}
    assert len(prefixes) == len(BYSTANDERS)


# -- numbers -------------------------------------------------------------------

BAD_NUMBERS = [
    0,
    -1,
    -0.5,
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    10**400,
    -(10**5000),
    "1",
    None,
    True,
    False,
    Decimal("1"),
    1 + 0j,
    [1],
]


def number_calls():
    """(name, value, call) for each bad value of each numeric argument."""
    for value in BAD_NUMBERS:
        yield "cost", value, lambda p, v=value: p.check_rate_limit("u", v)
    for value in BAD_NUMBERS + [65536, 80.0, 443.5]:
        if value is None:
            continue  # no port
        yield "port", value, lambda p, v=value: p.check_can_start_service(
            "u", "s", port=v
        )
    for value in BAD_NUMBERS:
        if value == 0 and not isinstance(value, bool):
            continue  # asking for no memory or CPU is fine
        for name in ("memory_mb", "cpu_percent"):
            yield name, value, lambda p, v=value, n=name: (
                p.check_can_start_service("u", "s", **{n: v})
            )
    yield "hours", 0, lambda p: p.get_anomaly_summary(0)
    yield "hours", math.nan, lambda p: p.get_anomaly_summary(math.nan)
    yield "hours", "1", lambda p: p.get_anomaly_summary("1")


NUMBER_CASES = list(number_calls())


@pytest.mark.parametrize(
    ("name", "value", "call"),
    NUMBER_CASES,
    ids=[f"{name}={short(value)}" for name, value, _ in NUMBER_CASES],
)
async def test_bad_numbers_are_refused_before_any_write(
    policy, redis_client, name, value, call
):
    """A bad cost, port, memory, CPU or period raises InvalidNumberError
    naming the argument, and nothing is written."""
    await policy.check_rate_limit("u")
    before = await snapshot(redis_client)
    stream_before = await stream_len(policy, redis_client)
    with pytest.raises(InvalidNumberError, match=name):
        await call(policy)
    assert not changed_keys(before, await snapshot(redis_client))
    assert await stream_len(policy, redis_client) == stream_before


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("lease_ttl", 0),
        ("lease_ttl", math.nan),
        ("lease_ttl", "30"),
        ("default_rate_limit", -1),
        ("start_burst", 1.5),
        ("stream_maxlen", 0),
        ("auto_block_threshold", 0),
        ("auto_block_threshold", 2.0),
        ("auto_block_threshold", True),
        ("auto_block_window", -1),
        ("auto_block_window", math.inf),
        ("auto_block_duration", 0),
        ("auto_block_duration", None),
    ],
)
def test_bad_options_are_refused(option, value):
    """A policy option out of range raises InvalidNumberError at once."""
    with pytest.raises(InvalidNumberError, match=option):
        SecurityPolicy(fakeredis.FakeAsyncRedis(), **{option: value})


# model_construct() skips validation on purpose; pydantic warns when it
# then serializes the wrong types.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent_services", -1),
        ("max_concurrent_services", 10**7),
        ("max_memory_mb", -256),
        ("max_memory_mb", 2**63),
        ("max_cpu_percent", math.inf),
        ("max_requests_per_minute", 0),
        ("max_requests_per_minute", 10**12),
        ("max_services_per_hour", -5),
        ("max_services_per_hour", 2.5),
        ("max_services_per_hour", "5"),
        ("allowed_ports", [0]),
        ("allowed_ports", [70000]),
        ("allowed_ports", list(range(1, 2000))),
        ("tier", "platinum"),
        ("blocked", "maybe"),
        ("reason", "x" * 10_000),
    ],
)
async def test_absurd_profiles_are_refused_when_set(
    policy, redis_client, field, value
):
    """A profile with a negative or absurd limit is refused, unwritten,
    however it was built."""
    good = UserProfile.from_tier("u", UserTier.PRO).model_dump()
    with pytest.raises(InvalidInputError):
        UserProfile.parse({**good, field: value})
    smuggled = UserProfile.model_construct(**{**good, field: value})
    with pytest.raises(InvalidInputError):
        await policy.set_user_profile(smuggled)
    assert await redis_client.dbsize() == 0


# -- corrupt profiles ----------------------------------------------------------

# (field, stored value or None to delete it): each breaks the profile.
CORRUPTIONS = [
    ("conc", "x"),
    ("conc", "-1"),
    ("conc", "1.5"),
    ("conc", "2.0"),
    ("conc", "1e3"),
    ("conc", " 2"),
    ("conc", "0x10"),
    ("conc", ""),
    ("conc", None),
    ("conc", "1000001"),
    ("mem", "-256"),
    ("mem", "nan"),
    ("mem", "inf"),
    ("mem", None),
    ("mem", "1073741825"),
    ("cpu", "25.5"),
    ("cpu", None),
    ("rpm", "0"),
    ("rpm", "-20"),
    ("rpm", None),
    ("rpm", "100000001"),
    ("rpm", "9" * 400),
    ("sph", "five"),
    ("sph", None),
    ("ports", "80,443"),
    ("ports", ",80"),
    ("ports", ",80,,443,"),
    ("ports", ",0,"),
    ("ports", ",65536,"),
    ("ports", ",-1,"),
    ("ports", ",http,"),
    ("ports", ""),
    ("ports", None),
    ("ports", "**"),
    ("ports", "," + "80," * 1025),
    ("blocked", "2"),
    ("blocked", "yes"),
    ("blocked", "true"),
    ("blocked", ""),
    ("blocked", None),
    ("tier", "platinum"),
    ("tier", "FREE"),
    ("tier", ""),
    ("tier", None),
]

# (field, stored value): odd, but what a profile may hold.
ODD_BUT_VALID = [
    ("conc", "0"),
    ("conc", "0002"),
    ("conc", "1000000"),
    ("mem", "1073741824"),
    ("rpm", "1"),
    ("rpm", "100000000"),
    ("ports", ","),
    ("ports", "*"),
    ("ports", ",65535,1,"),
    ("ports", "," + "80," * 1024),
    ("reason", ""),
    ("reason", "r" * 10_000),
    ("reason", "\xff\xfe"),
    ("unknown", "field"),
]


async def store_by_hand(policy, client, user_id: str, field: str, value):
    """Store a PRO profile, then change one field by hand (None deletes
    it; the reason "\xff\xfe" is stored as bytes that are not UTF-8)."""
    await policy.set_user_profile(UserProfile.from_tier(user_id, UserTier.PRO))
    key = policy.keys.user(user_id).profile
    if value is None:
        await client.hdel(key, field)
    elif field == "reason" and value == "\xff\xfe":
        await client.hset(key, field, b"\xff\xfe")
    else:
        await client.hset(key, field, value)


@pytest.mark.parametrize(("field", "value"), CORRUPTIONS, ids=short)
async def test_corrupt_profile_fails_closed_for_its_user_only(
    policy, redis_client, field, value
):
    """A profile damaged by hand is reported (PROFILE_CORRUPT, naming the
    field) by Python and by every script alike, denies that user's
    decisions, and leaves other users' decisions alone."""
    await store_by_hand(policy, redis_client, "u", field, value)
    await policy.set_user_profile(UserProfile.from_tier("other", UserTier.PRO))

    with pytest.raises(CorruptProfileError) as caught:
        await policy.get_user_profile("u")
    assert caught.value.field == field
    with pytest.raises(CorruptProfileError) as caught:
        await policy.get_user_state("u")
    assert caught.value.field == field
    rate = await policy.check_rate_limit("u")
    start = await policy.check_can_start_service("u", "s")
    assert not rate.allowed and not start.allowed
    assert start.anomaly.anomaly_type is AnomalyType.PROFILE_CORRUPT

    events = await policy.anomalies.by_type(AnomalyType.PROFILE_CORRUPT)
    assert len(events) == 2
    assert {e.metadata["field"] for e in events} == {field}
    assert {e.user_id for e in events} == {"u"}

    assert (await policy.check_rate_limit("other")).allowed
    assert (await policy.check_can_start_service("other", "s")).allowed
    assert (await policy.get_user_profile("other")).tier is UserTier.PRO


@pytest.mark.parametrize(("field", "value"), ODD_BUT_VALID, ids=short)
async def test_odd_but_valid_profiles_are_read_alike(
    policy, redis_client, field, value
):
    """A stored profile within the grammar is usable in Python and in the
    scripts, and both read the same limits from it."""
    await store_by_hand(policy, redis_client, "u", field, value)
    profile = await policy.get_user_profile("u")
    state = await policy.get_user_state("u")
    rate = await policy.check_rate_limit("u")
    assert rate.allowed
    assert rate.limit == profile.max_requests_per_minute
    assert state.tokens == profile.max_requests_per_minute
    start = await policy.check_can_start_service("u", "s", port=65535)
    ports = profile.allowed_ports
    if profile.max_concurrent_services == 0:
        assert start.reason.startswith("Max concurrent services")
    elif ports is not None and 65535 not in ports:
        assert start.reason == "Port 65535 not allowed for your account"
    else:
        assert start.allowed


@pytest.mark.parametrize("tier", list(UserTier))
async def test_every_known_tier_is_readable_by_the_scripts(
    policy, redis_client, tier
):
    """Each UserTier value stored by hand passes the scripts' tier check,
    so the tier list in common.lua keeps up with the enum."""
    await store_by_hand(policy, redis_client, "u", "tier", tier.value)
    assert (await policy.get_user_profile("u")).tier is tier
    assert (await policy.check_rate_limit("u")).allowed
    assert (await policy.check_can_start_service("u", "s")).allowed
