"""A least-privilege Redis ACL user for one namespace.

:func:`acl_setuser_line` returns an ``ACL SETUSER`` command that lets a
user reach only the keys of one namespace (``~<namespace>:*``), no pub/sub
channel, and only the commands this package sends: the ones its API sends
itself, and every command its Lua scripts call, since Redis checks a
script's ``redis.call`` against the calling user's ACL too. The scripts'
commands are read from the packaged scripts, so the list follows them.

``EVAL`` is allowed because it is how a call recovers when the server has
lost its script cache (``NOSCRIPT``). ``EVAL`` runs any script the client
sends, so for this user the key pattern and the command list are the
limit, not the scripts: arbitrary Lua can still reach every key of the
namespace with any command on the list.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Optional

from ._validate import check_namespace
from .errors import InvalidInputError
from .scripts import script

__all__ = ["API_COMMANDS", "acl_setuser_line", "acl_rules", "script_commands"]

#: Commands the Python API sends itself, beside what its scripts call.
API_COMMANDS = (
    # Decisions: scripts by SHA, and EVAL to reload a lost script cache.
    "evalsha",
    "eval",
    # Profiles read and deleted without a script.
    "hgetall",
    "del",
    # The anomaly stream: appends, reads, following, consumer groups.
    "xadd",
    "xrange",
    "xrevrange",
    "xread",
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xpending",
    "xgroup",
    # The server's clock for anomaly summaries.
    "time",
    # Connection set-up by redis-py: RESP3 handshake, health checks,
    # client names, and SELECT for a URL with a database number. CLIENT
    # SETINFO is left out: older servers do not know it, and redis-py
    # ignores its refusal.
    "hello",
    "auth",
    "ping",
    "select",
    "client|setname",
    "client|info",
)

_CALL = re.compile(r"redis\.p?call\(\s*['\"]([A-Za-z]+)['\"]")
_USERNAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_PASSWORD = re.compile(r"[!#-&(-~]{8,512}")


def _script_names() -> list[str]:
    packaged = resources.files("pactown_redis").joinpath("lua")
    if packaged.is_dir():
        names = [p.name for p in packaged.iterdir()]
    else:
        # In a source checkout the scripts sit in the top-level lua/ folder.
        folder = Path(__file__).resolve().parent.parent / "lua"
        names = [p.name for p in folder.iterdir()]
    return sorted(n for n in names if n.endswith(".lua") and n != "common.lua")


def script_commands() -> tuple[str, ...]:
    """Return, sorted and in lower case, every command a packaged script
    calls (its own lines and the prelude it is sent with)."""
    found: set[str] = set()
    for name in _script_names():
        found.update(c.lower() for c in _CALL.findall(script(name).source))
    return tuple(sorted(found))


def acl_rules(namespace: str) -> list[str]:
    """Return the ACL rules of a namespace's user, without user name or
    password.

    Raises:
        InvalidIdError: a bad namespace.
    """
    check_namespace(namespace)
    commands = dict.fromkeys(API_COMMANDS + script_commands())
    return [
        "on",
        "resetkeys",
        f"~{namespace}:*",
        "resetchannels",
        "-@all",
        *(f"+{command}" for command in commands),
    ]


def acl_setuser_line(
    namespace: str, username: str = "pactown", password: Optional[str] = None
) -> str:
    """Return an ``ACL SETUSER`` command for ``username`` that is limited to
    ``namespace``'s keys and this package's commands.

    Keys, channels and commands are reset by the line, so running it again
    after an upgrade brings an existing user up to date. With ``password``
    the user's passwords are replaced by it; without, they are left as they
    are (a new user then has none and cannot log in until one is added with
    ``ACL SETUSER <user> >secret``).

    Raises:
        InvalidIdError: a bad namespace.
        InvalidInputError: a user name outside 1-64 of ``A-Z a-z 0-9 _ . -``
            or a password outside 8-512 printable ASCII characters without
            spaces or quotes (so the line can be pasted into ``redis-cli``).
    """
    rules = acl_rules(namespace)
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise InvalidInputError(
            "username must be 1-64 characters of A-Z a-z 0-9 _ . -"
        )
    if password is not None:
        if not isinstance(password, str) or not _PASSWORD.fullmatch(password):
            raise InvalidInputError(
                "password must be 8-512 printable ASCII characters without "
                "spaces or quotes"
            )
        rules[1:1] = ["resetpass", f">{password}"]
    return " ".join(["ACL", "SETUSER", username, *rules])
