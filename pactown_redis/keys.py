"""Every Redis key pactown-redis uses is built here.

Layout, for namespace ``ns`` and an encoded user id ``U``::

    ns:{U}:profile    hash     the user's profile (kept until deleted)
    ns:{U}:rl         string   request bucket: the nanosecond it is full
                               again, an integer (TTL: time to refill)
    ns:{U}:sr         string   start-rate bucket, likewise
    ns:{U}:svc        zset     leases, score = expiry in ms
    ns:{U}:svcmeta    hash     lease metadata "memory cpu fence"
    ns:{U}:starts     zset     starts of the last hour
    ns:{U}:fence      hash     fencing counter (TTL: last lease + grace)
    ns:{U}:strikes    zset     recent offences, for auto-blocking (TTL:
                               the strike window)
    ns:{U}:autoblock  string   end of an automatic block, in microseconds
                               (TTL: the block's length)
    ns:anomalies      stream   anomaly events (capped with MAXLEN ~)
    ns:anomalies:dead stream   anomalies no alert consumer could handle
                               (capped with MAXLEN ~)

The user's part sits inside ``{...}``, Redis Cluster's hash tag, so every
key of one user lives in one slot and a single script may touch them all,
while different users spread over the cluster.

User ids are percent-encoded over the UTF-8 bytes: letters, digits and
``_ . - ~ @`` stay as they are and every other byte becomes ``%XX``. The
encoding is one-to-one and never yields ``{``, ``}`` or ``:``, so no id can
name, or share a slot rule with, another id's keys: ``"a:b"`` encodes to
``a%3Ab`` and ``"a"`` to ``a``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from ._validate import check_id, check_namespace

__all__ = ["KeySpace", "UserKeys", "decode_user", "encode_user"]

_SAFE = "_.-~@"

#: Users whose keys a :class:`KeySpace` remembers.
MAX_REMEMBERED_USERS = 4096


def encode_user(user_id: str) -> str:
    """Return the key-safe form of a (validated) user id."""
    return quote(user_id.encode("utf-8"), safe=_SAFE)


def decode_user(encoded: str) -> str:
    """Invert :func:`encode_user`."""
    return unquote(encoded, encoding="utf-8", errors="strict")


@dataclass(frozen=True, slots=True)
class UserKeys:
    """The keys of one user, all in one hash slot."""

    profile: str
    requests: str
    starts_rate: str
    leases: str
    lease_meta: str
    starts: str
    fence: str
    strikes: str
    auto_block: str

    def all(self) -> tuple[str, ...]:
        """Return every key of the user."""
        return (
            self.profile,
            self.requests,
            self.starts_rate,
            self.leases,
            self.lease_meta,
            self.starts,
            self.fence,
            self.strikes,
            self.auto_block,
        )


class KeySpace:
    """Builds the keys of one namespace.

    Raises:
        InvalidIdError: a bad namespace or user id.
    """

    __slots__ = ("namespace", "anomalies", "dead_anomalies", "_prefix", "_known")

    def __init__(self, namespace: str) -> None:
        self.namespace = check_namespace(namespace)
        self._prefix = namespace + ":"
        self.anomalies = self._prefix + "anomalies"
        self.dead_anomalies = self.anomalies + ":dead"
        self._known: dict[str, UserKeys] = {}

    def user(self, user_id: str) -> UserKeys:
        """Return the keys of ``user_id`` after validating it."""
        # Every decision asks for its user's keys: the users seen lately
        # are remembered, so a busy user's id is checked and encoded once.
        # Only a str that passed the checks is ever stored.
        if type(user_id) is str:
            keys = self._known.get(user_id)
            if keys is not None:
                return keys
        keys = self._build(user_id)
        if type(user_id) is not str:
            return keys
        if len(self._known) >= MAX_REMEMBERED_USERS:
            # Dropping the oldest half keeps the cost of a miss constant.
            for old in list(self._known)[: MAX_REMEMBERED_USERS // 2]:
                self._known.pop(old, None)
        self._known[user_id] = keys
        return keys

    def _build(self, user_id: str) -> UserKeys:
        base = "%s{%s}:" % (
            self._prefix,
            encode_user(check_id(user_id, "user_id")),
        )
        return UserKeys(
            profile=base + "profile",
            requests=base + "rl",
            starts_rate=base + "sr",
            leases=base + "svc",
            lease_meta=base + "svcmeta",
            starts=base + "starts",
            fence=base + "fence",
            strikes=base + "strikes",
            auto_block=base + "autoblock",
        )

    def user_pattern(self) -> str:
        """Return a SCAN pattern matching every user key of the namespace."""
        return self._prefix + "{*}:*"

    def key_pattern(self) -> str:
        """Return a pattern matching every key of the namespace."""
        return self._prefix + "*"
