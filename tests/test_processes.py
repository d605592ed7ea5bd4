"""Replicas in separate OS processes share one user's limits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis

WORKER = Path(__file__).with_name("process_worker.py")


def server_seconds(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


@pytest.mark.slow
def test_two_processes_share_one_free_user(redis_server):
    """Two processes together get one FREE user's 20 requests and 2 slots."""
    client = redis_server.client()
    client.flushall()
    began = server_seconds(client)
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), redis_server.url, "shared", tag,
             "40", "3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    outputs = [json.loads(w.communicate(timeout=60)[0]) for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    elapsed = server_seconds(client) - began

    requests = sum(o["requests"] for o in outputs)
    # The bucket starts full (20) and refills one token every 3 s.
    assert 20 <= requests <= 20 + int(elapsed / 3) + 1
    fences = [f for o in outputs for f in o["starts"]]
    assert len(fences) == 2 and len(set(fences)) == 2
    assert client.zcard("pactown:{shared}:svc") == 2
