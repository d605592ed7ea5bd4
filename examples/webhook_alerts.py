"""Forward high and critical anomalies to a webhook, at least once.

    pip install 'pactown-redis[alerts]'
    export PACTOWN_WEBHOOK_URL=https://alerts.example.com/hooks/pactown
    python examples/webhook_alerts.py --redis-url redis://127.0.0.1:6379/0

Each high or critical anomaly is POSTed as one JSON object: the event's
fields (``timestamp``, ``anomaly_type``, ``user_id``, ``service_id``,
``details``, ``severity``, ``metadata``) and ``id``, its stream id, which
is also sent as the ``Idempotency-Key`` header: a receiver may get an
alert twice and can drop the second. Lower severities are acknowledged
without a request.

A POST gets ``--timeout`` seconds and ``--retries`` more attempts after a
network error or a 408/425/429/5xx answer. An alert that still fails stays
pending in the consumer group: it is tried again after ``--claim-idle-ms``
and, after ``--max-deliveries`` attempts, moved to the dead-letter stream
``<namespace>:anomalies:dead``.

Run as many copies as you like with the same ``--group``: each alert is
sent by one of them. ``--drain`` sends what is waiting and exits, for a
cron job or a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any, Optional

import httpx

from pactown_redis import AnomalyConsumer, AnomalyEvent, Severity

ALERT_SEVERITIES = frozenset({Severity.HIGH, Severity.CRITICAL})
#: Answers worth another attempt: the receiver is busy or briefly down.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class WebhookError(Exception):
    """The webhook did not take an alert; the entry stays pending."""


class WebhookForwarder:
    """A consumer handler that POSTs alert-worthy events to ``url``.

    Args:
        http: the client to send with; its timeout bounds each attempt.
        url: the webhook.
        retries: attempts after the first one, for retryable failures.
        backoff: seconds before the first retry, doubled for each next.

    Raises:
        WebhookError: from a call, when no attempt succeeded.
    """

    def __init__(
        self, http: httpx.AsyncClient, url: str, *, retries: int, backoff: float
    ) -> None:
        self.http = http
        self.url = url
        self.retries = retries
        self.backoff = backoff

    async def __call__(self, event: AnomalyEvent, entry_id: str) -> None:
        if event.severity not in ALERT_SEVERITIES:
            return
        body = {"id": entry_id, **event.to_dict()}
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = await self.http.post(
                    self.url, json=body, headers={"Idempotency-Key": entry_id}
                )
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.is_success:
                return
            problem = f"HTTP {response.status_code}"
            if response.status_code not in RETRY_STATUSES:
                break
        raise WebhookError(f"webhook refused alert {entry_id}: {problem}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Return the options, taking URLs from the environment if not given;
    exit with status 2 when no webhook URL is known."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("PACTOWN_REDIS_URL")
        or os.environ.get("REDIS_URL")
        or "redis://127.0.0.1:6379/0",
        help="default: $PACTOWN_REDIS_URL, $REDIS_URL, then local Redis",
    )
    parser.add_argument(
        "--webhook-url",
        default=os.environ.get("PACTOWN_WEBHOOK_URL"),
        help="where alerts are POSTed; default: $PACTOWN_WEBHOOK_URL",
    )
    parser.add_argument("--namespace", default="pactown")
    parser.add_argument("--group", default="pactown-webhook")
    parser.add_argument("--consumer", default=None)
    parser.add_argument(
        "--start-id",
        choices=("$", "0"),
        default="$",
        help="for a new group: '$' new events only, '0' all retained ones",
    )
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds per POST attempt")
    parser.add_argument("--retries", type=int, default=3)
    parser.add_argument("--backoff", type=float, default=0.5,
                        help="seconds before the first retry, then doubled")
    parser.add_argument("--block-ms", type=int, default=1000)
    parser.add_argument("--claim-idle-ms", type=int, default=30_000)
    parser.add_argument("--max-deliveries", type=int, default=5)
    parser.add_argument("--drain", action="store_true",
                        help="send what is waiting, then exit")
    args = parser.parse_args(argv)
    if not args.webhook_url:
        parser.error("--webhook-url or PACTOWN_WEBHOOK_URL is required")
    if args.timeout <= 0 or args.retries < 0 or args.backoff < 0:
        parser.error("--timeout must be > 0, --retries and --backoff >= 0")
    return args


async def forward(args: argparse.Namespace, redis: Any = None) -> None:
    """Send alerts until stopped (SIGINT, SIGTERM), or with ``--drain``
    until a cycle finds nothing more to send; ``redis`` replaces
    ``--redis-url`` with a client of the caller's."""
    async with httpx.AsyncClient(timeout=args.timeout) as http:
        forwarder = WebhookForwarder(
            http, args.webhook_url, retries=args.retries, backoff=args.backoff
        )
        consumer = AnomalyConsumer(
            args.redis_url if redis is None else redis,
            forwarder,
            namespace=args.namespace,
            group=args.group,
            consumer=args.consumer,
            block_ms=args.block_ms,
            claim_idle_ms=args.claim_idle_ms,
            max_deliveries=args.max_deliveries,
            start_id=args.start_id,
        )
        async with consumer:
            if args.drain:
                while await consumer.run_once():
                    pass
                return
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, consumer.stop)
            await consumer.run()


def main(argv: Optional[list[str]] = None) -> int:
    asyncio.run(forward(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
