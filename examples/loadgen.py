"""Send one API key's requests round-robin to replicas of the example app
and count what they allowed.

::

    python examples/loadgen.py http://127.0.0.1:8001 http://127.0.0.1:8002 \\
        http://127.0.0.1:8003 [--requests 60] [--concurrency 3] [--key KEY]

Every replica debits the key from the same bucket in Redis, so together
they allow one limit's worth of requests (a FREE key: 20 at once), not one
per replica. The limit is read from the replicas' own ``RateLimit-Policy``
header; the bucket refills during the run at the limit per window, and the
verdict allows for that.

Exit status: 0 when the replicas kept to one limit, 1 when they allowed
more than that or the limit was never reached, 2 when no replica answered.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import httpx

from pactown_redis.errors import InvalidInputError

#: A counted request that changes nothing: the example app's ``GET /me``.
LOAD_PATH = "/me"
HEALTH_PATH = "/health"
KEY_HEADER = "x-api-key"

#: Seconds one request may take before it counts as unanswered.
REQUEST_TIMEOUT = 10.0
_POLL_INTERVAL = 0.2

MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 1_000


@dataclass(frozen=True)
class Answer:
    """One request's outcome.

    Attributes:
        target: the replica's base URL.
        status: the HTTP status, 0 when no response arrived.
        ratelimit_policy, ratelimit, retry_after: those response fields,
            as sent, or None when absent.
    """

    target: str
    status: int
    ratelimit_policy: Optional[str] = None
    ratelimit: Optional[str] = None
    retry_after: Optional[str] = None


@dataclass
class Tally:
    """What one replica answered."""

    target: str
    sent: int = 0
    allowed: int = 0
    limited: int = 0
    other: int = 0

    @property
    def answered(self) -> int:
        return self.allowed + self.limited + self.other

    @property
    def unanswered(self) -> int:
        return self.sent - self.answered

    def add(self, answer: Answer) -> None:
        self.sent += 1
        if answer.status == 429:
            self.limited += 1
        elif 200 <= answer.status < 300:
            self.allowed += 1
        elif answer.status:
            self.other += 1


def parse_policy(value: str) -> tuple[int, int]:
    """Return ``(limit, window seconds)`` of a ``RateLimit-Policy`` field
    such as ``20;w=60``.

    Raises:
        InvalidInputError: the field is not of that form.
    """
    limit_text, _, params = value.partition(";")
    window = None
    for param in params.split(";"):
        name, _, text = param.strip().partition("=")
        if name == "w":
            window = text
    try:
        limit, seconds = int(limit_text), int(window or "")
    except ValueError:
        raise InvalidInputError(
            f"RateLimit-Policy {value!r} is not of the form LIMIT;w=SECONDS"
        ) from None
    if limit < 1 or seconds < 1:
        raise InvalidInputError(f"RateLimit-Policy {value!r} is out of range")
    return limit, seconds


@dataclass
class Report:
    """The outcome of one run of :func:`send_load`.

    Attributes:
        key: the API key every request carried.
        targets: the replicas, in round-robin order.
        answers: one per request, in the order they were sent.
        elapsed: seconds from the first request sent to the last answer;
            the bucket cannot have refilled for longer than that.
    """

    key: str
    targets: list[str]
    answers: list[Answer]
    elapsed: float
    tallies: list[Tally] = field(init=False)

    def __post_init__(self) -> None:
        by_target = {target: Tally(target) for target in self.targets}
        for answer in self.answers:
            by_target[answer.target].add(answer)
        self.tallies = list(by_target.values())

    @property
    def allowed(self) -> int:
        return sum(t.allowed for t in self.tallies)

    @property
    def limited(self) -> int:
        return sum(t.limited for t in self.tallies)

    @property
    def answered(self) -> int:
        return sum(t.answered for t in self.tallies)

    @property
    def policy(self) -> Optional[tuple[int, int]]:
        """``(limit, window seconds)`` from the first answer that has a
        ``RateLimit-Policy`` field, else None.

        Raises:
            InvalidInputError: that field is malformed.
        """
        for answer in self.answers:
            if answer.ratelimit_policy is not None:
                return parse_policy(answer.ratelimit_policy)
        return None

    def refilled(self) -> int:
        """Whole requests the bucket can have regained during the run."""
        policy = self.policy
        if policy is None:
            return 0
        limit, window = policy
        return math.floor(limit * self.elapsed / window)

    def separate_limits(self) -> int:
        """What the replicas would have allowed with one bucket each."""
        policy = self.policy
        if policy is None:
            return self.allowed
        return sum(min(t.sent, policy[0]) for t in self.tallies)

    def verdict(self) -> tuple[int, str]:
        """Return the exit status and a sentence saying what the run
        showed."""
        if self.answered == 0:
            return 2, "no replica answered"
        policy = self.policy
        if policy is None:
            return 1, "no answer carried RateLimit-Policy: is the key limited?"
        limit, window = policy
        replicas = len(self.targets)
        refill = self.refilled()
        one_limit = f"one limit of {limit} per {window} s"
        if refill:
            one_limit += f" (+{refill} refilled in {self.elapsed:.1f} s)"
        if self.allowed > limit + refill:
            return 1, (
                f"NOT shared: the {replicas} replicas allowed "
                f"{self.allowed}, more than {one_limit}"
            )
        if self.limited == 0:
            return 1, (
                f"the limit was not reached: send more than {limit} requests"
            )
        return 0, (
            f"shared: the {replicas} replicas allowed {self.allowed} in all, "
            f"{one_limit}; a bucket each would have allowed "
            f"{self.separate_limits()}"
        )


def format_report(report: Report) -> str:
    """Return the per-replica table of ``report`` and its verdict."""
    header = ("replica", "answered", "allowed", "429", "other")
    rows = [
        (t.target, t.answered, t.allowed, t.limited, t.other)
        for t in report.tallies
    ]
    total_other = sum(t.other for t in report.tallies)
    rows.append(
        ("all", report.answered, report.allowed, report.limited, total_other)
    )
    width = max(len(header[0]), *(len(str(row[0])) for row in rows))
    lines = [
        f"{len(report.answers)} requests with one API key, round-robin over "
        f"{len(report.targets)} replicas, in {report.elapsed:.1f} s",
        f"{header[0]:<{width}}  " + "  ".join(f"{h:>8}" for h in header[1:]),
    ]
    for row in rows:
        lines.append(
            f"{row[0]:<{width}}  " + "  ".join(f"{n:>8}" for n in row[1:])
        )
    unanswered = sum(t.unanswered for t in report.tallies)
    if unanswered:
        lines.append(f"{unanswered} requests got no answer")
    lines.append(report.verdict()[1])
    return "\n".join(lines)


def _check_targets(targets: Sequence[str]) -> list[str]:
    if isinstance(targets, str) or not targets:
        raise InvalidInputError("targets must be a non-empty list of URLs")
    checked = []
    for target in targets:
        if not isinstance(target, str) or not target.startswith(
            ("http://", "https://")
        ):
            raise InvalidInputError(
                f"target {target!r} must be an http:// or https:// URL"
            )
        checked.append(target.rstrip("/"))
    if len(set(checked)) != len(checked):
        raise InvalidInputError("targets must be distinct")
    return checked


def check_count(value: object, what: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an int, got {value!r}")
    if not 1 <= value <= high:
        raise InvalidInputError(f"{what} must be in 1..{high}, got {value}")
    return value


async def wait_until_ready(
    targets: Sequence[str], timeout: float, client: httpx.AsyncClient
) -> None:
    """Return once every target answers ``GET /health`` with 200.

    Raises:
        TimeoutError: some target did not within ``timeout`` seconds; the
            message names them.
    """
    waiting = set(_check_targets(targets))
    deadline = time.monotonic() + timeout
    while waiting:
        for target in sorted(waiting):
            try:
                response = await client.get(target + HEALTH_PATH, timeout=2.0)
            except httpx.TransportError:
                continue
            if response.status_code == 200:
                waiting.discard(target)
        if not waiting:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(sorted(waiting))
            raise TimeoutError(f"not ready within {timeout} s: {names}")
        await asyncio.sleep(_POLL_INTERVAL)


async def _send(client: httpx.AsyncClient, target: str, key: str) -> Answer:
    try:
        response = await client.get(
            target + LOAD_PATH,
            headers={KEY_HEADER: key},
            timeout=REQUEST_TIMEOUT,
        )
    except httpx.TransportError:
        return Answer(target, 0)
    return Answer(
        target,
        response.status_code,
        response.headers.get("ratelimit-policy"),
        response.headers.get("ratelimit"),
        response.headers.get("retry-after"),
    )


async def send_load(
    targets: Sequence[str],
    *,
    key: str,
    requests: int = 60,
    concurrency: int = 3,
    client: Optional[httpx.AsyncClient] = None,
) -> Report:
    """Send ``requests`` counted requests carrying the API key ``key``,
    request ``i`` to ``targets[i % len(targets)]``, ``concurrency`` at a
    time.

    A request that gets no answer (refused connection, timeout) is
    recorded with status 0 rather than raised.

    Raises:
        InvalidInputError: bad targets, key, count or concurrency.
    """
    targets = _check_targets(targets)
    if not isinstance(key, str) or not key:
        raise InvalidInputError("key must be a non-empty str")
    requests = check_count(requests, "requests", MAX_REQUESTS)
    concurrency = check_count(concurrency, "concurrency", MAX_CONCURRENCY)

    answers: list[Optional[Answer]] = [None] * requests
    numbers = itertools.count()

    async def worker(http: httpx.AsyncClient) -> None:
        while (i := next(numbers)) < requests:
            answers[i] = await _send(http, targets[i % len(targets)], key)

    async def run(http: httpx.AsyncClient) -> float:
        began = time.monotonic()
        await asyncio.gather(
            *(worker(http) for _ in range(min(concurrency, requests)))
        )
        return time.monotonic() - began

    if client is None:
        async with httpx.AsyncClient() as own:
            elapsed = await run(own)
    else:
        elapsed = await run(client)
    done = [answer for answer in answers if answer is not None]
    return Report(key=key, targets=targets, answers=done, elapsed=elapsed)


def new_key() -> str:
    """Return a fresh API key, so that each run starts with a full
    bucket."""
    return "demo-" + secrets.token_hex(6)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of a load run (``--requests``, ``--concurrency``,
    ``--key``) to ``parser``."""
    parser.add_argument(
        "--requests", type=int, default=60,
        help="requests to send in all (default 60)",
    )
    parser.add_argument(
        "--concurrency", type=int, default=3,
        help="requests in flight at once (default 3)",
    )
    parser.add_argument(
        "--key", default=None,
        help="the API key to send (default: a new random key)",
    )


async def _main(args: argparse.Namespace) -> int:
    async with httpx.AsyncClient() as client:
        if args.wait > 0:
            await wait_until_ready(args.targets, args.wait, client)
        report = await send_load(
            args.targets,
            key=args.key or new_key(),
            requests=args.requests,
            concurrency=args.concurrency,
            client=client,
        )
    print(format_report(report), flush=True)
    return report.verdict()[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        description="Send one API key's requests round-robin to replicas "
        "and show that they share one limit."
    )
    parser.add_argument("targets", nargs="+", help="base URLs of the replicas")
    add_load_arguments(parser)
    parser.add_argument(
        "--wait", type=float, default=0.0,
        help="seconds to wait for every replica's /health first (default 0)",
    )
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_main(args))
    except (InvalidInputError, TimeoutError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
