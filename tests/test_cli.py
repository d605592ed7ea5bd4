"""The pactown-redis command line, against the session's real redis-server.

Commands run in process through ``main`` (output captured), and as a
separate ``python -m pactown_redis.cli`` process where the process itself
matters: its exit code, and Ctrl-C while following the stream.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import redis

import pactown_redis
from pactown_redis import (
    AnomalyType,
    SyncSecurityPolicy,
    UserProfile,
    UserTier,
    cli,
)
from pactown_redis.cli import main
from servers import free_port

REPO = Path(pactown_redis.__file__).resolve().parent.parent
ERROR_PREFIX = "pactown-redis: error: "


@pytest.fixture
def url(redis_server) -> str:
    """The URL of the session's real Redis, emptied."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def run(url: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., Any]:
    """Run the command line in process on ``url``; returns (code, out, err)."""

    def invoke(*args: str, redis_url: str = url) -> tuple[int, str, str]:
        code = main(["--redis-url", redis_url, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture
def admin(url: str) -> Iterator[SyncSecurityPolicy]:
    """A policy on the same Redis and namespace as the command line."""
    with SyncSecurityPolicy(
        url, cpu_threshold=None, memory_threshold=None, auto_renew=False
    ) as policy:
        yield policy


def assert_one_line_error(code: int, out: str, err: str, expected: int = 2):
    assert code == expected
    assert out == ""
    assert err.startswith(ERROR_PREFIX) and err.count("\n") == 1, err
    assert "Traceback" not in err


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.pop("REDIS_URL", None)
    env.pop("PACTOWN_REDIS_URL", None)
    return env


# -- status and profiles ---------------------------------------------------------


def test_status_table(run, admin):
    """status shows tier, tokens left, services with fences, starts, block."""
    admin.set_user_profile(UserProfile.from_tier("alice", UserTier.PRO))
    web = admin.check_can_start_service("alice", "web", memory_mb=64)
    admin.check_rate_limit("alice", cost=4)
    code, out, _ = run("status", "alice")
    assert code == 0
    assert re.search(r"^tier +pro$", out, re.M)
    assert re.search(r"^blocked +no$", out, re.M)
    assert re.search(r"^requests +116(\.\d)? of 120 tokens left$", out, re.M)
    assert re.search(r"^starts +1 in the last hour \(limit 50\)$", out, re.M)
    assert re.search(r"^services +1 running \(limit 10\)$", out, re.M)
    assert re.search(rf"^web +\d+\.\ds +{web.fence} +64 +0$", out, re.M)


def test_status_json(run, admin):
    """status --json carries the same facts as data."""
    admin.block_user("bob", "spam")
    code, out, _ = run("status", "bob", "--json")
    data = json.loads(out)
    assert code == 0
    assert (data["tier"], data["blocked"], data["reason"]) == ("free", True, "spam")
    assert (data["running"], data["services"]) == (0, [])
    assert data["max_requests_per_minute"] == 20
    assert data["tokens"] == pytest.approx(20)


def test_status_lists_each_lease(run, admin):
    """Every running service appears with its fencing token."""
    fences = {
        name: admin.check_can_start_service("u", name).fence for name in "ab"
    }
    _, out, _ = run("--json", "status", "u")
    services = json.loads(out)["services"]
    assert {s["service_id"]: s["fence"] for s in services} == fences
    assert all(0 < s["expires_in"] <= 30 for s in services)


def test_profile_get_json_round_trips(run, admin):
    """profile get --json is the stored profile."""
    profile = UserProfile.from_tier("u:1", UserTier.ENTERPRISE)
    profile.allowed_ports = [22, 443]
    admin.set_user_profile(profile)
    code, out, _ = run("profile", "get", "u:1", "--json")
    assert code == 0
    assert UserProfile.model_validate(json.loads(out)) == profile
    _, table, _ = run("profile", "get", "u:1")
    assert re.search(r"^allowed ports +22, 443$", table, re.M)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--tier", "pro"], {"tier": UserTier.PRO, "max_concurrent_services": 10}),
        (
            ["--max-concurrent", "3"],
            {"tier": UserTier.FREE, "max_concurrent_services": 3},
        ),
        (
            ["--tier", "basic", "--max-requests-per-minute", "7"],
            {"tier": UserTier.BASIC, "max_requests_per_minute": 7},
        ),
        (
            ["--max-memory-mb", "100", "--max-cpu-percent", "9"],
            {"max_memory_mb": 100, "max_cpu_percent": 9},
        ),
        (["--max-services-per-hour", "0"], {"max_services_per_hour": 0}),
        (["--ports", "443,80"], {"allowed_ports": [80, 443]}),
        (["--ports", "none"], {"allowed_ports": []}),
        (["--ports", "any"], {"allowed_ports": None}),
    ],
)
def test_profile_set(run, admin, options, expected):
    """profile set stores the tier and each limit given, others kept."""
    code, out, _ = run("profile", "set", "u", *options, "--json")
    assert code == 0
    stored = admin.get_user_profile("u")
    assert UserProfile.model_validate(json.loads(out)) == stored
    for field, value in expected.items():
        assert getattr(stored, field) == value


def test_profile_set_keeps_other_limits_and_the_block(run, admin):
    """Changing one limit keeps the rest, and a block stays in place."""
    admin.set_user_profile(UserProfile.from_tier("u", UserTier.PRO))
    admin.block_user("u", "review")
    assert run("profile", "set", "u", "--max-concurrent", "4")[0] == 0
    stored = admin.get_user_profile("u")
    assert (stored.tier, stored.max_concurrent_services) == (UserTier.PRO, 4)
    assert (stored.blocked, stored.reason) == (True, "review")


# -- block, unblock, release -------------------------------------------------------


def test_block_and_unblock(run, admin):
    """block denies starts with the reason on every replica; unblock lifts it."""
    code, out, _ = run("block", "u", "--reason", "fraud")
    assert (code, out) == (0, "blocked u: fraud\n")
    result = admin.check_can_start_service("u", "s")
    assert result.reason == "User blocked: fraud"
    code, out, _ = run("unblock", "u", "--json")
    assert json.loads(out) == {"user_id": "u", "blocked": False}
    assert admin.check_can_start_service("u", "s").allowed


def test_release_frees_a_slot(run, admin):
    """release frees a held slot once; a second release finds none."""
    admin.check_can_start_service("u", "a")
    admin.check_can_start_service("u", "b")
    assert not admin.check_can_start_service("u", "c").allowed
    code, out, _ = run("release", "u", "a", "--json")
    assert json.loads(out) == {"user_id": "u", "service_id": "a", "released": True}
    assert admin.check_can_start_service("u", "c").allowed
    code, out, _ = run("release", "u", "a")
    assert (code, out) == (0, "a of u held no slot\n")


def test_namespace_option_selects_the_policy(run, url):
    """--namespace acts on that namespace's keys only."""
    assert run("--namespace", "other", "block", "u", "--reason", "x")[0] == 0
    with SyncSecurityPolicy(url, namespace="other", cpu_threshold=None) as other, \
            SyncSecurityPolicy(url, cpu_threshold=None) as default:
        assert other.get_user_profile("u").blocked
        assert not default.get_user_profile("u").blocked


# -- anomalies -------------------------------------------------------------------


def make_anomalies(admin: SyncSecurityPolicy) -> None:
    admin.block_user("b", "spam")
    admin.check_can_start_service("b", "s1")
    for name in ("x", "y", "z"):
        admin.check_can_start_service("a", name)


def test_anomalies_tail_table(run, admin):
    """tail prints a header and the newest events, oldest first."""
    make_anomalies(admin)
    code, out, _ = run("anomalies", "tail", "--count", "2")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 3
    assert lines[0].split() == [
        "TIME", "SEVERITY", "TYPE", "USER", "SERVICE", "DETAILS",
    ]
    assert "unauthorized_access" in lines[1] and " b " in lines[1]
    assert "concurrent_limit_exceeded" in lines[2] and " z " in lines[2]
    assert lines[1].index("unauthorized") == lines[2].index("concurrent")


def test_anomalies_tail_json_lines(run, admin):
    """tail --json prints one JSON event per line."""
    make_anomalies(admin)
    code, out, _ = run("anomalies", "tail", "--json")
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [e["user_id"] for e in events] == ["b", "a"]
    assert events[1]["anomaly_type"] == AnomalyType.CONCURRENT_LIMIT_EXCEEDED


def test_anomalies_summary(run, admin):
    """summary totals by type, severity and user, as a table or JSON."""
    make_anomalies(admin)
    for _ in range(21):
        admin.check_rate_limit("a")
    code, out, _ = run("anomalies", "summary", "--hours", "1", "--json")
    data = json.loads(out)
    assert code == 0
    assert data["total_anomalies"] == 3
    assert data["by_type"] == {
        "unauthorized_access": 1,
        "concurrent_limit_exceeded": 1,
        "rate_limit_exceeded": 1,
    }
    assert data["top_users"] == {"a": 2, "b": 1}
    _, text, _ = run("anomalies", "summary")
    assert text.startswith("3 anomalies in the last 24 h\n")
    assert re.search(r"^a +2$", text, re.M)


# -- the ACL ---------------------------------------------------------------------


def test_acl_line_confines_a_user_to_the_namespace(run, url, capsys):
    """Under the printed ACL the whole API works and nothing else does."""
    code, line, _ = run(
        "acl", "--namespace", "app", "--username", "app", "--password", "s3cret-pw"
    )
    assert code == 0 and line.startswith("ACL SETUSER app on resetpass >s3cret-pw ")
    port = redis.Redis.from_url(url).connection_pool.connection_kwargs["port"]
    restricted = f"redis://app:s3cret-pw@127.0.0.1:{port}/0"
    with redis.Redis.from_url(url) as root:
        root.execute_command(*line.split())
        try:
            with SyncSecurityPolicy(
                restricted, namespace="app", cpu_threshold=None,
                memory_threshold=None, auto_renew=False,
            ) as app:
                app.set_user_profile(UserProfile.from_tier("u", UserTier.FREE))
                assert app.check_can_start_service("u", "a").allowed
                root.script_flush()
                assert app.check_can_start_service("u", "b").allowed
                assert not app.check_can_start_service("u", "c").allowed
                assert app.renew_leases()[0].status == "ok"
                assert app.unregister_service("u", "a")
                assert app.get_anomaly_summary(1)["total_anomalies"] == 1
                assert app.anomalies.read_after("0-0", block_ms=10)[0]
                assert app.delete_user_profile("u")
                client = app._client
                for command in (("FLUSHALL",), ("GET", "pactown:x"), ("KEYS", "*")):
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        client.execute_command(*command)
            for args in (["status", "u"], ["anomalies", "tail"],
                         ["block", "u", "--reason", "x"]):
                code, _, err = run("--namespace", "app", *args,
                                   redis_url=restricted)
                assert (code, err) == (0, "")
        finally:
            root.execute_command("ACL", "DELUSER", "app")


def test_acl_allows_every_command_the_scripts_call(run):
    """Each redis.call in lua/ names a literal command the ACL allows."""
    _, out, _ = run("acl", "--json")
    allowed = set(json.loads(out)["commands"])
    sources = [p.read_text() for p in (REPO / "lua").glob("*.lua")]
    calls = sum(len(re.findall(r"redis\.p?call\(", s)) for s in sources)
    named = [
        c.lower()
        for s in sources
        for c in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", s)
    ]
    assert calls == len(named) > 0
    assert set(named) <= allowed
    assert {"evalsha", "eval", "xadd", "xread", "time"} <= allowed
    assert json.loads(out)["key_pattern"] == "~pactown:*"


def test_acl_without_password_keeps_existing_ones(run):
    """Without --password the line sets no password and resets none."""
    code, out, _ = run("acl", "--namespace", "ns")
    assert code == 0
    assert out.startswith("ACL SETUSER pactown on resetkeys ~ns:* ")
    assert ">" not in out and "resetpass" not in out and "nopass" not in out


# -- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["status", "u"],
        ["profile", "get", "u"],
        ["profile", "set", "u", "--tier", "pro"],
        ["block", "u", "--reason", "x"],
        ["unblock", "u"],
        ["release", "u", "s"],
        ["anomalies", "tail"],
        ["anomalies", "summary"],
    ],
)
def test_unreachable_redis_is_one_line_without_the_password(run, args):
    """A closed port gives one masked line on stderr and exit code 2."""
    dead = f"redis://admin:hunter2secret@127.0.0.1:{free_port()}/0"
    code, out, err = run(*args, redis_url=dead)
    assert_one_line_error(code, out, err)
    assert "cannot reach Redis at redis://admin:****@127.0.0.1:" in err
    assert "hunter2secret" not in err


@pytest.mark.parametrize(
    "dead",
    [
        "redis://:p%40ss-word-1@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?password=qwerty-123",
    ],
)
def test_passwords_in_any_url_form_are_masked(run, dead):
    """Encoded passwords and password query parameters are masked too."""
    code, out, err = run("status", "u", redis_url=dead.format(port=free_port()))
    assert_one_line_error(code, out, err)
    for secret in ("p%40ss-word-1", "p@ss-word-1", "qwerty-123"):
        assert secret not in err


def test_wrong_password_is_not_echoed(run, url):
    """A refused login is one line and does not show the password."""
    port = redis.Redis.from_url(url).connection_pool.connection_kwargs["port"]
    code, out, err = run(
        "status", "u",
        redis_url=f"redis://nobody:guess-me-123@127.0.0.1:{port}/0",
    )
    assert_one_line_error(code, out, err)
    assert "guess-me-123" not in err


@pytest.mark.parametrize(
    "args",
    [
        ["status"],
        ["status", ""],
        ["bogus"],
        ["profile", "set", "u", "--tier", "gold"],
        ["profile", "set", "u", "--max-concurrent", "-1"],
        ["profile", "set", "u", "--max-memory-mb", "lots"],
        ["profile", "set", "u", "--ports", "80,x"],
        ["profile", "set", "u", "--ports", "70000"],
        ["block", "u"],
        ["anomalies", "tail", "--count", "0"],
        ["anomalies", "summary", "--hours", "0"],
        ["--namespace", "a b", "status", "u"],
        ["acl", "--password", "short"],
        ["acl", "--username", "a user"],
    ],
)
def test_invalid_input_is_one_line_and_writes_nothing(run, url, args):
    """Bad arguments give one line on stderr, exit code 2, and no writes."""
    assert_one_line_error(*run(*args))
    with redis.Redis.from_url(url) as client:
        assert client.dbsize() == 0


def test_corrupt_profile_is_one_line_with_code_1(run, url):
    """A profile this package cannot read is reported, not a traceback."""
    with redis.Redis.from_url(url) as client:
        client.hset("pactown:{u}:profile", mapping={"conc": "many"})
    assert_one_line_error(*run("status", "u"), expected=1)


def test_url_comes_from_the_environment_in_order(monkeypatch, url, capsys):
    """Without --redis-url, REDIS_URL wins over PACTOWN_REDIS_URL."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PACTOWN_REDIS_URL", url)
    assert main(["status", "u"]) == 0
    monkeypatch.setenv("REDIS_URL", dead)
    assert main(["status", "u"]) == 2
    assert dead in capsys.readouterr().err
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.delenv("PACTOWN_REDIS_URL")
    assert cli._resolve_url(None) == ("redis://127.0.0.1:6379/0", False)


# -- examples ----------------------------------------------------------------------


@pytest.fixture
def examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An examples folder the demo and simulate commands look in."""
    folder = tmp_path / "examples"
    folder.mkdir()
    monkeypatch.setattr(cli, "_example_dirs", lambda: [folder])
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("PACTOWN_REDIS_URL", raising=False)
    return folder


def test_demo_runs_the_example_main_with_the_chosen_url(examples, url, capsys):
    """demo runs examples/demo.py's main(argv) with REDIS_URL set to the
    URL given, and returns its exit code."""
    (examples / "demo.py").write_text(
        "import os\n"
        "def main(argv):\n"
        "    print('demo', argv, os.environ.get('REDIS_URL'))\n"
        "    return 3\n"
    )
    assert main(["--redis-url", url, "demo", "--fast"]) == 3
    assert capsys.readouterr().out == f"demo ['--fast'] {url}\n"
    assert "REDIS_URL" not in os.environ
    assert main(["demo"]) == 3
    assert capsys.readouterr().out == "demo [] None\n"


def test_simulate_awaits_an_async_main(examples, capsys):
    """simulate runs examples/multi_tenant.py and awaits an async main."""
    (examples / "multi_tenant.py").write_text(
        "async def main():\n    print('simulated')\n"
    )
    assert main(["simulate"]) == 0
    assert capsys.readouterr().out == "simulated\n"


def test_example_with_a_dataclass_and_postponed_annotations_loads(examples):
    """An example defining a dataclass under postponed annotations loads."""
    path = examples / "with_dataclass.py"
    path.write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class Tenant:\n"
        "    name: str\n"
        "    slots: int = 1\n"
    )
    module = cli._load_example(path)
    try:
        assert module.Tenant("t").slots == 1
        assert sys.modules[module.__name__] is module
    finally:
        sys.modules.pop(module.__name__, None)


def test_example_that_fails_to_load_is_not_left_registered(examples):
    """An example whose top level raises leaves nothing in sys.modules."""
    path = examples / "broken.py"
    path.write_text("raise RuntimeError('broken example')\n")
    with pytest.raises(RuntimeError, match="broken example"):
        cli._load_example(path)
    assert "pactown_redis_example_broken" not in sys.modules


@pytest.mark.parametrize("command", ["demo", "simulate"])
def test_missing_example_is_said_in_one_line(examples, capsys, command):
    """Without the example file the command says so and exits 1."""
    code = main([command])
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, expected=1)
    assert "is not here" in err


# -- as a process ------------------------------------------------------------------


@pytest.mark.slow
def test_module_runs_as_a_command(url):
    """python -m pactown_redis.cli works, with exit codes and one-line errors."""
    command = [sys.executable, "-m", "pactown_redis.cli", "--redis-url"]
    done = subprocess.run(
        [*command, url, "status", "u", "--json"],
        capture_output=True, text=True, env=child_env(), timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["tier"] == "free"
    dead = f"redis://:topsecret-pw@127.0.0.1:{free_port()}/0"
    failed = subprocess.run(
        [*command, dead, "status", "u"],
        capture_output=True, text=True, env=child_env(), timeout=60,
    )
    assert_one_line_error(failed.returncode, failed.stdout, failed.stderr)
    assert "topsecret-pw" not in failed.stderr


@pytest.mark.slow
def test_follow_prints_new_events_and_stops_on_ctrl_c(url, admin):
    """tail --follow prints events as they come; Ctrl-C exits 0 quietly."""
    child = subprocess.Popen(
        [sys.executable, "-m", "pactown_redis.cli", "--redis-url", url,
         "anomalies", "tail", "--follow", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(),
    )
    try:
        admin.block_user("u", "x")
        admin.check_can_start_service("u", "s")
        selector = selectors.DefaultSelector()
        selector.register(child.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=30), "no event printed within 30 s"
        event = json.loads(child.stdout.readline())
        assert (event["user_id"], event["service_id"]) == ("u", "s")
        admin.check_can_start_service("u", "t")
        assert selector.select(timeout=30), "no second event within 30 s"
        assert json.loads(child.stdout.readline())["service_id"] == "t"
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 0
        assert child.stderr.read() == ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
