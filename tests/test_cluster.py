"""The policy on a real Redis Cluster of three primaries and three replicas.

The single-server behaviour tests imported below run here again, unchanged:
this module's ``redis_client`` fixture hands them a cluster client in place
of one server's, so ``policy`` and ``make_policy`` build policies on the
cluster. The tests written here cover what only a cluster has: addresses
that name a cluster, users spread over the primaries, scripts missing on a
node, a primary killed mid-run, and the anomaly stream's shard going down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import pytest
from redis.asyncio.cluster import RedisCluster

from pactown_redis import (
    AnomalyType,
    BackendError,
    InvalidInputError,
    SecurityPolicy,
)
from pactown_redis._cluster import time_ms
from pactown_redis.keys import decode_user
from pactown_redis.policy import connect
from pactown_redis.scripts import script
from servers import LocalCluster

# Collected here a second time, on the cluster.
from test_profiles_anomalies import (  # noqa: F401 - collected as tests
    test_anomalies_by_user_and_type,
    test_delete_profile_falls_back,
    test_profile_round_trips,
    test_stream_is_capped,
    test_summary_counts_by_type_severity_and_user,
)
from test_rate_limit import (  # noqa: F401 - collected as tests
    test_denial_is_an_anomaly,
    test_each_tier_allows_its_burst_then_denies,
    test_profile_change_applies_on_every_replica,
    test_refill_follows_the_clock,
    test_two_policies_share_one_bucket,
)
from test_services import (  # noqa: F401 - collected as tests
    test_blocked_user_is_denied_first,
    test_each_tier_caps_running_services,
    test_fences_grow,
    test_free_tier_denials_in_order,
    test_leases_expire_without_renewal,
    test_memory_and_cpu_quotas,
    test_register_from_another_replica,
    test_renewal_keeps_leases_alive,
    test_start_rate_is_its_own_bucket,
    test_starting_a_running_service_reserves_nothing_twice,
    test_user_state_lists_leases,
)

pytestmark = pytest.mark.slow

T = TypeVar("T")

#: Seconds a failover may take before the test gives up; a node timeout of
#: one second makes it take two to four.
FAILOVER_DEADLINE = 30.0

DECISION_SCRIPTS = ("rate_limit.lua", "start_service.lua")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A healthy cluster shared by the tests that leave it healthy."""
    with LocalCluster() as running:
        yield running


@pytest.fixture
def backend() -> str:
    """Names the backend of the imported tests' matrix: the cluster."""
    return "cluster"


@pytest.fixture
async def redis_client(cluster: LocalCluster) -> AsyncIterator[Any]:
    """An empty cluster, through a client made by ``connect``."""
    client = connect(cluster.startup_nodes)
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    try:
        yield client
    finally:
        await client.aclose()


def primary_of(client: Any, key: str) -> int:
    """Port of the primary that serves ``key`` (client initialized)."""
    return int(client.get_node_from_key(key).port)


def users_on(
    client: Any, policy: SecurityPolicy, port: int, count: int, prefix: str
) -> list[str]:
    """The first ``count`` ids ``prefix0``, ``prefix1``... whose keys live
    on the primary at ``port``."""
    found = []
    for i in range(10_000):
        user = f"{prefix}{i}"
        if primary_of(client, policy.keys.user(user).profile) == port:
            found.append(user)
            if len(found) == count:
                return found
    raise AssertionError(f"no {count} users on port {port}")


def has_scripts(cluster: LocalCluster, port: int) -> list[bool]:
    """Whether the node at ``port`` holds each decision script."""
    shas = [script(name).sha for name in DECISION_SCRIPTS]
    with cluster.node(port).probe() as node:
        return [bool(found) for found in node.script_exists(*shas)]


@contextlib.asynccontextmanager
async def own_policy(
    cluster: LocalCluster, clock: Any
) -> AsyncIterator[tuple[SecurityPolicy, Any]]:
    """A policy that makes its own client from the startup nodes, as an
    application would, and a second client to look up which node serves
    which key.

    Its deadline is generous: after a node dies, the next call also
    refreshes the client's map of the cluster, which on a busy machine
    takes longer than the default deadline, and a decision made by the
    fail mode instead of Redis would void the counts these tests check.
    """
    policy = SecurityPolicy(
        cluster.startup_nodes,
        clock=clock,
        cpu_threshold=None,
        memory_threshold=None,
        timeout=2.0,
    )
    lookup = connect(cluster.startup_nodes)
    await lookup.initialize()
    try:
        yield policy, lookup
    finally:
        await policy.close()
        await lookup.aclose()


def same_slot_key(policy: SecurityPolicy, user: str) -> str:
    """A key outside the policy's namespace in ``user``'s hash slot."""
    profile = policy.keys.user(user).profile
    return "test-marker" + profile[profile.index("{"):profile.index("}") + 1]


async def once_up(call: Callable[[], Awaitable[T]]) -> T:
    """Return ``call()``'s result once it stops failing with BackendError,
    waiting at most ``FAILOVER_DEADLINE`` seconds."""
    deadline = time.monotonic() + FAILOVER_DEADLINE
    while True:
        try:
            return await call()
        except BackendError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# -- addresses -------------------------------------------------------------


@pytest.mark.parametrize("form", ["redis+cluster://", "cluster=True", "nodes"])
async def test_each_way_to_name_a_cluster_decides_on_every_primary(
    cluster, redis_client, make_policy, clock, form
):
    """A cluster URL, cluster=True or startup nodes reach every primary."""
    port = cluster.startup_nodes[0][1]
    # The first call also maps the cluster; see own_policy on the deadline.
    options = {
        "clock": clock,
        "cpu_threshold": None,
        "memory_threshold": None,
        "timeout": 2.0,
    }
    if form == "redis+cluster://":
        policy = SecurityPolicy.from_url(
            f"redis+cluster://127.0.0.1:{port}", **options
        )
    elif form == "cluster=True":
        policy = SecurityPolicy.from_url(cluster.url, cluster=True, **options)
    else:
        policy = SecurityPolicy(cluster.startup_nodes, **options)
    probe = make_policy()
    users = [
        users_on(redis_client, probe, primary, 1, "u")[0]
        for primary in cluster.primaries()
    ]
    async with policy:
        for user in users:
            assert (await policy.check_rate_limit(user)).remaining == 19
    for user in users:
        assert (await probe.check_rate_limit(user)).remaining == 18


@pytest.mark.parametrize(
    ("target", "options"),
    [
        ([], {}),
        ([("127.0.0.1",)], {}),
        ([("", 7000)], {}),
        ([("127.0.0.1", 0)], {}),
        ([("127.0.0.1", True)], {}),
        ([("127.0.0.1", "7000")], {}),
        (7000, {}),
        ("redis+cluster://127.0.0.1:7000/1", {}),
        ("redis+cluster:///", {}),
        ("unix:///tmp/redis.sock", {"cluster": True}),
        ("redis://127.0.0.1:7000/0?socket_timeout=soon", {}),
    ],
)
def test_bad_cluster_addresses_are_refused(target, options):
    """A malformed URL or startup node list raises InvalidInputError."""
    with pytest.raises(InvalidInputError):
        SecurityPolicy.from_url(target, **options)


@pytest.mark.parametrize(
    ("reply", "expected_ms"),
    [
        ((1_700_000_000, 123_456), 1_700_000_000_123),
        ([b"1700000000", b"999"], 1_700_000_000_000),
        ({"n1": (1, 0), "n2": (2, 500_000), "n3": (2, 0)}, 2_500),
    ],
)
def test_time_reply_in_milliseconds(reply, expected_ms):
    """TIME reads as ms; per-node replies read as the latest clock."""
    assert time_ms(reply) == expected_ms


def test_time_reply_from_no_node_is_a_backend_error():
    """An empty per-node TIME reply raises BackendError."""
    with pytest.raises(BackendError):
        time_ms({})


async def test_summary_with_time_answered_by_every_primary(
    redis_client, make_policy
):
    """The anomaly summary works when TIME comes back once per node."""
    redis_client.command_flags["TIME"] = RedisCluster.PRIMARIES
    assert len(await redis_client.time()) == 3
    policy = make_policy()
    await policy.block_user("b", "spam")
    await policy.check_can_start_service("b", "s")
    summary = await policy.get_anomaly_summary(hours=1)
    assert summary["by_type"] == {"unauthorized_access": 1}


# -- spreading -------------------------------------------------------------


async def test_users_spread_over_every_primary_one_slot_each(
    cluster, make_policy
):
    """200 users' keys cover all primaries, each user's on one primary;
    every primary loads the scripts it lacked without counting twice."""
    primaries = cluster.primaries()
    for port in primaries:
        with cluster.node(port).probe() as node:
            node.script_flush()
        assert has_scripts(cluster, port) == [False, False]
    policy = make_policy()
    users = [f"user-{i}" for i in range(200)]
    for user in users:
        for _ in range(3):
            await policy.check_rate_limit(user)
        assert (await policy.check_can_start_service(user, "web")).allowed
    for user in users:
        state = await policy.get_user_state(user)
        assert (state.tokens, state.running) == (17, 1)

    homes: dict[str, set[int]] = {}
    prefix = policy.namespace + ":{"
    for port in primaries:
        with cluster.node(port).probe() as node:
            for key in node.scan_iter(match=prefix + "*", count=1000):
                tag = key[len(prefix):key.index("}")]
                homes.setdefault(decode_user(tag), set()).add(port)
    assert sorted(homes) == sorted(users)
    assert all(len(ports) == 1 for ports in homes.values())
    assert set().union(*homes.values()) == set(primaries)
    for port in primaries:
        assert has_scripts(cluster, port) == [True, True]


async def test_batches_are_split_by_node(cluster, make_policy):
    """check_many and concurrent calls over users of every primary, after a
    SCRIPT FLUSH everywhere: each debit applied once, on its own node."""
    for port in cluster.primaries():
        with cluster.node(port).probe() as node:
            node.script_flush()
    policy = make_policy()
    users = [f"batch-{i}" for i in range(60)]
    results = await policy.check_many([(u, 2) for u in users] + users)
    assert [r.remaining for r in results] == [18] * 60 + [17] * 60
    concurrent = await asyncio.gather(
        *(policy.check_rate_limit(u) for u in users)
    )
    assert [r.remaining for r in concurrent] == [16] * 60
    for user in users[:5]:
        assert (await policy.get_user_state(user)).tokens == 16


# -- failures ----------------------------------------------------------------


@pytest.fixture
def spare_cluster() -> Iterator[LocalCluster]:
    """A cluster of this test's own, which it may break."""
    with LocalCluster() as running:
        yield running


async def test_failover_resumes_decisions_counting_nothing_twice(
    spare_cluster, clock
):
    """After kill -9 of a primary, decisions resume on the promoted replica,
    which reloads the scripts; replicated state is exact, and leases whose
    writes were lost are restored by their holder's renewal."""
    cluster = spare_cluster
    async with own_policy(cluster, clock) as (policy, lookup):
        primary = primary_of(lookup, policy.keys.user("kept").profile)
        replica = cluster.replica_of(primary)
        (lost,) = users_on(lookup, policy, primary, 1, "lost-")

        for _ in range(5):
            await policy.check_rate_limit("kept")
        assert (await policy.check_can_start_service("kept", "s1")).allowed
        assert (await policy.get_user_state("kept")).tokens == 15
        with cluster.node(primary).probe() as node:
            node.set(same_slot_key(policy, "kept"), "1")
            assert node.execute_command("WAIT", 1, 0) == 1
        assert has_scripts(cluster, replica) == [False, False]

        # Cut the replica off, so that what follows reaches the primary
        # only: frozen, the replica cannot reconnect before the primary dies.
        cluster.node(replica).freeze()
        try:
            with cluster.node(primary).probe() as node:
                assert node.client_kill_filter(_type="replica") == 1
            for _ in range(3):
                await policy.check_rate_limit(lost)
            for service in ("v1", "v2"):
                granted = await policy.check_can_start_service(lost, service)
                assert granted.allowed
            cluster.kill_node(primary)
        finally:
            cluster.node(replica).thaw()

        # Reading state fails until the replica serves the slot; it runs no
        # decision script, so the first debit below is also the first call
        # of rate_limit.lua on the promoted node.
        assert (await once_up(lambda: policy.get_user_state("kept"))).tokens == 15
        assert cluster.wait_for_failover(primary) == replica
        assert (await policy.check_rate_limit("kept")).remaining == 14
        state = await policy.get_user_state("kept")
        assert (state.tokens, state.running) == (14, 1)
        assert has_scripts(cluster, replica)[0]

        # The lost user's debits and leases are gone: its bucket is full
        # again and two more starts fit, until renewal restores both leases.
        assert (await policy.get_user_state(lost)).tokens == 20
        clock.advance(1)
        for service in ("v3", "v4"):
            assert (await policy.check_can_start_service(lost, service)).allowed
        renewed = {
            (o.service_id, o.status) for o in await policy.renew_leases()
        }
        assert renewed == {
            ("s1", "ok"),
            ("v1", "restored"),
            ("v2", "restored"),
            ("v3", "ok"),
            ("v4", "ok"),
        }
        assert await policy.get_user_service_count(lost) == 4
        denied = await policy.check_can_start_service(lost, "v5")
        assert denied.reason == (
            "Max concurrent services reached (4/2). Stop a service first."
        )


@pytest.fixture
def partial_cluster() -> Iterator[LocalCluster]:
    """A cluster of this test's own that keeps serving the slots it still
    covers when a whole shard is down (Redis stops every slot by default)."""
    with LocalCluster(
        extra_args=["--cluster-require-full-coverage", "no"]
    ) as running:
        yield running


async def test_decisions_stand_while_the_stream_shard_is_down(
    partial_cluster, clock, caplog
):
    """With the stream's primary and replica dead, decisions are made in
    Redis as usual and each lost anomaly append is a WARNING."""
    cluster = partial_cluster
    async with own_policy(cluster, clock) as (policy, lookup):
        stream_home = primary_of(lookup, policy.keys.anomalies)
        others = [port for port in cluster.primaries() if port != stream_home]
        (user,) = users_on(lookup, policy, others[0], 1, "w")

        stream_replica = cluster.replica_of(stream_home)
        cluster.kill_node(stream_home)
        cluster.kill_node(stream_replica)
        with caplog.at_level(logging.WARNING, logger="pactown_redis.anomalies"):
            results = [await policy.check_rate_limit(user) for _ in range(21)]
            starts = [
                await policy.check_can_start_service(user, service)
                for service in ("a", "b", "c")
            ]
            await policy.anomalies.flush()

        assert [r.allowed for r in results] == [True] * 20 + [False]
        assert results[-1].retry_after == pytest.approx(3.0)
        assert [s.allowed for s in starts] == [True, True, False]
        assert starts[-1].anomaly.anomaly_type is (
            AnomalyType.CONCURRENT_LIMIT_EXCEEDED
        )
        state = await policy.get_user_state(user)
        assert (state.tokens, state.running) == (0, 2)
        lost = [
            record for record in caplog.records
            if record.name == "pactown_redis.anomalies"
            and record.levelno == logging.WARNING
            and "cannot append anomaly to the stream" in record.getMessage()
        ]
        assert len(lost) == 2
