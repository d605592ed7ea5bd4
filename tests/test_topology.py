"""The compose cluster and its local twin: replicas in separate processes,
over HTTP, share one key's limit; the compose file says what it should.

The HTTP tests run real processes: a redis-server and uvicorn replicas of
``examples/app``, started by ``examples/local_topology.py``. Their clock is
Redis's own, so a count that depends on refills is bounded by the server
time the run took (a FREE bucket regains one request every 3 s): exactly
the limit on any machine that sends a burst in less than that.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import psutil
import pytest
import redis
import yaml

from pactown_redis.errors import InvalidInputError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = EXAMPLES / "app" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

FREE_LIMIT = 20
#: Seconds in which a FREE bucket regains one request.
FREE_REFILL = 60 / FREE_LIMIT


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"pactown_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


local_topology = _load("local_topology")
loadgen = local_topology.loadgen


# -- helpers -----------------------------------------------------------------


def server_seconds(url: str) -> float:
    """Redis's clock, in seconds: the clock the replicas decide by."""
    client = redis.Redis.from_url(url)
    try:
        seconds, micros = client.time()
    finally:
        client.close()
    return seconds + micros / 1e6


def ratelimit_fields(response: httpx.Response) -> dict[str, int]:
    """The ``RateLimit`` field as numbers: limit, remaining, reset."""
    items = response.headers["ratelimit"].split(",")
    pairs = (item.split("=") for item in items)
    return {name.strip(): int(value) for name, value in pairs}


def replica_logs(topology: Any) -> str:
    """The replicas' logs, for the message of a failed assert."""
    return "\n".join(
        f"--- replica {r.number} ---\n{local_topology._tail(r.log_path)}"
        for r in topology.replicas
    )


def live_children() -> set[int]:
    """Pids of this process's descendants that still run."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def env_without_redis_url() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "REDIS_URL"}


@pytest.fixture(scope="module")
def topology() -> Iterator[Any]:
    """A redis-server and three replicas of the example app."""
    with local_topology.Topology(3) as running:
        yield running


# -- replicas share one limit over HTTP --------------------------------------


@pytest.mark.slow
async def test_three_replicas_allow_one_free_key_its_twenty(topology):
    """Sixty requests at once over three replicas get one FREE key's 20."""
    key = "k-" + secrets.token_hex(6)
    urls = topology.urls
    gate = asyncio.Semaphore(6)

    async def one(http: httpx.AsyncClient, number: int) -> httpx.Response:
        async with gate:
            return await http.get(
                urls[number % 3] + "/me", headers={"x-api-key": key}
            )

    began = server_seconds(topology.redis_url)
    async with httpx.AsyncClient(timeout=30) as http:
        answers = await asyncio.gather(*(one(http, n) for n in range(60)))
    elapsed = server_seconds(topology.redis_url) - began

    allowed = [a for a in answers if a.status_code == 200]
    denied = [a for a in answers if a.status_code == 429]
    assert len(allowed) + len(denied) == 60
    refilled = int(elapsed / FREE_REFILL)
    assert FREE_LIMIT <= len(allowed) <= FREE_LIMIT + refilled, (
        replica_logs(topology)
    )
    assert {a.headers["ratelimit-policy"] for a in answers} == {"20;w=60"}
    # Every debit leaves at most one token fewer than the one before, so
    # the allowed answers count down through every value once: the
    # replicas read one bucket.
    fields = [ratelimit_fields(a) for a in allowed]
    assert sorted({f["remaining"] for f in fields}) == list(range(FREE_LIMIT))
    for f in fields:
        left = f["remaining"]
        assert f["limit"] == FREE_LIMIT
        assert 3 * (19 - left) < f["reset"] <= 3 * (20 - left)


@pytest.mark.slow
async def test_a_key_spent_on_one_replica_is_refused_by_every_replica(topology):
    """A key spent on one replica is refused by all three, with Retry-After."""
    key = {"x-api-key": "k-" + secrets.token_hex(6)}
    first, *others = topology.urls

    began = server_seconds(topology.redis_url)
    async with httpx.AsyncClient(timeout=30) as http:
        spent = [await http.get(first + "/me", headers=key) for _ in range(20)]
        probes = [
            await http.get(url + "/me", headers=key) for url in [*others, first]
        ]
    elapsed = server_seconds(topology.redis_url) - began

    assert [a.status_code for a in spent] == [200] * FREE_LIMIT
    refused = [p for p in probes if p.status_code == 429]
    assert len(refused) >= len(probes) - int(elapsed / FREE_REFILL), (
        replica_logs(topology)
    )
    for answer in refused:
        wait = int(answer.headers["retry-after"])
        assert 1 <= wait <= FREE_REFILL
        assert answer.json() == {
            "detail": "Rate limit exceeded",
            "retry_after": wait,
        }
        assert ratelimit_fields(answer)["remaining"] == 0
        assert 57 < ratelimit_fields(answer)["reset"] <= 60


# -- the one-command twin ----------------------------------------------------

ROW = re.compile(r"^(http://\S+|all)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$")


@pytest.mark.slow
def test_one_command_prints_one_shared_limit_and_stops_everything(
    capsys, monkeypatch
):
    """main() runs Redis, three replicas and the load, then stops them all."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    before = live_children()

    status = local_topology.main(["--requests", "45", "--concurrency", "3"])

    out = capsys.readouterr().out
    assert status == 0, out
    rows = {
        m[1]: [int(n) for n in m.groups()[1:]]
        for m in map(ROW.match, out.splitlines())
        if m
    }
    total = rows.pop("all")
    assert len(rows) == 3
    assert [row[0] for row in rows.values()] == [15, 15, 15]
    assert [sum(column) for column in zip(*rows.values())] == total
    assert total[0] == 45 and total[1] + total[2] == 45
    assert total[1] >= FREE_LIMIT
    assert "shared: the 3 replicas allowed" in out
    assert "a bucket each would have allowed 45" in out
    assert live_children() <= before


@pytest.mark.slow
def test_an_interrupt_during_the_load_stops_every_process(monkeypatch, capsys):
    """Ctrl-C in the middle of a run stops Redis and the replicas; 130."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    before = live_children()
    running: set[int] = set()

    async def interrupted(*args: Any, **kwargs: Any) -> None:
        running.update(live_children() - before)
        raise KeyboardInterrupt

    monkeypatch.setattr(loadgen, "send_load", interrupted)
    status = local_topology.main([])

    assert status == 130
    assert "interrupted: every process stopped" in capsys.readouterr().err
    assert len(running) == 4  # redis-server and three replicas
    assert not running & live_children()


@pytest.mark.slow
def test_a_replica_that_cannot_start_stops_the_others(monkeypatch):
    """A replica that exits at startup is reported; nothing is left running."""
    monkeypatch.setenv("PACTOWN_LEASE_TTL", "-1")
    before = live_children()

    with pytest.raises(RuntimeError, match="replica 1 exited") as caught:
        local_topology.Topology(3).start()

    assert "PACTOWN_LEASE_TTL" in str(caught.value)
    assert live_children() <= before


def _wait_for_line(
    script: subprocess.Popen[str], wanted: str, timeout: float
) -> str:
    """Read the script's output until the line ``wanted``; return all read.

    A thread reads, so that the wait keeps to its deadline even when the
    script prints nothing.
    """
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert script.stdout is not None
        for line in script.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    seen = ""
    deadline = time.monotonic() + timeout
    while wanted + "\n" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or script.poll() is not None:
            raise AssertionError(f"no line {wanted!r} from the script:\n{seen}")
        try:
            seen += lines.get(timeout=min(left, 1.0))
        except queue.Empty:
            pass
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum",
    [
        pytest.param(signal.SIGINT, id="SIGINT"),
        pytest.param(signal.SIGTERM, id="SIGTERM"),
    ],
)
def test_a_signal_while_serving_stops_every_process(signum):
    """SIGINT or SIGTERM to the serving script stops all it started; 130."""
    script = subprocess.Popen(
        [
            sys.executable, str(EXAMPLES / "local_topology.py"),
            "--serve", "--replicas", "2", "--requests", "21",
        ],
        env=env_without_redis_url(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        printed = _wait_for_line(script, "serving until Ctrl-C", timeout=120)
        started = psutil.Process(script.pid).children(recursive=True)
        script.send_signal(signum)
        script.wait(timeout=60)
        assert script.stderr is not None
        errors = script.stderr.read()
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()

    assert len(started) == 3, printed  # redis-server and two replicas
    assert script.returncode == 130, errors
    assert "interrupted: every process stopped" in errors
    _, alive = psutil.wait_procs(started, timeout=5)
    assert not alive


@pytest.mark.slow
def test_without_the_harness_a_bare_redis_server_is_started(tmp_path):
    """Outside a full checkout the twin starts redis-server with noeviction."""
    server = local_topology.start_redis(tmp_path, use_harness=False)
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        assert client.ping()
        policy = client.config_get("maxmemory-policy")
        client.close()
    finally:
        server.close()

    assert isinstance(server, local_topology.BareRedis)
    assert policy == {"maxmemory-policy": "noeviction"}
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=1).ping()


# -- the load generator's arithmetic -----------------------------------------


def _answers(target: str, allowed: int, limited: int, policy: str = "20;w=60"):
    return [loadgen.Answer(target, 200, policy)] * allowed + [
        loadgen.Answer(target, 429, policy, retry_after="3")
    ] * limited


TARGETS = ["http://a:8000", "http://b:8000", "http://c:8000"]


@pytest.mark.parametrize(
    ("allowed", "limited", "elapsed", "status", "verdict"),
    [
        ((7, 7, 6), (13, 13, 14), 0.5, 0, "shared: the 3 replicas allowed 20"),
        ((7, 7, 7), (13, 13, 13), 0.5, 1, "NOT shared"),
        ((7, 7, 7), (13, 13, 13), 3.1, 0, "(+1 refilled in 3.1 s)"),
        ((20, 20, 20), (0, 0, 0), 0.5, 1, "NOT shared"),
        ((5, 5, 5), (0, 0, 0), 0.5, 1, "the limit was not reached"),
    ],
)
def test_loadgen_verdict(allowed, limited, elapsed, status, verdict):
    """The verdict allows one limit plus what refilled during the run."""
    answers = [
        answer
        for target, ok, no in zip(TARGETS, allowed, limited)
        for answer in _answers(target, ok, no)
    ]
    report = loadgen.Report("k", TARGETS, answers, elapsed)

    code, sentence = report.verdict()

    assert code == status
    assert verdict in sentence
    assert report.allowed == sum(allowed)
    assert [t.answered for t in report.tallies] == [
        ok + no for ok, no in zip(allowed, limited)
    ]


@pytest.mark.parametrize(
    ("answers", "status", "verdict"),
    [
        ([loadgen.Answer(TARGETS[0], 0)] * 3, 2, "no replica answered"),
        ([loadgen.Answer(TARGETS[0], 200)] * 3, 1, "no answer carried"),
    ],
)
def test_loadgen_verdict_without_answers_or_limit(answers, status, verdict):
    """No answer at all, or answers without a limit, are not a success."""
    code, sentence = loadgen.Report("k", TARGETS, answers, 0.1).verdict()
    assert code == status
    assert sentence.startswith(verdict)


@pytest.mark.parametrize(
    ("field", "parsed"),
    [
        ("20;w=60", (20, 60)),
        ("1000; w=60", (1000, 60)),
        ("5;q=1;w=30", (5, 30)),
    ],
)
def test_ratelimit_policy_is_parsed(field, parsed):
    """RateLimit-Policy gives the limit and the window in seconds."""
    assert loadgen.parse_policy(field) == parsed


@pytest.mark.parametrize(
    "field", ["20", "x;w=60", "20;w=", "0;w=60", "20;w=-1"]
)
def test_a_malformed_ratelimit_policy_is_refused(field):
    """A RateLimit-Policy without a positive limit and window is refused."""
    with pytest.raises(InvalidInputError, match="RateLimit-Policy"):
        loadgen.parse_policy(field)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"targets": []}, "non-empty list"),
        ({"targets": "http://a"}, "non-empty list"),
        ({"targets": ["ftp://a"]}, "http:// or https://"),
        ({"targets": ["http://a", "http://a/"]}, "distinct"),
        ({"key": ""}, "key"),
        ({"requests": 0}, "requests must be in"),
        ({"requests": True}, "requests must be an int"),
        ({"concurrency": 10_000}, "concurrency must be in"),
    ],
)
async def test_load_options_are_checked(options, message):
    """Bad targets, key or counts are refused before anything is sent."""
    arguments = {"targets": TARGETS, "key": "k", **options}
    targets = arguments.pop("targets")
    with pytest.raises(InvalidInputError, match=message):
        await loadgen.send_load(targets, **arguments)


# -- the compose file --------------------------------------------------------


def compose_cli() -> list[str]:
    """The Compose CLI: the docker plugin, else docker-compose.

    ``config`` only reads and checks the file, so no engine is needed.
    """
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, timeout=60
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        return [legacy]
    pytest.fail(
        "no Compose CLI (neither `docker compose` nor `docker-compose`); "
        "scripts/setup.sh installs one: apt-get install docker-compose"
    )


def compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *compose_cli(), "--file", str(path),
            "--project-directory", str(ROOT), "config", "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_compose_accepts_the_compose_file():
    """The Compose CLI finds docker-compose.yml valid."""
    done = compose_config(COMPOSE_FILE)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_compose_refuses_a_broken_dependency(tmp_path):
    """The same check fails on a misspelt depends_on condition."""
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text()
    assert "condition: service_healthy" in text
    broken.write_text(text.replace("service_healthy", "service_healty"))

    done = compose_config(broken)

    assert done.returncode != 0
    assert "service_healty" in done.stdout + done.stderr


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, given as a mapping or a list of K=V."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def flag_value(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """The services of docker-compose.yml, anchors resolved."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def test_compose_redis_never_evicts_and_reports_health(services):
    """Redis 7 with noeviction, an append-only file and a PING check."""
    redis_service = services["redis"]
    command = redis_service["command"]
    assert redis_service["image"] == "redis:7"
    assert flag_value(command, "--maxmemory-policy") == "noeviction"
    assert flag_value(command, "--appendonly") == "yes"
    assert "redis-cli ping" in " ".join(redis_service["healthcheck"]["test"])


def test_compose_runs_three_apps_on_the_shared_redis(services):
    """Three apps wait for a healthy Redis, point at it, know they are three."""
    apps = {
        name: service
        for name, service in services.items()
        if "PACTOWN_REDIS_URL" in environment(service)
    }
    assert sorted(apps) == ["app1", "app2", "app3"]
    host_ports = set()
    for service in apps.values():
        url = urlsplit(environment(service)["PACTOWN_REDIS_URL"])
        assert environment(service)["PACTOWN_REPLICAS"] == str(len(apps))
        assert url.scheme == "redis" and url.hostname in services
        assert services[url.hostname]["image"].startswith("redis:")
        assert url.port == 6379
        depends = service["depends_on"][url.hostname]
        assert depends["condition"] == "service_healthy"
        assert service["build"]["dockerfile"] == "examples/app/Dockerfile"
        assert "healthcheck" in service
        (mapping,) = service["ports"]
        address, host_port, container_port = mapping.split(":")
        assert (address, container_port) == ("127.0.0.1", "8000")
        host_ports.add(host_port)
    assert host_ports == {"8001", "8002", "8003"}


def test_compose_loadgen_targets_each_app_once_they_are_healthy(services):
    """The load generator waits for the three healthy apps and hits each."""
    loadgen_service = services["loadgen"]
    command = loadgen_service["command"]
    assert "examples/loadgen.py" in command
    targets = [word for word in command if word.startswith("http://")]
    assert targets == [f"http://app{n}:8000" for n in (1, 2, 3)]
    assert loadgen_service["depends_on"] == {
        f"app{n}": {"condition": "service_healthy"} for n in (1, 2, 3)
    }


def test_the_dockerfile_copies_only_what_exists_and_is_not_ignored():
    """Every COPY source exists and .dockerignore lets it through."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY":
            sources += words[1:-1]
    needed = {"pyproject.toml", "lua", "pactown_redis", "examples"}
    assert needed <= set(sources)
    kept = {
        line[1:].rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.startswith("!")
    }
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source in kept, source
    assert (EXAMPLES / "app" / "main.py").is_file()
