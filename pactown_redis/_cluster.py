"""Reaching a Redis Cluster: its addresses, and the one reply that differs.

Every key of one user carries the user's hash tag (see ``keys.py``), so a
decision is one script on the primary that serves the user's slot, and a
cluster client routes it there by the script's first key; a node that has
never seen the script answers ``NOSCRIPT`` and the call is repeated once as
``EVAL`` on the same node. Profile reads and deletes and the anomaly
stream's commands each name one key and are routed the same way. Only
``TIME`` names no key: a cluster client sends it to one node, or to
several when asked, and then answers with one reply per node.

The helpers here validate addresses and read replies; they open nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from .errors import BackendError, InvalidInputError

__all__ = ["cluster_url", "is_cluster", "startup_nodes", "time_ms"]

#: URL schemes that name a cluster, with the scheme the client takes.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

_PLAIN_SCHEMES = ("redis", "rediss")


def cluster_url(url: Any, cluster: bool) -> tuple[str, bool]:
    """Return the URL to give the client and whether it names a cluster.

    ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS) names a
    cluster, and so does ``redis://host:port`` with ``cluster=True``. Any
    one node will do: the client learns the others from it. A cluster has
    only database 0, so a cluster URL may name no other.

    Raises:
        InvalidInputError: ``url`` is not a ``str``, or it names a cluster
            with another scheme (such as ``unix://``), without a host, or
            with a database other than 0.
    """
    if not isinstance(url, str):
        raise InvalidInputError(
            f"url must be a str or a list of (host, port), "
            f"not {type(url).__name__}"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in CLUSTER_SCHEMES:
        url = CLUSTER_SCHEMES[scheme] + url[len(scheme):]
        cluster = True
    if not cluster:
        return url, False
    if scheme not in CLUSTER_SCHEMES and scheme not in _PLAIN_SCHEMES:
        raise InvalidInputError(
            f"a cluster URL must use redis+cluster:// or rediss+cluster:// "
            f"(or redis:// with cluster=True), got {scheme or 'no'} scheme"
        )
    if not parts.hostname:
        raise InvalidInputError("a cluster URL must name a host")
    if parts.path.strip("/") not in ("", "0"):
        raise InvalidInputError(
            f"a cluster has only database 0, the URL names {parts.path!r}"
        )
    return url, True


def startup_nodes(nodes: Any) -> list[tuple[str, int]]:
    """Return ``nodes``, a non-empty list of ``(host, port)``, checked.

    Raises:
        InvalidInputError: not a list or tuple of pairs, an empty host, or
            a port that is not an int in 1-65535.
    """
    if not isinstance(nodes, (list, tuple)) or not nodes:
        raise InvalidInputError(
            "startup nodes must be a non-empty list of (host, port)"
        )
    checked = []
    for node in nodes:
        if not isinstance(node, (list, tuple)) or len(node) != 2:
            raise InvalidInputError(
                f"a startup node must be a (host, port) pair, got {node!r}"
            )
        host, port = node
        if not isinstance(host, str) or not host:
            raise InvalidInputError(f"bad host in startup node {node!r}")
        if (
            isinstance(port, bool)
            or not isinstance(port, int)
            or not 1 <= port <= 65535
        ):
            raise InvalidInputError(f"bad port in startup node {node!r}")
        checked.append((host, port))
    return checked


def time_ms(reply: Any) -> int:
    """Return a ``TIME`` reply in milliseconds.

    A cluster client sent to several nodes answers with a mapping of node
    to reply; the latest clock among them is returned, so that a window
    ending "now" holds every entry any of them has stamped.

    Raises:
        BackendError: a mapping without any reply.
    """
    if isinstance(reply, Mapping):
        if not reply:
            raise BackendError("TIME came back from no node")
        return max(time_ms(each) for each in reply.values())
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def is_cluster(client: Any) -> bool:
    """Return whether ``client`` is a Redis Cluster client, async or not."""
    return isinstance(client, (AsyncRedisCluster, RedisCluster))
