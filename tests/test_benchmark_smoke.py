"""benchmarks/compare.py runs end to end in its smoke size.

The run starts its own redis-server and measures every library; these tests
read what it wrote. They check shape and counts, never timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pactown_redis import SecurityPolicy

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "benchmarks" / "compare.py"
MEASURED = ("pactown", "limits", "throttled", "pyrate", "rrl", "floor")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], Path]:
    """The report of one smoke run, and the folder it was written to."""
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(COMPARE), "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "latest.json").read_text()), out


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in report["rows"]}


def test_every_library_has_a_row_with_decisions(
    smoke: tuple[dict, Path],
) -> None:
    """pactown, the four peers and the floor each made decisions in every
    cell, and the ceiling measured a positive rate."""
    report, _ = smoke
    by_key = rows(report)
    for key in MEASURED:
        row = by_key[key]
        assert "error" not in row, (key, row.get("error"))
        assert [c["tasks"] for c in row["cells"]] == [1, 16]
        for cell in row["cells"]:
            assert cell["decisions"] > 0 and cell["per_second"] > 0, key
    assert report["ceiling"]["per_second"] > 0


def test_every_decision_was_allowed(smoke: tuple[dict, Path]) -> None:
    """The limits are configured so that no library denies or defers a
    decision, and pactown made none without Redis."""
    report, _ = smoke
    for key in (*MEASURED, "pactown-start"):
        row = rows(report)[key]
        assert row["denied"] == 0, key
        assert row["degraded"] == 0, key


def test_pactown_sends_one_command_per_rate_decision(
    smoke: tuple[dict, Path],
) -> None:
    """In the steady state check_rate_limit sends exactly one EVALSHA per
    decision and loads no script."""
    report, _ = smoke
    sent = rows(report)["pactown"]["sent"]
    assert sent["per_decision"] == 1.0
    assert sent["script_loads"] == 0
    assert sent["by_command"] == {"EVALSHA": sent["decisions"]}


def test_batch_row_matches_the_api(smoke: tuple[dict, Path]) -> None:
    """check_many is measured when the policy has it, and reported as an
    error row naming it when it does not."""
    report, _ = smoke
    row = rows(report)["pactown-batch"]
    if hasattr(SecurityPolicy, "check_many"):
        assert "error" not in row, row.get("error")
        assert all(c["per_second"] > 0 for c in row["cells"])
        assert row["sent"]["script_loads"] == 0
    else:
        assert "check_many" in row["error"]


def test_commandstats_counts_script_calls(smoke: tuple[dict, Path]) -> None:
    """The run confirmed that Redis counts a script's own commands, and
    pactown's rate script runs more commands than the client sends."""
    report, _ = smoke
    assert report["commandstats_counts_script_calls"] is True
    pactown = rows(report)["pactown"]
    assert pactown["executed"] > pactown["sent"]["per_decision"]


def test_memory_per_tenant_for_every_rate_limiter(
    smoke: tuple[dict, Path],
) -> None:
    """Each rate limiter's memory phase allowed every request and left
    keys behind for its tenants."""
    report, _ = smoke
    memory = {entry["key"]: entry for entry in report["memory"]}
    assert set(memory) == {"pactown", "limits", "throttled", "pyrate", "rrl"}
    for key, entry in memory.items():
        assert "error" not in entry, (key, entry.get("error"))
        assert entry["allowed"] == entry["requests"] == 10 * entry["tenants"]
        assert entry["degraded"] == 0, key
        assert entry["keys_at_once"] >= 1, key
        assert entry["key_bytes"], key


def test_markdown_and_chart_are_written(smoke: tuple[dict, Path]) -> None:
    """The Markdown report names the command and every library; the chart
    is a PNG."""
    report, out = smoke
    text = (out / "latest.md").read_text()
    assert report["command"] in text
    for row in report["rows"]:
        assert row["title"] in text
    assert (out / "latest.png").read_bytes()[:8] == PNG_SIGNATURE
