"""Self-tests of the server harness in ``servers.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from servers import (
    CLUSTER_BUS_OFFSET,
    CLUSTER_SLOTS,
    LocalCluster,
    LocalSentinel,
    RedisServer,
    free_cluster_port,
    make_tls_material,
)

NO_RETRY = Retry(NoBackoff(), 0)


@pytest.mark.parametrize(
    ("persistence", "after_restart"),
    [
        (True, "kept"),
        (False, None),
    ],
)
def test_restart_after_kill_keeps_data_only_with_persistence(
    persistence: bool, after_restart: str | None
) -> None:
    """A SIGKILLed server restarts on its port with data iff it persists."""
    with RedisServer(persistence=persistence) as server:
        port = server.port
        with server.probe() as client:
            client.set("key", "kept")

        server.kill()
        assert not server.running
        server.restart()

        assert server.port == port
        with server.probe() as client:
            assert client.get("key") == after_restart


def test_frozen_server_times_out_until_thawed() -> None:
    """A frozen server lets PING time out; after thaw it answers again."""
    with RedisServer() as server:
        client = server.client(socket_timeout=0.2, retry=NO_RETRY)
        server.freeze()
        with pytest.raises(redis.TimeoutError):
            client.ping()

        server.thaw()
        assert client.ping() is True
        client.close()


def test_tls_server_trusts_its_ca_only(tmp_path: Path) -> None:
    """A TLS server answers a client trusting its CA and fails another."""
    material = make_tls_material(tmp_path)
    with RedisServer(tls=material) as server:
        assert server.url.startswith("rediss://127.0.0.1:")
        with server.probe() as client:
            assert client.ping() is True

        stranger = server.client(
            ssl_ca_certs=material["wrong_ca"], retry=NO_RETRY
        )
        with pytest.raises(redis.ConnectionError, match="certificate verify"):
            stranger.ping()


def test_missing_program_raises_with_setup_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without redis-server on PATH the harness fails, naming the setup."""
    monkeypatch.setenv("PATH", "")
    with pytest.raises(RuntimeError, match="scripts/setup.sh"):
        RedisServer()


def test_cluster_ports_leave_their_bus_port_free() -> None:
    """Cluster ports are distinct and never collide with a bus port."""
    ports = [free_cluster_port() for _ in range(6)]
    taken = ports + [port + CLUSTER_BUS_OFFSET for port in ports]
    assert len(set(taken)) == len(taken)
    assert max(taken) < 65536


@pytest.mark.slow
def test_cluster_serves_every_slot_from_three_primaries() -> None:
    """A new cluster has three primaries with replicas and serves all slots."""
    with LocalCluster() as cluster:
        primaries = cluster.primaries()
        assert len(primaries) == 3
        for primary in primaries:
            assert cluster.replica_of(primary) not in primaries

        with cluster.node(primaries[0]).probe() as node:
            ranges = node.cluster("SLOTS")
        covered = sum(end - start + 1 for start, end, *_ in ranges)
        assert covered == CLUSTER_SLOTS

        client = cluster.client()
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"
        client.close()


@pytest.mark.slow
def test_cluster_failover_promotes_the_replica() -> None:
    """Killing a primary promotes its replica and keeps all slots served."""
    with LocalCluster() as cluster:
        before = cluster.primaries()
        primary = before[0]
        replica = cluster.replica_of(primary)

        cluster.kill_node(primary)
        promoted = cluster.wait_for_failover(primary, timeout=20)

        assert promoted == replica
        assert cluster.primaries() == sorted({*before, replica} - {primary})


@pytest.mark.slow
def test_sentinel_failover_promotes_the_replica() -> None:
    """Killing the primary makes the sentinels name the replica instead."""
    with LocalSentinel() as setup:
        old = setup.kill_primary()
        new = setup.wait_for_new_primary(timeout=30)

        assert old == setup.primary.address
        assert new == setup.replica.address
        client = setup.client(socket_timeout=1.0).master_for(
            setup.service_name
        )
        client.set("after", "failover")
        assert client.get("after") == b"failover"
        client.close()
