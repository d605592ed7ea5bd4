"""``pactown-redis``: inspect and administer a namespace from a shell.

Built on :class:`~pactown_redis.sync.SyncSecurityPolicy`, so it reads and
writes exactly what the library does. Tables by default, JSON with
``--json``. Exit codes: 0 done, 1 the command failed (a corrupt profile, a
Redis error reply, a missing example), 2 invalid input or Redis could not
be reached, 130 interrupted. Every error is one line on stderr, with any
password in a URL masked.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence, TextIO, cast
from urllib.parse import unquote, urlsplit

import redis
from pydantic import ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from .acl import API_COMMANDS, acl_setuser_line, script_commands
from .errors import BackendError, InvalidInputError, PactownRedisError
from .models import AnomalyEvent, UserProfile, UserTier
from .sync import SyncSecurityPolicy

__all__ = ["main", "mask_url"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
#: Environment variables read, in order, when ``--redis-url`` is not given.
URL_VARIABLES = ("REDIS_URL", "PACTOWN_REDIS_URL")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: How long one XREAD of ``anomalies tail --follow`` waits, so that the
#: loop wakes up regularly and Ctrl-C is never held up by a blocked read.
FOLLOW_BLOCK_MS = 1000
CONNECT_TIMEOUT = 5.0
#: Must exceed FOLLOW_BLOCK_MS, or a quiet stream would read as a failure.
SOCKET_TIMEOUT = 10.0

#: Examples the ``demo`` and ``simulate`` commands run, from the source tree.
EXAMPLES = {"demo": "demo.py", "simulate": "multi_tenant.py"}

_URL_CREDENTIALS = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)[^\s/]*@"
)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)[^&\s]*", re.I)
_MASK = "****"


class CliError(Exception):
    """A failure reported as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line instead of the usage text."""

    def error(self, message: str) -> Any:
        raise CliError(f"{message} (see {self.prog} --help)", EXIT_USAGE)


# -- masking -------------------------------------------------------------------


def mask_url(url: str) -> str:
    """Return ``url`` with its password, if any, replaced by ``****``."""
    masked = _URL_CREDENTIALS.sub(lambda m: m.group("head") + _MASK + "@", url)
    return _QUERY_PASSWORD.sub(lambda m: m.group("head") + _MASK, masked)


def _secrets_of(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
    except ValueError:
        found = []
    found += [m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(url)]
    found += [unquote(s) for s in found]
    return sorted({s for s in found if s}, key=len, reverse=True)


def _redact(text: str, url: str) -> str:
    """Return ``text`` on one line, with ``url``'s password masked wherever
    it appears, and any other URL's credentials masked too."""
    for secret in _secrets_of(url):
        text = text.replace(secret, _MASK)
    return " ".join(mask_url(text).split())


# -- formatting ----------------------------------------------------------------


def _number(value: float, digits: int = 1) -> str:
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.{digits}f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return ``rows`` under ``headers`` in left-aligned columns."""
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        for row in cells
    )


def _pairs(rows: Sequence[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def _event_row(event: AnomalyEvent) -> list[str]:
    return [
        event.timestamp.strftime("%Y-%m-%d %H:%M:%S"),
        event.severity.value,
        event.anomaly_type.value,
        event.user_id or "-",
        event.service_id or "-",
        event.details,
    ]


_EVENT_HEADERS = ("TIME", "SEVERITY", "TYPE", "USER", "SERVICE", "DETAILS")


# -- connecting ------------------------------------------------------------------


def _resolve_url(given: Optional[str]) -> tuple[str, bool]:
    """Return the Redis URL and whether the user chose it (flag or env)."""
    if given:
        return given, True
    for name in URL_VARIABLES:
        value = os.environ.get(name)
        if value:
            return value, True
    return DEFAULT_URL, False


@contextmanager
def _policy(args: argparse.Namespace) -> Iterator[SyncSecurityPolicy]:
    try:
        client = redis.Redis.from_url(
            args.redis_url,
            protocol=3,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=SOCKET_TIMEOUT,
            # One attempt: a command line reports a failure at once.
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:
        raise CliError(f"invalid Redis URL: {exc}", EXIT_USAGE) from exc
    try:
        policy = SyncSecurityPolicy(
            client,
            namespace=args.namespace,
            cpu_threshold=None,
            memory_threshold=None,
            auto_renew=False,
        )
        with policy:
            yield policy
    finally:
        client.close()


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data))
    else:
        print(text)


# -- commands ------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        profile = policy.get_user_profile(args.user)
        state = policy.get_user_state(args.user)
    services = [
        {
            "service_id": lease.service_id,
            "expires_in": round(lease.expires_in, 3),
            "fence": lease.fence,
            "memory_mb": lease.memory_mb,
            "cpu_percent": lease.cpu_percent,
        }
        for lease in state.leases
    ]
    data = {
        "user_id": args.user,
        "tier": profile.tier.value,
        "blocked": profile.blocked,
        "reason": profile.reason,
        "tokens": round(state.tokens, 3),
        "max_requests_per_minute": profile.max_requests_per_minute,
        "start_tokens": round(state.start_tokens, 3),
        "started_last_hour": state.started_last_hour,
        "max_services_per_hour": profile.max_services_per_hour,
        "running": state.running,
        "max_concurrent_services": profile.max_concurrent_services,
        "services": services,
    }
    blocked = "no"
    if profile.blocked:
        blocked = f"yes: {profile.reason}" if profile.reason else "yes"
    summary = _pairs(
        [
            ("user", args.user),
            ("tier", profile.tier.value),
            ("blocked", blocked),
            (
                "requests",
                f"{_number(state.tokens)} of "
                f"{profile.max_requests_per_minute} tokens left",
            ),
            (
                "starts",
                f"{state.started_last_hour} in the last hour "
                f"(limit {profile.max_services_per_hour})",
            ),
            (
                "services",
                f"{state.running} running "
                f"(limit {profile.max_concurrent_services})",
            ),
        ]
    )
    if services:
        rows = [
            [
                s["service_id"],
                f"{s['expires_in']:.1f}s",
                s["fence"],
                _number(cast(float, s["memory_mb"])),
                _number(cast(float, s["cpu_percent"])),
            ]
            for s in services
        ]
        summary += "\n\n" + table(
            ("SERVICE", "EXPIRES IN", "FENCE", "MEMORY MB", "CPU %"), rows
        )
    _emit(args, data, summary)
    return 0


def _profile_text(profile: UserProfile) -> str:
    ports = profile.allowed_ports
    return _pairs(
        [
            ("user", profile.user_id),
            ("tier", profile.tier.value),
            ("max concurrent services", profile.max_concurrent_services),
            ("max memory MB", profile.max_memory_mb),
            ("max CPU %", profile.max_cpu_percent),
            ("max requests/minute", profile.max_requests_per_minute),
            ("max services/hour", profile.max_services_per_hour),
            (
                "allowed ports",
                "any" if ports is None else (", ".join(map(str, ports)) or "none"),
            ),
            ("blocked", "yes" if profile.blocked else "no"),
            ("reason", profile.reason or "-"),
        ]
    )


def cmd_profile_get(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        profile = policy.get_user_profile(args.user)
    _emit(args, profile.model_dump(mode="json"), _profile_text(profile))
    return 0


#: ``profile set`` options and the profile fields they set.
_LIMIT_OPTIONS = (
    ("max_concurrent", "max_concurrent_services"),
    ("max_memory_mb", "max_memory_mb"),
    ("max_cpu_percent", "max_cpu_percent"),
    ("max_requests_per_minute", "max_requests_per_minute"),
    ("max_services_per_hour", "max_services_per_hour"),
)


def _one_line_validation(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'profile'}: {e['msg']}"
        for e in exc.errors()
    )


def cmd_profile_set(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        current = policy.get_user_profile(args.user)
        base = current
        if args.tier is not None:
            base = UserProfile.from_tier(args.user, args.tier)
        data = base.model_dump()
        # Standing is changed by block and unblock only.
        data.update(blocked=current.blocked, reason=current.reason)
        for option, field in _LIMIT_OPTIONS:
            value = getattr(args, option)
            if value is not None:
                data[field] = value
        if args.ports is not None:
            data["allowed_ports"] = args.ports
        try:
            profile = UserProfile.model_validate(data)
        except ValidationError as exc:
            raise CliError(
                f"invalid profile: {_one_line_validation(exc)}", EXIT_USAGE
            ) from exc
        policy.set_user_profile(profile)
    _emit(args, profile.model_dump(mode="json"), _profile_text(profile))
    return 0


def cmd_block(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        policy.block_user(args.user, args.reason)
    data = {"user_id": args.user, "blocked": True, "reason": args.reason}
    _emit(args, data, f"blocked {args.user}: {args.reason}")
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        policy.unblock_user(args.user)
    data = {"user_id": args.user, "blocked": False}
    _emit(args, data, f"unblocked {args.user}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        released = policy.unregister_service(args.user, args.service)
    data = {"user_id": args.user, "service_id": args.service, "released": released}
    text = (
        f"released the slot of {args.service} for {args.user}"
        if released
        else f"{args.service} of {args.user} held no slot"
    )
    _emit(args, data, text)
    return 0


def _print_events(
    args: argparse.Namespace, events: list[AnomalyEvent], widths: list[int]
) -> None:
    for event in events:
        if args.json:
            print(json.dumps(event.to_dict()), flush=True)
        else:
            row = _event_row(event)
            line = "  ".join(c.ljust(w) for c, w in zip(row, widths))
            print(line.rstrip(), flush=True)


def cmd_anomalies_tail(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        events, last_id = policy.anomalies.tail(args.count)
        rows = [_event_row(e) for e in events]
        # Fixed minimums keep followed lines roughly under the first ones.
        widths = [
            max([len(h), minimum] + [len(r[i]) for r in rows])
            for i, (h, minimum) in enumerate(
                zip(_EVENT_HEADERS, (19, 8, 25, 10, 10, 0))
            )
        ]
        if not args.json:
            header = "  ".join(h.ljust(w) for h, w in zip(_EVENT_HEADERS, widths))
            print(header.rstrip(), flush=True)
        _print_events(args, events, widths)
        if not args.follow:
            return 0
        try:
            while True:
                events, last_id = policy.anomalies.read_after(
                    last_id, block_ms=FOLLOW_BLOCK_MS
                )
                _print_events(args, events, widths)
        except KeyboardInterrupt:
            return 0


def cmd_anomalies_summary(args: argparse.Namespace) -> int:
    with _policy(args) as policy:
        summary = policy.get_anomaly_summary(args.hours)
    parts = [
        f"{summary['total_anomalies']} anomalies in the last "
        f"{_number(args.hours, 2)} h"
    ]
    for title, key in (
        ("TYPE", "by_type"),
        ("SEVERITY", "by_severity"),
        ("TOP USER", "top_users"),
    ):
        counts = sorted(summary[key].items(), key=lambda kv: (-kv[1], kv[0]))
        if counts:
            parts.append(table((title, "COUNT"), counts))
    critical = [
        AnomalyEvent.model_validate(e) for e in summary["recent_critical"]
    ]
    if critical:
        parts.append(
            "RECENT CRITICAL\n"
            + table(_EVENT_HEADERS, [_event_row(e) for e in critical])
        )
    _emit(args, summary, "\n\n".join(parts))
    return 0


def cmd_acl(args: argparse.Namespace) -> int:
    line = acl_setuser_line(args.namespace, args.username, args.password)
    commands = list(dict.fromkeys(API_COMMANDS + script_commands()))
    data = {
        "username": args.username,
        "key_pattern": f"~{args.namespace}:*",
        "commands": commands,
        "command": line,
    }
    _emit(args, data, line)
    return 0


def _example_dirs() -> list[Path]:
    return [
        Path(__file__).resolve().parent.parent / "examples",
        Path.cwd() / "examples",
    ]


def _load_example(path: Path) -> ModuleType:
    """Import the example at ``path`` as ``pactown_redis_example_<stem>``.

    Raises:
        CliError: ``path`` cannot be imported as a module.
        Exception: whatever running the example's top level raises.
    """
    name = f"pactown_redis_example_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve postponed annotations through sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _run_example(args: argparse.Namespace, filename: str) -> int:
    path = next(
        (d / filename for d in _example_dirs() if (d / filename).is_file()), None
    )
    if path is None:
        raise CliError(
            f"examples/{filename} is not here: the examples ship with the "
            "source tree, not the installed package"
        )
    module = _load_example(path)
    entry: Optional[Callable[..., Any]] = getattr(module, "main", None)
    if not callable(entry):
        raise CliError(f"{path} has no main()")
    takes_argv = bool(inspect.signature(entry).parameters)
    with _redis_url_in_env(args.redis_url if args.url_chosen else None):
        try:
            outcome = entry(list(args.args)) if takes_argv else entry()
            if inspect.isawaitable(outcome):
                outcome = asyncio.run(_wait(outcome))
        except SystemExit as exc:
            outcome = exc.code
    if outcome is None:
        return 0
    return outcome if isinstance(outcome, int) else EXIT_FAILED


async def _wait(awaitable: Any) -> Any:
    return await awaitable


@contextmanager
def _redis_url_in_env(url: Optional[str]) -> Iterator[None]:
    """Hand a URL the user chose to an example, which reads REDIS_URL; with
    none, the example keeps its own default."""
    if url is None:
        yield
        return
    before = os.environ.get("REDIS_URL")
    os.environ["REDIS_URL"] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("REDIS_URL", None)
        else:
            os.environ["REDIS_URL"] = before


def cmd_demo(args: argparse.Namespace) -> int:
    return _run_example(args, EXAMPLES["demo"])


def cmd_simulate(args: argparse.Namespace) -> int:
    return _run_example(args, EXAMPLES["simulate"])


# -- parsing -----------------------------------------------------------------------


def _ports(text: str) -> Optional[list[int]]:
    if text == "any":
        return None
    if text == "none":
        return []
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'any', 'none' or ports like 80,443; got {text!r}"
        ) from None


def _common_options(*, suppress: bool) -> _Parser:
    """The options every command takes. Sub-commands accept them too, and
    leave the top-level value alone when not given (SUPPRESS)."""
    default: Any = argparse.SUPPRESS if suppress else None
    common = _Parser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=default,
        metavar="URL",
        help=(
            "Redis to use; default: $REDIS_URL, then $PACTOWN_REDIS_URL, "
            f"then {DEFAULT_URL}"
        ),
    )
    common.add_argument(
        "--namespace",
        default=argparse.SUPPRESS if suppress else "pactown",
        help="key prefix of the policy (default: pactown)",
    )
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print JSON instead of tables",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every command."""
    common = _common_options(suppress=True)
    parser = _Parser(
        prog="pactown-redis",
        description="Inspect and administer a pactown-redis security policy.",
        parents=[_common_options(suppress=False)],
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def add(name: str, handler: Callable[[argparse.Namespace], int],
            help_text: str, under: Any = commands) -> argparse.ArgumentParser:
        sub = under.add_parser(
            name, parents=[common], help=help_text, description=help_text
        )
        sub.set_defaults(handler=handler)
        return sub

    status = add(
        "status",
        cmd_status,
        "tier, tokens left, running services, starts this hour, blocking",
    )
    status.add_argument("user")

    profile = commands.add_parser(
        "profile", parents=[common], help="read or write a user's profile"
    )
    profile_commands = profile.add_subparsers(
        dest="profile_command", metavar="ACTION", required=True,
        parser_class=_Parser,
    )
    get = add("get", cmd_profile_get, "print a user's profile",
              under=profile_commands)
    get.add_argument("user")
    put = add(
        "set",
        cmd_profile_set,
        "set a user's tier and limits; options left out keep the stored "
        "value (or the tier's, with --tier); blocking is kept",
        under=profile_commands,
    )
    put.add_argument("user")
    put.add_argument("--tier", choices=[t.value for t in UserTier])
    put.add_argument("--max-concurrent", type=int, metavar="N",
                     help="services running at once")
    put.add_argument("--max-memory-mb", type=int, metavar="N")
    put.add_argument("--max-cpu-percent", type=int, metavar="N")
    put.add_argument("--max-requests-per-minute", type=int, metavar="N")
    put.add_argument("--max-services-per-hour", type=int, metavar="N")
    put.add_argument(
        "--ports", type=_ports, metavar="LIST",
        help="allowed ports: 'any', 'none' or a list like 80,443",
    )

    block = add("block", cmd_block, "stop a user from starting services")
    block.add_argument("user")
    block.add_argument("--reason", required=True)
    unblock = add("unblock", cmd_unblock, "lift a block")
    unblock.add_argument("user")
    release = add(
        "release", cmd_release,
        "free a service's slot now, whoever holds it",
    )
    release.add_argument("user")
    release.add_argument("service")

    anomalies = commands.add_parser(
        "anomalies", parents=[common], help="read the anomaly stream"
    )
    anomaly_commands = anomalies.add_subparsers(
        dest="anomalies_command", metavar="ACTION", required=True,
        parser_class=_Parser,
    )
    tail = add(
        "tail", cmd_anomalies_tail,
        "print the newest anomalies (with --json, one object per line)",
        under=anomaly_commands,
    )
    tail.add_argument("--count", type=int, default=20, metavar="N")
    tail.add_argument(
        "--follow", action="store_true",
        help="keep printing new anomalies until Ctrl-C",
    )
    summary = add(
        "summary", cmd_anomalies_summary,
        "totals by type, severity and user",
        under=anomaly_commands,
    )
    summary.add_argument("--hours", type=float, default=24.0, metavar="N")

    acl = add(
        "acl",
        cmd_acl,
        "print an ACL SETUSER line limiting a Redis user to the namespace's "
        "keys and the commands pactown-redis sends. It allows EVAL, needed "
        "to reload a lost script cache; EVAL runs any script, so for that "
        "user only the key pattern and the command list are the limit",
    )
    acl.add_argument("--username", default="pactown")
    acl.add_argument(
        "--password",
        help="replace the user's passwords by this one (default: keep them)",
    )

    for name, handler in (("demo", cmd_demo), ("simulate", cmd_simulate)):
        add(
            name, handler,
            f"run examples/{EXAMPLES[name]} from the source tree; further "
            "arguments are passed to its main()",
        )
    return parser


def parse_args(arguments: Sequence[str]) -> argparse.Namespace:
    """Parse ``arguments``; arguments the examples' commands do not know
    are kept in ``args.args`` for the example.

    Raises:
        CliError: a usage error.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(arguments)
    if extra and args.handler not in (cmd_demo, cmd_simulate):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.args = extra
    return args


# -- entry point ---------------------------------------------------------------------


def _fail(message: str, url: str, code: int, stream: TextIO) -> int:
    print(f"pactown-redis: error: {_redact(message, url)}", file=stream)
    return code


def _describe(exc: BaseException) -> str:
    return f"{exc}" or type(exc).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and
    return the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Until the URL is known, any URL in a message is masked by its shape.
    url_hint = ""
    unreachable = "cannot reach Redis: "
    try:
        args = parse_args(arguments)
        args.redis_url, args.url_chosen = _resolve_url(args.redis_url)
        url_hint = args.redis_url
        unreachable = f"cannot reach Redis at {args.redis_url}: "
        return int(args.handler(args))
    except CliError as exc:
        return _fail(str(exc), url_hint, exc.code, sys.stderr)
    except InvalidInputError as exc:
        return _fail(str(exc), url_hint, EXIT_USAGE, sys.stderr)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _fail(unreachable + _describe(exc), url_hint, EXIT_USAGE,
                     sys.stderr)
    except BackendError as exc:
        cause = exc.__cause__
        if isinstance(cause, (redis.ConnectionError, redis.TimeoutError)):
            return _fail(unreachable + _describe(cause), url_hint, EXIT_USAGE,
                         sys.stderr)
        return _fail(str(exc), url_hint, EXIT_FAILED, sys.stderr)
    except (PactownRedisError, redis.RedisError) as exc:
        return _fail(_describe(exc), url_hint, EXIT_FAILED, sys.stderr)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. `| head`); nothing is left to say.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives until exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
