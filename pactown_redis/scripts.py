"""The Lua scripts, loaded once per process and called by SHA.

Each script in the ``lua`` folder is sent with ``common.lua`` in front of
it. Calls go out as ``EVALSHA``; when the server has lost its script cache
(a restart, a failover, ``SCRIPT FLUSH``) it answers ``NOSCRIPT`` without
running anything, and the call is repeated once as ``EVAL``, which runs the
script and caches it again. A decision is therefore never applied twice by
this recovery.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

__all__ = ["NO_ARGS", "PackedArgs", "Script", "ScriptCall", "script"]

_PRELUDE = "common.lua"


def _read(name: str) -> str:
    packaged = resources.files("pactown_redis").joinpath("lua", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # In a source checkout (an editable install) the scripts sit in the
    # top-level lua/ folder; the wheel carries them inside the package.
    source = Path(__file__).resolve().parent.parent / "lua" / name
    return source.read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class Script:
    """One script's full source and its SHA1 digest."""

    name: str
    source: str
    sha: str


@cache
def script(name: str) -> Script:
    """Return the script ``name`` (a file in ``lua/``), loaded once."""
    source = _read(_PRELUDE) + "\n" + _read(name)
    sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
    return Script(name=name, source=source, sha=sha)


@dataclass(frozen=True, slots=True)
class PackedArgs:
    """Arguments that end many calls alike, encoded once.

    Build one with :meth:`of` and keep it: the encoding is done there.
    """

    values: tuple[str, ...]
    packed: bytes

    @classmethod
    def of(cls, values: Sequence[str]) -> "PackedArgs":
        """Return ``values`` with their encoding."""
        return cls(tuple(values), b"".join(_bulk(v.encode()) for v in values))


NO_ARGS = PackedArgs((), b"")


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """A script with the keys and arguments of one call; ``tail`` follows
    ``args``.

    ``replayable`` says whether the call may be sent again when it is not
    known whether the first sending ran: true of every script that sets
    a state (renewals, releases, profile writes, a start, which finds its
    own lease), false of a debit, which would count twice.
    """

    script: Script
    keys: Sequence[str]
    args: Sequence[Any]
    tail: PackedArgs = NO_ARGS
    replayable: bool = True

    def evalsha_args(self) -> tuple[Any, ...]:
        """Return the positional arguments of ``EVALSHA``."""
        return (
            self.script.sha, len(self.keys), *self.keys, *self.args,
            *self.tail.values,
        )

    def eval_args(self) -> tuple[Any, ...]:
        """Return the positional arguments of ``EVAL``."""
        return (
            self.script.source, len(self.keys), *self.keys, *self.args,
            *self.tail.values,
        )

    def packed_evalsha(self) -> bytes:
        """Return this call's ``EVALSHA`` command in the Redis protocol.

        Keys and arguments are ``str`` (sent as UTF-8) or ``bytes``.
        """
        keys, args, tail = self.keys, self.args, self.tail
        head = _head(
            self.script.sha, len(keys), len(keys) + len(args) + len(tail.values)
        )
        values = (*keys, *args)
        try:
            # Keys are percent-encoded and arguments are numbers and names,
            # so all is ASCII, where a length in characters is one in bytes.
            body = "".join([f"${len(v)}\r\n{v}\r\n" for v in values])
            if not body.isascii():
                raise TypeError("not ASCII")
            packed = body.encode("ascii")
        except TypeError:
            packed = b"".join([_bulk(_encoded(v)) for v in values])
        return head + packed + tail.packed


def _encoded(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


@cache
def _head(sha: str, keys: int, values: int) -> bytes:
    # The command, the SHA and the key count: the same for every call of a
    # script with as many keys and arguments.
    count = b"%d" % keys
    return b"*%d\r\n$7\r\nEVALSHA\r\n%b%b" % (
        3 + values, _bulk(sha.encode("ascii")), _bulk(count)
    )
