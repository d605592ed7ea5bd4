"""The built wheel works on its own: scripts ship inside it."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import asyncio, sys
from pactown_redis import SecurityPolicy

async def main(url):
    async with SecurityPolicy.from_url(
        url, namespace="wheel", cpu_threshold=None, memory_threshold=None
    ) as policy:
        allowed = [(await policy.check_rate_limit("w")).allowed
                   for _ in range(21)]
        start = await policy.check_can_start_service("w", "s")
        print(sum(allowed), start.allowed, start.fence > 0)

asyncio.run(main(sys.argv[1]))
"""


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_wheel_installed_alone_makes_decisions(tmp_path, redis_server):
    """A wheel in a fresh virtual environment decides against real Redis."""
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
        "-w", str(dist), str(ROOT))
    (wheel,) = dist.glob("pactown_redis-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pactown_redis/lua/rate_limit.lua" in names
    assert "pactown_redis/py.typed" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    run(str(python), "-m", "pip", "install", "--quiet",
        "--disable-pip-version-check", str(wheel))
    redis_server.client().flushall()
    # Run from an empty folder so the checkout cannot be imported instead.
    out = run(str(python), "-c", PROGRAM, redis_server.url, cwd=tmp_path)
    assert out.split() == ["20", "True", "True"]
