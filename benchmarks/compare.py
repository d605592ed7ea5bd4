"""pactown-redis side by side with four peer rate limiters, in one run.

Run from the repository root with the ``bench`` extra installed
(``scripts/setup.sh`` installs it)::

    .venv/bin/python benchmarks/compare.py              # about 8 minutes
    .venv/bin/python benchmarks/compare.py --smoke      # under 40 s
    .venv/bin/python benchmarks/compare.py --only pactown limits floor

It starts one private ``redis-server`` (no persistence) through
``tests/servers.py`` and measures, for pactown-redis's rate-limit, start
and batch decisions, for ``limits``, ``throttled-py``, ``pyrate-limiter``
and ``redis-rate-limiters`` configured as per-user limits of R requests
per minute (see ``peers.py`` for how each is configured and why), and for
the client's floor (a bare ``EVALSHA`` of ``return 1``):

- decisions per second at 1, 16, 64 and 256 asyncio tasks in one process,
  and with 2 processes of 64 tasks each (summed), every decision allowed;
- p50 and p99 latency of a decision at each of those;
- Redis commands per decision: sent by the client (counted in a short
  ``MONITOR`` phase, lines not marked ``lua``), executed in all (deltas of
  ``INFO commandstats``, which counts the commands scripts call too: the
  run checks that and records it), and script loads in the steady state;
- client CPU seconds per decision (``time.process_time``);
- Redis memory per tenant after 10 000 tenants each made 10 requests of a
  60-per-minute limit: ``used_memory`` growth right away and after an idle
  pause, and ``MEMORY USAGE`` of a sample of each kind of key.

The server's ceiling is ``redis-benchmark`` (50 clients, random tenants)
running ``EVALSHA`` of pactown-redis's own ``rate_limit.lua``, one call per
round trip and, as a second line, ``--batch`` calls per round trip.

Every figure also appears as a ratio to the best peer of the same run.
Results go to ``benchmarks/results/`` (``--out``): ``latest.json``,
``latest.md`` and ``latest.png``. ``--profile`` instead writes a
pyinstrument report of ``check_rate_limit`` at 64 tasks to
``profile.txt`` there.

Client and server share the machine; the report records its cores and
load. Throughput here is the client's limit as much as the server's: a
Python process drives one event loop on one core.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import io
import itertools
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import redis.asyncio as aredis

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for path in (ROOT, ROOT / "tests", BENCH):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import peers  # noqa: E402
from pactown_redis import UserTier  # noqa: E402
from pactown_redis import _core, _outcomes  # noqa: E402
from pactown_redis.scripts import script  # noqa: E402

#: Order of rows; the ceiling is measured by redis-benchmark, not here.
ROWS = (*peers.CONTENDERS, "ceiling")
PEERS = ("limits", "throttled", "pyrate", "rrl")
MEMORY_ROWS = ("pactown", *PEERS)

#: Per-tenant limit of the throughput phases, requests per minute: far
#: more than any tenant asks for in a run, so every decision is allowed.
THROUGHPUT_RPM = 1_000_000
#: The memory phase: each tenant makes MEMORY_REQUESTS requests, one after
#: the other, of a MEMORY_RPM limit (pactown's FREE tier, so no profile is
#: stored): half a bucket spent, which takes 30 s to refill, longer than
#: any library needs to serve all the tenants, so every tenant holds its
#: state when it is measured.
MEMORY_RPM = 20
MEMORY_REQUESTS = 10
#: Keys sampled with MEMORY USAGE, per kind of key.
MEMORY_SAMPLE = 100

MONITOR_TASKS = 16
CEILING_CLIENTS = 50
PROCESS_TASKS = 64
PROCESSES = 2

_MONITOR_LINE = re.compile(r'^\d+\.\d+ \[\d+ (\S+)\] "([^"]*)"(?: "([^"]*)")?')


# -- measuring one cell -------------------------------------------------------


@dataclass
class Cell:
    """One contender at one concurrency.

    ``p50_ms`` and ``p99_ms`` are of one call (a ``check_many`` call's
    latency is each of its decisions'); ``cpu_us`` is client CPU per
    decision; ``executed`` is Redis commands run per decision, from
    ``INFO commandstats``, and ``commands`` their calls by name.
    """

    tasks: int
    processes: int
    seconds: float
    decisions: int
    allowed: int
    per_second: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    executed: Optional[float] = None
    commands: dict[str, int] = field(default_factory=dict)


def percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def drive(
    contender: peers.Contender,
    tasks: int,
    seconds: float,
    *,
    calls: Optional[int] = None,
    first: int = 0,
) -> tuple[int, int, list[float], float, float]:
    """Run ``tasks`` tasks making calls until ``seconds`` pass (or, with
    ``calls``, until that many calls were made).

    Returns decisions, allowed decisions, call latencies in seconds, wall
    seconds and CPU seconds of this process.
    """
    numbers = itertools.count(first)
    per_call = contender.per_call
    latencies: list[float] = []
    allowed = 0
    made = 0
    late = contender.late
    stop = False
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal allowed, made
        while not stop and (calls is None or made < calls):
            made += 1
            n = next(numbers) * per_call
            began = clock()
            # Awaited first: ``allowed += await ...`` would read ``allowed``
            # before the await and lose the other tasks' counts.
            ok = await contender.step(n)
            latencies.append(clock() - began)
            allowed += ok

    cpu = time.process_time()
    began = clock()
    running = [asyncio.ensure_future(worker()) for _ in range(tasks)]
    if calls is None:
        await asyncio.sleep(seconds)
        stop = True
    await asyncio.gather(*running)
    wall = clock() - began
    cpu = time.process_time() - cpu
    decisions = len(latencies) * per_call
    return decisions, allowed - (contender.late - late), latencies, wall, cpu


async def command_stats(admin: aredis.Redis) -> dict[str, int]:
    """Calls per command so far, without INFO itself."""
    stats = await admin.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(entry["calls"])
        for name, entry in stats.items()
        if name != "cmdstat_info"
    }


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    changed = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(changed.items()) if v}


async def measure_cell(
    contender: peers.Contender,
    admin: aredis.Redis,
    tasks: int,
    seconds: float,
) -> Cell:
    """Warm up at ``tasks`` (connections open, scripts cached), then
    measure for ``seconds``."""
    await drive(contender, tasks, max(0.05, seconds / 10))
    before = await command_stats(admin)
    decisions, allowed, latencies, wall, cpu = await drive(
        contender, tasks, seconds
    )
    commands = delta(await command_stats(admin), before)
    return Cell(
        tasks=tasks,
        processes=1,
        seconds=wall,
        decisions=decisions,
        allowed=allowed,
        per_second=decisions / wall,
        p50_ms=percentile(latencies, 0.5) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        cpu_us=cpu / decisions * 1e6,
        executed=sum(commands.values()) / decisions,
        commands=commands,
    )


# -- commands a client sends: a short MONITOR phase ---------------------------


@dataclass
class Sent:
    """What one contender's client sent in the steady state."""

    decisions: int
    per_decision: float
    script_loads: int
    by_command: dict[str, int]


async def monitor_phase(
    contender: peers.Contender,
    admin: aredis.Redis,
    server: Any,
    calls: int,
) -> Sent:
    """Count the commands the contender's client sends for ``calls`` calls
    at ``MONITOR_TASKS`` tasks, after a warm-up at the same concurrency.

    ``redis-cli monitor`` records every command the server receives; lines
    marked ``lua`` are commands a script called, which the client never
    sent. Two ``ECHO`` markers from the harness bracket the phase.
    """
    await drive(contender, MONITOR_TASKS, 0, calls=calls)
    log = server.dir / f"monitor-{contender.key}.log"
    with open(log, "wb") as out:
        watcher = subprocess.Popen(
            ["redis-cli", "-h", server.host, "-p", str(server.port), "monitor"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        await _wait_for_text(log, "OK", watcher)
        marker = f"bench-monitor-{time.monotonic_ns()}"
        await admin.echo(marker + "-start")
        decisions, *_ = await drive(contender, MONITOR_TASKS, 0, calls=calls)
        await admin.echo(marker + "-end")
        await _wait_for_text(log, marker + "-end", watcher)
    finally:
        watcher.terminate()
        watcher.wait(10)

    by_command: dict[str, int] = {}
    inside = False
    for line in log.read_text(errors="replace").splitlines():
        if marker + "-start" in line:
            inside = True
            continue
        if marker + "-end" in line:
            break
        match = _MONITOR_LINE.match(line)
        if not inside or match is None or match.group(1) == "lua":
            continue
        name = match.group(2).upper()
        if name in ("SCRIPT", "CLIENT", "FUNCTION") and match.group(3):
            name += " " + match.group(3).upper()
        by_command[name] = by_command.get(name, 0) + 1
    log.unlink()
    loads = by_command.get("SCRIPT LOAD", 0) + by_command.get("EVAL", 0)
    return Sent(
        decisions=decisions,
        per_decision=sum(by_command.values()) / decisions,
        script_loads=loads,
        by_command=dict(sorted(by_command.items())),
    )


async def _wait_for_text(
    path: Path, text: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 10
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None:
            raise RuntimeError(f"redis-cli monitor exited: {path.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} never reached the MONITOR log")
        await asyncio.sleep(0.02)


async def commandstats_counts_script_calls(admin: aredis.Redis) -> bool:
    """Whether ``INFO commandstats`` counts a command a script calls (it
    does since Redis 2.6; checked rather than assumed)."""
    before = await command_stats(admin)
    await admin.eval(
        "redis.call('SET', KEYS[1], '1', 'PX', 1000) return 1",
        1,
        "bench-verify",
    )
    changes = delta(await command_stats(admin), before)
    return changes.get("set") == 1 and changes.get("eval") == 1


# -- two processes ------------------------------------------------------------


async def two_processes(
    key: str, setup: peers.Setup, seconds: float
) -> Cell:
    """Run ``PROCESSES`` worker processes at ``PROCESS_TASKS`` tasks each,
    started together once all are warm; decisions per second are summed,
    latency percentiles are the workers' worst."""
    command = [
        sys.executable, __file__, "--worker", key,
        "--url", setup.url,
        "--tenants", str(setup.tenants),
        "--rpm", str(setup.rpm),
        "--batch", str(setup.batch),
        "--seconds", str(seconds),
    ]
    workers = [
        await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        for _ in range(PROCESSES)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise RuntimeError(f"worker for {key} failed: {line!r}")
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        results = []
        for worker in workers:
            out, _ = await asyncio.wait_for(worker.communicate(), 60 + seconds)
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    decisions = sum(r["decisions"] for r in results)
    cpu = sum(r["cpu"] for r in results)
    return Cell(
        tasks=PROCESS_TASKS,
        processes=PROCESSES,
        seconds=max(r["wall"] for r in results),
        decisions=decisions,
        allowed=sum(r["allowed"] for r in results),
        per_second=sum(r["decisions"] / r["wall"] for r in results),
        p50_ms=max(r["p50_ms"] for r in results),
        p99_ms=max(r["p99_ms"] for r in results),
        cpu_us=cpu / decisions * 1e6,
    )


async def worker_main(args: argparse.Namespace) -> None:
    """One process of :func:`two_processes`: warm up, say ``ready``, wait
    for ``go`` on stdin, measure, print one JSON line."""
    setup = peers.Setup(
        url=args.url, rpm=args.rpm, tenants=args.tenants, batch=args.batch,
        store_profiles=False,
    )
    contender = peers.make(args.worker, setup)
    await contender.open()
    try:
        await drive(contender, PROCESS_TASKS, max(0.05, args.seconds / 10))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(
            None, sys.stdin.readline
        )
        decisions, allowed, latencies, wall, cpu = await drive(
            contender, PROCESS_TASKS, args.seconds, first=os.getpid()
        )
    finally:
        await contender.close()
    print(json.dumps({
        "decisions": decisions,
        "allowed": allowed,
        "wall": wall,
        "cpu": cpu,
        "p50_ms": percentile(latencies, 0.5) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }), flush=True)


# -- memory -------------------------------------------------------------------


@dataclass
class Memory:
    """Redis memory a contender holds for ``tenants`` tenants."""

    tenants: int
    requests: int
    allowed: int
    at_once: float
    idle: float
    idle_seconds: float
    keys_at_once: float
    keys_idle: float
    key_bytes: dict[str, float]
    key_counts: dict[str, int]
    key_counts_idle: dict[str, int]
    populate_seconds: float
    degraded: int


def key_kind(key: str) -> str:
    """The key with its tenant as ``*`` and any hexadecimal id (a request
    id in a key name) as ``<id>``, so that keys of one kind group."""
    key = re.sub(r"tenant-\d+", "*", key)
    return re.sub(r"(?<=:)[0-9a-f]{8,}(?=:|$)", "<id>", key)


async def key_census(
    admin: aredis.Redis, sizes: bool = True
) -> tuple[dict[str, int], dict[str, float]]:
    """Count every key by kind; with ``sizes``, ``MEMORY USAGE`` of up to
    ``MEMORY_SAMPLE`` keys of each kind (mean bytes)."""
    counts: dict[str, int] = {}
    sample: dict[str, list[str]] = {}
    async for raw in admin.scan_iter(count=5000):
        key = raw.decode() if isinstance(raw, bytes) else raw
        kind = key_kind(key)
        counts[kind] = counts.get(kind, 0) + 1
        picked = sample.setdefault(kind, [])
        if sizes and len(picked) < MEMORY_SAMPLE:
            picked.append(key)
    means: dict[str, float] = {}
    for kind, keys in sample.items():
        if not keys:
            continue
        pipe = admin.pipeline(transaction=False)
        for key in keys:
            pipe.memory_usage(key, samples=0)
        found = [int(v) for v in await pipe.execute() if v is not None]
        if found:
            means[kind] = statistics.fmean(found)
    return dict(sorted(counts.items())), dict(sorted(means.items()))


async def census_apart(
    url: str, sizes: bool = True
) -> tuple[dict[str, int], dict[str, float]]:
    """:func:`key_census` on a connection of its own, closed at the end,
    so that its buffers never count in a later ``used_memory`` reading."""
    reader = aredis.from_url(url, protocol=3)
    try:
        return await key_census(reader, sizes)
    finally:
        await reader.aclose()


async def used_memory(admin: aredis.Redis) -> int:
    return int((await admin.info("memory"))["used_memory"])


async def settle(admin: aredis.Redis) -> None:
    """Wait until the harness's is the only client connection, so that no
    other client's buffers are in ``used_memory``.

    Raises:
        TimeoutError: other clients stayed connected for 10 s.
    """
    deadline = time.monotonic() + 10
    while int((await admin.info("clients"))["connected_clients"]) > 1:
        if time.monotonic() > deadline:
            raise TimeoutError("other clients stay connected to the server")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)


async def measure_memory(
    key: str, url: str, admin: aredis.Redis, tenants: int, idle: float
) -> Memory:
    """Empty the server, let each of ``tenants`` tenants make
    ``MEMORY_REQUESTS`` requests in a row of a ``MEMORY_RPM`` limit
    (pactown's tenants get the FREE tier's 20 per minute without a stored
    profile), close the contender's clients, and read the growth of
    ``used_memory`` at once and after ``idle`` seconds."""
    await admin.flushall()
    await admin.script_flush()
    await settle(admin)
    baseline = await used_memory(admin)

    setup = peers.Setup(
        url=url, rpm=MEMORY_RPM, tenants=tenants, store_profiles=False,
        repeat=MEMORY_REQUESTS, pactown_timeout=None,
    )
    contender = peers.make(key, setup)
    await contender.open()
    try:
        requests = tenants * MEMORY_REQUESTS
        decisions, allowed, _, populate, _ = await drive(
            contender, 64, 0, calls=requests
        )
        degraded = getattr(contender, "degraded", 0)
    finally:
        await contender.close()
    await settle(admin)
    at_once = await used_memory(admin) - baseline
    keys_at_once = await admin.dbsize()
    counts, sizes = await census_apart(url)
    await asyncio.sleep(idle)
    await settle(admin)
    idle_growth = await used_memory(admin) - baseline
    keys_idle = await admin.dbsize()
    counts_idle, _ = await census_apart(url, sizes=False)
    await admin.flushall()
    return Memory(
        tenants=tenants,
        requests=decisions,
        allowed=allowed,
        at_once=at_once / tenants,
        idle=idle_growth / tenants,
        idle_seconds=idle,
        keys_at_once=keys_at_once / tenants,
        keys_idle=keys_idle / tenants,
        key_bytes=sizes,
        key_counts=counts,
        key_counts_idle=counts_idle,
        populate_seconds=populate,
        degraded=degraded,
    )


# -- the ceiling: redis-benchmark ---------------------------------------------


def ceiling_command(
    server: Any, tenants: int, requests: int, pipeline: int = 1
) -> list[str]:
    """redis-benchmark running ``rate_limit.lua`` by SHA as a policy whose
    tenants have no stored profile and the ADMIN tier by default would:
    a random tenant out of ``tenants`` per call (each ``__rand_int__`` is
    drawn on its own, so the profile and bucket keys of one call belong to
    different tenants, which a script does not mind on one server);
    ``pipeline`` calls per round trip."""
    rules = _outcomes.make_rules(
        namespace="bench-ceiling",
        default_rate_limit=60,
        lease_ttl=30.0,
        start_burst=10,
        stream_maxlen=10_000,
        default_tier=UserTier.ADMIN,
        rapid_restart_threshold=5,
        clock=None,
    )
    call = _core.rate_limit_call(rules, "__rand_int__", 1)
    program = shutil.which("redis-benchmark") or "redis-benchmark"
    return [
        program,
        "-h", server.host,
        "-p", str(server.port),
        "-c", str(CEILING_CLIENTS),
        "-n", str(requests),
        "-r", str(tenants),
        "-P", str(pipeline),
        "--csv",
        "EVALSHA", *[str(a) for a in call.evalsha_args()],
    ]


def run_redis_benchmark(command: list[str]) -> dict[str, float]:
    """Run redis-benchmark; return its CSV row as numbers.

    Raises:
        RuntimeError: it failed or printed no CSV row.
    """
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    if done.returncode != 0 or not rows:
        raise RuntimeError(
            f"redis-benchmark failed ({done.returncode}): "
            f"{done.stdout[-500:]} {done.stderr[-500:]}"
        )
    row = rows[-1]
    return {k: float(v) for k, v in row.items() if k != "test"}


async def measure_ceiling(
    server: Any,
    admin: aredis.Redis,
    tenants: int,
    seconds: float,
    pipeline: int = 1,
) -> dict[str, Any]:
    """Load the script, calibrate with a short run, then run for about
    ``seconds``; executed commands per call come from commandstats."""
    await admin.script_load(script("rate_limit.lua").source)
    loop = asyncio.get_running_loop()
    probe = await loop.run_in_executor(
        None,
        run_redis_benchmark,
        ceiling_command(server, tenants, 5000, pipeline),
    )
    requests = max(5000, int(probe["rps"] * seconds))
    command = ceiling_command(server, tenants, requests, pipeline)
    before = await command_stats(admin)
    row = await loop.run_in_executor(None, run_redis_benchmark, command)
    commands = delta(await command_stats(admin), before)
    shown = [
        Path(command[0]).name,
        *command[1:command.index("EVALSHA") + 2],
        "...",
    ]
    return {
        "per_second": row["rps"],
        "p50_ms": row["p50_latency_ms"],
        "p99_ms": row["p99_latency_ms"],
        "requests": requests,
        "executed": sum(commands.values()) / requests,
        "commands": commands,
        "command": shlex.join(shown),
        "pipeline": pipeline,
    }


# -- one contender ------------------------------------------------------------


async def measure_contender(
    key: str,
    args: argparse.Namespace,
    server: Any,
    admin: aredis.Redis,
) -> dict[str, Any]:
    setup = peers.Setup(
        url=server.url, rpm=THROUGHPUT_RPM, tenants=args.tenants,
        batch=args.batch,
    )
    contender = peers.make(key, setup)
    row: dict[str, Any] = {
        "key": key,
        "title": contender.title,
        "kind": contender.kind,
        "config": contender.config,
        "per_call": contender.per_call,
    }
    try:
        await contender.open()
    except peers.MissingFeature as exc:
        row["error"] = str(exc)
        return row
    try:
        sent = await monitor_phase(contender, admin, server, args.monitor_calls)
        cells = []
        errors: dict[str, str] = {}
        for tasks in args.concurrency:
            try:
                cell = await measure_cell(
                    contender, admin, tasks, args.seconds
                )
            except Exception as exc:  # noqa: BLE001 - reported as the cell
                errors[f"{tasks}x1"] = f"{type(exc).__name__}: {exc}"
                print(f"  {key:14} {tasks:4} tasks {exc!r}", file=sys.stderr)
                continue
            cells.append(cell)
            print(
                f"  {key:14} {tasks:4} tasks {cell.per_second:10,.0f}/s",
                file=sys.stderr,
            )
        degraded = getattr(contender, "degraded", 0)
    finally:
        await contender.close()
    if args.processes:
        tag = f"{PROCESS_TASKS}x{PROCESSES}"
        try:
            cells.append(await two_processes(key, setup, args.seconds))
            print(
                f"  {key:14} {tag} tasks {cells[-1].per_second:10,.0f}/s",
                file=sys.stderr,
            )
        except Exception as exc:  # noqa: BLE001 - reported as the cell
            errors[tag] = f"{type(exc).__name__}: {exc}"
    if not cells:
        row["error"] = "; ".join(errors.values())
        return row
    row["errors"] = errors
    row["sent"] = asdict(sent)
    row["cells"] = [asdict(c) for c in cells]
    decisions = sum(c.decisions for c in cells)
    row["denied"] = decisions - sum(c.allowed for c in cells)
    row["degraded"] = degraded
    local = [c for c in cells if c.executed is not None]
    row["executed"] = sum(
        c.executed * c.decisions for c in local  # type: ignore[operator]
    ) / sum(c.decisions for c in local)
    row["cpu_us"] = sum(c.cpu_us * c.decisions for c in local) / sum(
        c.decisions for c in local
    )
    return row


# -- ratios, tables, chart ----------------------------------------------------


def cell_of(
    row: dict[str, Any], tasks: int, processes: int = 1
) -> Optional[dict[str, Any]]:
    """The cell of ``row`` at ``tasks`` tasks in ``processes`` processes."""
    for cell in row.get("cells", ()):
        if cell["tasks"] == tasks and cell["processes"] == processes:
            return dict(cell)
    return None


def columns(args: argparse.Namespace) -> list[tuple[int, int]]:
    cols = [(t, 1) for t in args.concurrency]
    if args.processes:
        cols.append((PROCESS_TASKS, PROCESSES))
    return cols


def add_ratios(report: dict[str, Any], cols: list[tuple[int, int]]) -> None:
    """Give every figure a ratio to the best peer of the run: the most
    decisions per second, the least latency, commands, CPU and memory."""
    rows = [r for r in report["rows"] if "error" not in r]
    peer_rows = [r for r in rows if r["key"] in PEERS]
    best: dict[str, float] = {}

    def record(name: str, values: list[float], higher: bool) -> None:
        values = [v for v in values if v is not None and not math.isnan(v)]
        if values:
            best[name] = max(values) if higher else min(values)

    for tasks, procs in cols:
        tag = f"{tasks}x{procs}"
        for metric, higher in (
            ("per_second", True), ("p50_ms", False), ("p99_ms", False)
        ):
            record(
                f"{metric}@{tag}",
                [
                    c[metric] for r in peer_rows
                    if (c := cell_of(r, tasks, procs)) is not None
                ],
                higher,
            )
    for metric in ("executed", "cpu_us"):
        record(metric, [r[metric] for r in peer_rows], False)
    record("sent", [r["sent"]["per_decision"] for r in peer_rows], False)
    memory = [m for m in report["memory"] if "error" not in m]
    for metric in ("at_once", "idle"):
        record(
            f"memory_{metric}",
            [m[metric] for m in memory if m["key"] in PEERS],
            False,
        )
    report["best_peer"] = best

    def ratio(value: Optional[float], name: str) -> Optional[float]:
        if value is None or name not in best or not best[name]:
            return None
        return value / best[name]

    for row in rows:
        for cell in row["cells"]:
            tag = f"{cell['tasks']}x{cell['processes']}"
            cell["ratio"] = {
                m: ratio(cell[m], f"{m}@{tag}")
                for m in ("per_second", "p50_ms", "p99_ms")
            }
        row["ratio"] = {
            "executed": ratio(row["executed"], "executed"),
            "cpu_us": ratio(row["cpu_us"], "cpu_us"),
            "sent": ratio(row["sent"]["per_decision"], "sent"),
        }
    for entry in memory:
        entry["ratio"] = {
            m: ratio(entry[m], f"memory_{m}") for m in ("at_once", "idle")
        }
    ceiling = report.get("ceiling")
    if ceiling and "error" not in ceiling:
        top = [
            c["per_second"] for r in peer_rows for c in r["cells"]
        ]
        for entry in (ceiling, ceiling["pipelined"]):
            entry["ratio"] = {
                "per_second": entry["per_second"] / max(top) if top else None,
            }


def fmt(value: Optional[float], digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def with_ratio(
    value: Optional[float], ratio: Optional[float], digits: int = 0
) -> str:
    text = fmt(value, digits)
    if ratio is None or value is None:
        return text
    return f"{text} ({ratio:.2f}×)"


def markdown(report: dict[str, Any], cols: list[tuple[int, int]]) -> str:
    machine = report["machine"]
    lines = [
        "# pactown-redis and its peers, side by side",
        "",
        f"Made by `{report['command']}` on {report['date']}, at commit "
        f"{report['revision']}.",
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), "
        f"Python {machine['python']}, redis-server {machine['redis']}, "
        f"redis-py {machine['redis_py']} with hiredis "
        f"{machine['hiredis']}, RESP3; load average "
        f"{machine['load_before']:.2f} before, {machine['load_after']:.2f} "
        f"after. Client and server share the machine.",
        "",
        f"Throughput: {report['seconds']} s per cell after a warm-up, "
        f"decisions spread over {report['tenants']:,} tenants, each with a "
        f"limit of {THROUGHPUT_RPM:,} requests per minute so that every "
        f"decision is allowed. Ratios in brackets are to the best of the "
        f"four peers in this run (higher is better for decisions/s, lower "
        f"for everything else).",
        "",
        "## Decisions per second",
        "",
    ]
    heads = [
        f"{t} task{'s' if t > 1 else ''}" if p == 1 else f"{p} procs × {t}"
        for t, p in cols
    ]
    lines.append("| | " + " | ".join(heads) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    rows = report["rows"]
    for row in rows:
        if "error" in row:
            lines.append(
                f"| {row['title']} | " + " | ".join(["-"] * len(cols)) + " |"
            )
            continue
        cells = [cell_of(row, t, p) for t, p in cols]
        lines.append(
            f"| {row['title']} | "
            + " | ".join(
                with_ratio(c["per_second"], c["ratio"]["per_second"])
                if c else "-"
                for c in cells
            )
            + " |"
        )
    ceiling = report.get("ceiling")
    if ceiling and "error" not in ceiling:
        lines.append(
            f"| ceiling: redis-benchmark, {CEILING_CLIENTS} clients | "
            + " | ".join(
                [
                    with_ratio(
                        ceiling["per_second"], ceiling["ratio"]["per_second"]
                    )
                ]
                + ["″"] * (len(cols) - 1)
            )
            + " |"
        )
        piped = ceiling["pipelined"]
        lines.append(
            f"| ceiling, pipelined {piped['pipeline']} deep | "
            + " | ".join(
                [with_ratio(piped["per_second"], piped["ratio"]["per_second"])]
                + ["″"] * (len(cols) - 1)
            )
            + " |"
        )
    lines += ["", "## Latency of a decision, p50 / p99 (ms)", ""]
    lines.append("| | " + " | ".join(heads) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for row in rows:
        if "error" in row:
            continue
        cells = [cell_of(row, t, p) for t, p in cols]
        lines.append(
            f"| {row['title']} | "
            + " | ".join(
                f"{c['p50_ms']:.2f} / {c['p99_ms']:.2f} "
                f"({c['ratio']['p50_ms'] or 0:.2f}× / "
                f"{c['ratio']['p99_ms'] or 0:.2f}×)"
                if c else "-"
                for c in cells
            )
            + " |"
        )
    if ceiling and "error" not in ceiling:
        lines.append(
            f"| ceiling (redis-benchmark) | {ceiling['p50_ms']:.2f} / "
            f"{ceiling['p99_ms']:.2f} at {CEILING_CLIENTS} clients |"
            + " |" * (len(cols) - 1)
        )
    failed = [
        f"- {row['title']}, {tag} (tasks x processes): {error}"
        for row in rows
        for tag, error in row.get("errors", {}).items()
    ]
    if failed:
        lines += ["", "Cells that failed:", "", *failed]
    lines += [
        "",
        "A `check_many` call's latency is that of all its decisions. "
        f"With {PROCESSES} processes, the worse process's percentiles.",
        "",
        "## Redis commands and client CPU per decision",
        "",
        "| | sent by the client | script loads (steady state) "
        "| executed in Redis | client CPU µs | denied | degraded |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['title']} | {row['error']} | | | | | |")
            continue
        sent = row["sent"]
        lines.append(
            f"| {row['title']} "
            f"| {with_ratio(sent['per_decision'], row['ratio']['sent'], 2)} "
            f"| {sent['script_loads']} "
            f"| {with_ratio(row['executed'], row['ratio']['executed'], 2)} "
            f"| {with_ratio(row['cpu_us'], row['ratio']['cpu_us'], 0)} "
            f"| {row['denied']} | {row['degraded']} |"
        )
    if ceiling and "error" not in ceiling:
        lines.append(
            f"| ceiling (redis-benchmark) | 1.00 | 0 "
            f"| {ceiling['executed']:.2f} | - | | |"
        )
    lines += [
        "",
        f"Sent: `MONITOR` lines not marked `lua`, over "
        f"{report['monitor_calls']} calls at {MONITOR_TASKS} tasks after a "
        f"warm-up. Executed: deltas of `INFO commandstats` over the "
        f"single-process cells, which "
        + (
            "count the commands a script calls as well as the script "
            "(checked in this run: a script's `SET` was counted)"
            if report["commandstats_counts_script_calls"]
            else "did NOT count a script's own calls in this run"
        )
        + ". Client CPU: `time.process_time()` of the benchmark process "
        "per decision, harness included (the same for every row).",
        "",
        f"## Redis memory per tenant ({report['memory_tenants']:,} "
        f"tenants, {MEMORY_REQUESTS} requests each of a {MEMORY_RPM}/min "
        f"limit)",
        "",
        "| | `used_memory` growth / tenant, at once | after "
        "idle | keys / tenant, at once | after idle | `MEMORY USAGE` of a key, "
        "by kind (bytes) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    titles = {r["key"]: r["title"] for r in rows}
    for entry in report["memory"]:
        title = titles.get(entry["key"], entry["key"])
        if "error" in entry:
            lines.append(f"| {title} | {entry['error']} | | | | |")
            continue
        kinds = ", ".join(
            f"`{kind}` {entry['key_bytes'][kind]:.0f}"
            for kind in sorted(
                entry["key_bytes"], key=lambda k: -entry["key_counts"][k]
            )[:4]
        )
        lines.append(
            f"| {title} "
            f"| {with_ratio(entry['at_once'], entry['ratio']['at_once'])} "
            f"| {with_ratio(entry['idle'], entry['ratio']['idle'])} "
            f"| {entry['keys_at_once']:.2f} | {entry['keys_idle']:.2f} "
            f"| {kinds} |"
        )
    idle = report["memory"][0]["idle_seconds"] if report["memory"] else 0
    lines += [
        "",
        f"Growth of `used_memory` over an emptied server divided by the "
        f"tenants, read once the contender's connections were closed and "
        f"again {idle:g} s later. Each tenant's requests come one after "
        f"the other, and the limit's half-spent bucket takes 30 s to "
        f"refill. pactown runs with its default options here and its "
        f"tenants have no stored profile (the default FREE tier is 20 per "
        f"minute); a stored profile is configuration, kept until deleted.",
        "",
        "## How each library is configured",
        "",
    ]
    for row in rows:
        lines.append(f"- **{row['title']}**: {row['config']}")
    if ceiling:
        lines.append(
            f"- **ceiling**: `{ceiling.get('command', '')}` (the arguments "
            f"pactown's check_rate_limit sends, with random tenants; one "
            f"call per round trip, and "
            f"{report['batch']} per round trip for the pipelined line, as "
            f"check_many sends them)"
        )
    lines.append("")
    return "\n".join(lines)


def chart(
    report: dict[str, Any], cols: list[tuple[int, int]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{t}" if p == 1 else f"{p}×{t}\nprocs" for t, p in cols
    ]
    xs = list(range(len(cols)))
    figure, axes = plt.subplots(figsize=(9, 5.5))
    for row in report["rows"]:
        if "error" in row:
            continue
        ys = [
            c["per_second"] if (c := cell_of(row, t, p)) else math.nan
            for t, p in cols
        ]
        style: dict[str, Any] = {"marker": "o", "label": row["title"]}
        if row["kind"] == "floor":
            style.update(linestyle="--", color="grey")
        style["linewidth"] = 2.5 if row["kind"] == "pactown" else 1.5
        axes.plot(xs, ys, **style)
    ceiling = report.get("ceiling")
    if ceiling and "error" not in ceiling:
        axes.axhline(
            ceiling["per_second"], color="black", linestyle=":",
            label=f"ceiling: redis-benchmark, {CEILING_CLIENTS} clients",
        )
        piped = ceiling["pipelined"]
        axes.axhline(
            piped["per_second"], color="black", linestyle="-.",
            label=f"ceiling, pipelined {piped['pipeline']} deep",
        )
    axes.set_yscale("log")
    axes.set_xticks(xs, labels)
    axes.set_xlabel("concurrent asyncio tasks (one process unless marked)")
    axes.set_ylabel("decisions per second (log)")
    axes.set_title("Allowed rate-limit decisions per second, one redis-server")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# -- the whole run ------------------------------------------------------------


def machine_facts(server_info: dict[str, Any]) -> dict[str, Any]:
    import hiredis
    import redis

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "redis": server_info["redis_version"],
        "redis_py": redis.__version__,
        "hiredis": hiredis.__version__,
        "load_before": os.getloadavg()[0],
    }


def revision() -> str:
    """The checkout's commit, marked ``+changes`` when the package or its
    scripts differ from it (the figures are of the working tree)."""
    def git(*words: str) -> str:
        done = subprocess.run(
            ["git", *words], cwd=ROOT, capture_output=True, text=True
        )
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "pactown_redis", "lua")
    return commit + ("+changes" if changed else "")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from servers import RedisServer

    server = RedisServer().start()
    admin = aredis.from_url(server.url, protocol=3)
    try:
        info = await admin.info("server")
        report: dict[str, Any] = {
            "command": args.command_line,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "machine": machine_facts(info),
        "revision": revision(),
            "seconds": args.seconds,
            "tenants": args.tenants,
            "memory_tenants": args.memory_tenants,
            "monitor_calls": args.monitor_calls,
            "batch": args.batch,
            "rows": [],
            "memory": [],
        }
        report["commandstats_counts_script_calls"] = (
            await commandstats_counts_script_calls(admin)
        )
        for key in args.only:
            if key == "ceiling":
                continue
            print(f"{key}: throughput", file=sys.stderr)
            try:
                row = await measure_contender(key, args, server, admin)
            except Exception as exc:  # noqa: BLE001 - reported as the row
                row = {
                    "key": key,
                    "title": peers.CONTENDERS[key].title,
                    "kind": peers.CONTENDERS[key].kind,
                    "config": peers.CONTENDERS[key].config,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            report["rows"].append(row)
            await admin.flushall()
        if "ceiling" in args.only:
            print("ceiling: redis-benchmark", file=sys.stderr)
            try:
                report["ceiling"] = await measure_ceiling(
                    server, admin, args.tenants, args.seconds
                )
                # check_many sends a batch per round trip; so may the
                # server's own client.
                report["ceiling"]["pipelined"] = await measure_ceiling(
                    server, admin, args.tenants, args.seconds, args.batch
                )
            except Exception as exc:  # noqa: BLE001 - reported as the row
                report["ceiling"] = {"error": f"{type(exc).__name__}: {exc}"}
            await admin.flushall()
        for key in args.only:
            if key not in MEMORY_ROWS:
                continue
            print(f"{key}: memory", file=sys.stderr)
            try:
                entry = asdict(
                    await measure_memory(
                        key, server.url, admin, args.memory_tenants, args.idle
                    )
                )
            except Exception as exc:  # noqa: BLE001 - reported as the row
                entry = {"error": f"{type(exc).__name__}: {exc}"}
            entry["key"] = key
            report["memory"].append(entry)
        report["machine"]["load_after"] = os.getloadavg()[0]
        return report
    finally:
        await admin.aclose()
        server.close()


async def profile(args: argparse.Namespace) -> None:
    """Write a pyinstrument report of check_rate_limit at 64 tasks."""
    from pyinstrument import Profiler
    from servers import RedisServer

    server = RedisServer().start()
    try:
        setup = peers.Setup(
            url=server.url, rpm=THROUGHPUT_RPM, tenants=args.tenants
        )
        contender = peers.make("pactown", setup)
        await contender.open()
        try:
            await drive(contender, 64, max(0.2, args.seconds / 5))
            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()
            decisions, *_ = await drive(contender, 64, args.seconds)
            profiler.stop()
        finally:
            await contender.close()
    finally:
        server.close()
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "profile.txt"
    target.write_text(
        f"# {args.command_line}\n# {decisions:,} check_rate_limit decisions "
        f"at 64 tasks in {args.seconds} s\n\n"
        + profiler.output_text(unicode=True, color=False, show_all=False)
    )
    print(f"wrote {target}", file=sys.stderr)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0,
        help="measured seconds per cell (default 3)",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="tiny run: concurrency 1 and 16, 0.3 s per cell, 200 tenants "
        "for memory, no 2-process row",
    )
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", choices=ROWS,
        help=f"run only these rows: {', '.join(ROWS)}",
    )
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results",
        help="output folder (default benchmarks/results)",
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="only profile check_rate_limit at 64 tasks into profile.txt",
    )
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--memory-tenants", type=int, default=10_000)
    parser.add_argument(
        "--idle", type=float, default=5.0,
        help="seconds between the two memory readings (default 5)",
    )
    parser.add_argument(
        "--batch", type=int, default=16, help="decisions per check_many call"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16, 64, 256]
    )
    parser.add_argument(
        "--no-processes", dest="processes", action="store_false",
        help=f"skip the row of {PROCESSES} processes",
    )
    parser.add_argument("--monitor-calls", type=int, default=400)
    # A worker process of the 2-process row.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--rpm", type=int, default=THROUGHPUT_RPM,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.smoke:
        args.seconds = min(args.seconds, 0.3)
        args.concurrency = [1, 16]
        args.memory_tenants = min(args.memory_tenants, 200)
        args.idle = min(args.idle, 1.0)
        args.processes = False
        args.monitor_calls = min(args.monitor_calls, 100)
    if args.seconds <= 0 or args.tenants < 1 or args.memory_tenants < 1:
        parser.error("--seconds, --tenants and --memory-tenants must be > 0")
    if args.batch < 1 or args.idle < 0 or min(args.concurrency) < 1:
        parser.error("--batch and --concurrency must be >= 1, --idle >= 0")
    args.only = list(dict.fromkeys(args.only or ROWS))
    given = list(argv if argv is not None else sys.argv[1:])
    shown = ["benchmarks/compare.py", *given]
    args.command_line = shlex.join([".venv/bin/python", *shown])
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        asyncio.run(worker_main(args))
        return
    if args.profile:
        asyncio.run(profile(args))
        return
    report = asyncio.run(run(args))
    cols = columns(args)
    add_ratios(report, cols)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "latest.md").write_text(markdown(report, cols))
    chart(report, cols, args.out / "latest.png")
    print(f"wrote latest.json, .md and .png in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
