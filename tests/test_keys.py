"""Keys: one place builds them, every one is namespaced, tagged and timed."""

from __future__ import annotations

import math

import pytest

from pactown_redis import InvalidIdError, InvalidNumberError, UserProfile
from pactown_redis.keys import KeySpace, decode_user, encode_user


@pytest.mark.parametrize(
    ("user_id", "encoded"),
    [
        ("alice", "alice"),
        ("a:b", "a%3Ab"),
        ("{x}", "%7Bx%7D"),
        ("a b*?", "a%20b%2A%3F"),
        ("zoë", "zo%C3%AB"),
        ("a%3Ab", "a%253Ab"),
    ],
)
def test_encoding_is_one_to_one_and_tag_safe(user_id, encoded):
    """Ids encode without braces or colons and decode back."""
    assert encode_user(user_id) == encoded
    assert decode_user(encoded) == user_id


def test_user_keys_share_one_hash_tag():
    """Every key of a user carries the same {tag} after the namespace."""
    keys = KeySpace("app").user("a:b")
    assert {k.split("}")[0] for k in keys.all()} == {"app:{a%3Ab"}
    assert all(k.startswith("app:") for k in keys.all())


@pytest.mark.parametrize("namespace", ["", "a:b", "{x}", "a b", "x" * 65, 5])
def test_bad_namespaces_are_refused(namespace):
    """A namespace that could break key parsing is refused."""
    with pytest.raises(InvalidIdError):
        KeySpace(namespace)  # type: ignore[arg-type]


async def test_every_key_is_namespaced(make_policy, redis_client):
    """Two namespaces on one Redis share nothing."""
    first = make_policy(namespace="one")
    second = make_policy(namespace="two")
    for _ in range(20):
        await first.check_rate_limit("u")
    assert (await second.check_rate_limit("u")).allowed
    await first.check_can_start_service("u", "s")
    await first.block_user("v", "x")
    await first.check_can_start_service("v", "s")
    await first.anomalies.flush()
    keys = [k.decode() for k in await redis_client.keys("*")]
    assert keys and all(k.startswith(("one:", "two:")) for k in keys)


async def test_ttls_follow_the_state(make_policy, redis_client, clock):
    """Each key's TTL is what its state implies; profiles persist."""
    policy = make_policy(lease_ttl=30)
    await policy.set_user_profile(UserProfile(user_id="u"))
    await policy.check_rate_limit("u", cost=5)
    await policy.check_can_start_service("u", "s")
    keys = policy.keys.user("u")

    async def ttl(key):
        return await redis_client.pttl(key) / 1000

    assert await redis_client.pttl(keys.profile) == -1  # no expiry
    assert await ttl(keys.requests) == pytest.approx(15.0, abs=0.1)
    assert await ttl(keys.starts_rate) == pytest.approx(1.0, abs=0.1)
    assert await ttl(keys.leases) == pytest.approx(30.0, abs=0.1)
    assert await ttl(keys.lease_meta) == pytest.approx(30.0, abs=0.1)
    assert await ttl(keys.fence) == pytest.approx(3630.0, abs=0.1)
    assert await ttl(keys.starts) == pytest.approx(3600.0, abs=0.1)


async def test_idle_user_keys_all_expire(make_policy, redis_client):
    """Without a profile, every key a user leaves behind has a TTL, and
    releasing the last service removes the lease keys at once."""
    policy = make_policy()
    await policy.check_rate_limit("u")
    await policy.check_can_start_service("u", "s")
    await policy.unregister_service("u", "s")
    keys = policy.keys.user("u")
    present = {k.decode() for k in await redis_client.keys("*")}
    assert keys.leases not in present and keys.lease_meta not in present
    assert present == {keys.requests, keys.starts_rate, keys.starts, keys.fence}
    for key in present:
        assert await redis_client.pttl(key) > 0, key


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda p: p.check_rate_limit("", 1), InvalidIdError),
        (lambda p: p.check_rate_limit("x" * 257, 1), InvalidIdError),
        (lambda p: p.check_rate_limit(b"u", 1), InvalidIdError),
        (lambda p: p.check_rate_limit("\ud800", 1), InvalidIdError),
        (lambda p: p.check_rate_limit("u", 0), InvalidNumberError),
        (lambda p: p.check_rate_limit("u", -1), InvalidNumberError),
        (lambda p: p.check_rate_limit("u", math.nan), InvalidNumberError),
        (lambda p: p.check_rate_limit("u", math.inf), InvalidNumberError),
        (lambda p: p.check_rate_limit("u", True), InvalidNumberError),
        (lambda p: p.check_rate_limit("u", "1"), InvalidNumberError),
        (lambda p: p.check_can_start_service("u", ""), InvalidIdError),
        (lambda p: p.check_can_start_service("u", "s", port=0), InvalidNumberError),
        (
            lambda p: p.check_can_start_service("u", "s", port=65536),
            InvalidNumberError,
        ),
        (
            lambda p: p.check_can_start_service("u", "s", port=80.0),
            InvalidNumberError,
        ),
        (
            lambda p: p.check_can_start_service("u", "s", memory_mb=-1),
            InvalidNumberError,
        ),
        (
            lambda p: p.check_can_start_service("u", "s", cpu_percent=math.nan),
            InvalidNumberError,
        ),
        (lambda p: p.register_service("u", ""), InvalidIdError),
        (lambda p: p.unregister_service("", "s"), InvalidIdError),
    ],
)
async def test_bad_input_raises_before_anything_is_written(
    policy, redis_client, call, error
):
    """Bad ids and numbers raise a ValueError subclass and write nothing."""
    with pytest.raises(error) as caught:
        await call(policy)
    assert isinstance(caught.value, ValueError)
    await policy.anomalies.flush()
    assert await redis_client.dbsize() == 0
