"""The blocking policy against real failures: a frozen server, a lost
reply, a Redis Cluster and a Sentinel failover.

Each test starts its own servers (the cluster is shared by this module's
cluster tests, which leave it healthy). The breaker's clock is a second
``Clock`` the test moves; the Redis clock is the ``clock`` fixture. No
event loop runs here: the policy, the proxy and the tests all block.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from pactown_redis import AnomalyType, SyncSecurityPolicy, UserProfile, UserTier
from pactown_redis.resilience import BreakerState
from conftest import Clock
from servers import (
    HOST,
    LocalCluster,
    LocalSentinel,
    RedisServer,
    ReplyDropper,
)

pytestmark = pytest.mark.slow

TIMEOUT = 0.25
# The one timing assert here: a decision against a frozen server returns
# within the deadline plus this margin.
MARGIN = 0.15
COOLDOWN = 5.0


def build(target: Any, clock: Clock, ticker: Clock, **options: Any) -> Any:
    """A sync policy with the deadline under test, overload checks and the
    renewal thread off."""
    options.setdefault("timeout", TIMEOUT)
    options.setdefault("breaker_cooldown", COOLDOWN)
    return SyncSecurityPolicy(
        target,
        clock=clock,
        monotonic=ticker,
        cpu_threshold=None,
        memory_threshold=None,
        auto_renew=False,
        **options,
    )


def unavailable_events(policy: SyncSecurityPolicy) -> list[Any]:
    return policy.anomalies.by_type(AnomalyType.REDIS_UNAVAILABLE)


# -- a server that stops answering --------------------------------------------


def test_frozen_server_bounds_every_decision(clock):
    """SIGSTOP: each blocking decision returns within the deadline (plus a
    margin) by its fail mode, the breaker opens, and after SIGCONT the
    probe closes it and one REDIS_UNAVAILABLE is recorded."""
    ticker = Clock(start=500.0)
    with RedisServer() as server:
        with build(server.url, clock, ticker, breaker_threshold=3) as policy:
            assert not policy.check_rate_limit("u").degraded
            breaker = policy.resilience.breaker

            server.freeze()
            try:
                for i in range(6):
                    began = time.perf_counter()
                    if i % 2:
                        result: Any = policy.check_can_start_service(
                            "u", f"s{i}"
                        )
                    else:
                        result = policy.check_rate_limit("u")
                    took = time.perf_counter() - began
                    assert result.degraded, i
                    assert took < TIMEOUT + MARGIN, (i, took)
                    if i >= 3:
                        # The breaker is open: no call waits for Redis.
                        assert took < TIMEOUT, (i, took)
                assert (breaker.state, breaker.failures) == (
                    BreakerState.OPEN, 3
                )
            finally:
                server.thaw()

            ticker.advance(COOLDOWN)
            # Not checked: the remaining tokens. The first frozen call was
            # in the server's socket buffer and runs on SIGCONT (a known
            # limit, see docs/failure.md).
            assert not policy.check_rate_limit("u").degraded
            assert breaker.state is BreakerState.CLOSED
            (event,) = unavailable_events(policy)
            assert event.metadata["degraded_decisions"] == 6
            assert "Timeout" in event.metadata["last_error"]


# -- retries ------------------------------------------------------------------


@pytest.fixture
def dropper() -> Iterator[ReplyDropper]:
    """A private redis-server behind a ReplyDropper."""
    with RedisServer() as server:
        with ReplyDropper(server.port) as proxy:
            yield proxy


def test_a_lost_debit_reply_is_never_sent_again(clock, dropper):
    """The debit ran but its reply was lost: the blocking policy does not
    send it twice; the fail mode decides it, and it is debited once."""
    url = f"redis://{HOST}:{dropper.port}/0"
    with build(url, clock, Clock(start=500.0), timeout=2.0) as policy:
        assert policy.check_rate_limit("u").remaining == 19
        dropper.armed = True
        lost = policy.check_rate_limit("u", cost=5)
        assert dropper.dropped == 1
        assert (lost.allowed, lost.degraded) == (True, True)
        assert policy.get_user_state("u").tokens == 14
        assert policy.check_rate_limit("u").remaining == 13


def test_a_lost_start_reply_reserves_one_slot(clock, dropper):
    """The start ran but its reply was lost: the retry finds the slot held
    ('running'), so one lease, one start and one start token are used."""
    url = f"redis://{HOST}:{dropper.port}/0"
    with build(url, clock, Clock(start=500.0), timeout=2.0) as policy:
        # Another user's start loads the script, so the lost reply is the
        # script's answer and not NOSCRIPT.
        assert policy.check_can_start_service("w", "s1").allowed
        dropper.armed = True
        granted = policy.check_can_start_service("u", "s1")
        assert dropper.dropped == 1
        assert (granted.allowed, granted.already_running) == (True, True)
        state = policy.get_user_state("u")
        assert (state.running, state.started_last_hour) == (1, 1)
        assert state.start_tokens == 9
        assert policy.held_leases()["u"]["s1"].fence == granted.fence


# -- a Redis Cluster ----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A healthy cluster shared by this module's cluster tests; each uses
    a namespace of its own."""
    with LocalCluster() as running:
        yield running


def primary_of(policy: SyncSecurityPolicy, key: str) -> int:
    return int(policy._client.get_node_from_key(key).port)


@pytest.mark.parametrize(
    ("form", "namespace"),
    [
        ("redis+cluster://", "sync-url"),
        ("cluster=True", "sync-flag"),
        ("nodes", "sync-nodes"),
    ],
)
def test_each_way_to_name_a_cluster_decides_on_every_primary(
    cluster, clock, form, namespace
):
    """A cluster URL, cluster=True or startup nodes give a blocking cluster
    client whose decisions land on the primary of each user's slot."""
    options: dict[str, Any] = {
        "namespace": namespace,
        "clock": clock,
        "cpu_threshold": None,
        "memory_threshold": None,
        "auto_renew": False,
        # Generous: a decision made by the fail mode would void the count.
        "timeout": 2.0,
    }
    if form == "redis+cluster://":
        port = cluster.startup_nodes[0][1]
        policy = SyncSecurityPolicy.from_url(
            f"redis+cluster://{HOST}:{port}", **options
        )
    elif form == "cluster=True":
        policy = SyncSecurityPolicy.from_url(cluster.url, cluster=True, **options)
    else:
        policy = SyncSecurityPolicy(cluster.startup_nodes, **options)
    with policy:
        users: dict[int, str] = {}
        for i in range(200):
            home = primary_of(policy, policy.keys.user(f"u{i}").requests)
            users.setdefault(home, f"u{i}")
        assert sorted(users) == sorted(cluster.primaries())
        for port, user in users.items():
            assert policy.check_rate_limit(user).remaining == 19
            with cluster.node(port).probe() as node:
                assert node.exists(policy.keys.user(user).requests) == 1


def test_the_whole_api_runs_on_a_cluster(cluster, clock):
    """Starts, leases, automatic blocking, unblocking (a two-key delete in
    the user's slot), the anomaly stream and its summary all work through
    a blocking cluster client."""
    ticker = Clock(start=500.0)
    with build(
        cluster.startup_nodes,
        clock,
        ticker,
        namespace="sync-api",
        timeout=2.0,
        auto_block_threshold=2,
        auto_block_window=60,
        auto_block_duration=300,
    ) as policy:
        granted = policy.check_can_start_service("u", "web", port=8080)
        assert granted.allowed
        assert policy.register_service("u", "web") == granted.fence
        (renewed,) = policy.renew_leases()
        assert renewed.status == "ok"
        assert policy.unregister_service("u", "web")

        profile = UserProfile.from_tier("v", UserTier.FREE)
        profile.allowed_ports = [8080]
        policy.set_user_profile(profile)
        for _ in range(2):
            refused = policy.check_can_start_service("v", "s", port=22)
            assert not refused.allowed
        blocked = policy.check_can_start_service("v", "s", port=8080)
        assert blocked.reason.startswith("User temporarily blocked")
        policy.unblock_user("v")
        keys = policy.keys.user("v")
        with cluster.node(primary_of(policy, keys.strikes)).probe() as node:
            assert not node.exists(keys.strikes, keys.auto_block)
        assert policy.check_can_start_service("v", "s", port=8080).allowed

        kinds = [e.anomaly_type for e in policy.anomalies.recent()]
        assert kinds == [
            AnomalyType.UNAUTHORIZED_ACCESS,
            AnomalyType.UNAUTHORIZED_ACCESS,
            AnomalyType.USER_AUTO_BLOCKED,
            AnomalyType.UNAUTHORIZED_ACCESS,
        ]
        summary = policy.get_anomaly_summary(hours=1)
        assert summary["total_anomalies"] == 4
        assert summary["top_users"] == {"v": 4}


# -- failover -----------------------------------------------------------------


def test_sentinel_failover_is_followed(clock):
    """Built from Sentinel, the blocking policy degrades while the primary
    is gone and decides on the promoted replica once Sentinel names it."""
    ticker = Clock(start=500.0)
    with LocalSentinel() as setup:
        policy = SyncSecurityPolicy.from_sentinel(
            setup.sentinels,
            setup.service_name,
            clock=clock,
            monotonic=ticker,
            timeout=0.5,
            breaker_cooldown=COOLDOWN,
            cpu_threshold=None,
            memory_threshold=None,
            auto_renew=False,
        )
        with policy:
            assert not policy.check_rate_limit("u").degraded
            setup.kill_primary()
            assert policy.check_rate_limit("u").degraded

            host, port = setup.wait_for_new_primary()
            # Bounded: 20 probes, one per cool-down, 0.2 s apart.
            for _ in range(20):
                ticker.advance(COOLDOWN)
                result = policy.check_rate_limit("v")
                if not result.degraded:
                    break
                time.sleep(0.2)
            assert not result.degraded

            (promoted,) = [
                s for s in (setup.primary, setup.replica) if s.port == port
            ]
            with promoted.probe() as client:
                assert client.exists(policy.keys.user("v").requests) == 1
            assert len(unavailable_events(policy)) == 1
