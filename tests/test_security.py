"""Deployment security: a least-privilege ACL user, TLS, secrets kept out of
every output, and automatic blocking of users who keep offending.

The ACL, TLS and password tests start real servers of their own; the
automatic blocking tests run on both backends with the controlled clock.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import time
import traceback
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

from pactown_redis import (
    AnomalyType,
    InvalidInputError,
    SecurityPolicy,
    UserProfile,
    UserTier,
)
from pactown_redis.acl import acl_setuser_line
from pactown_redis.policy import connect
from servers import RedisServer, free_port, make_tls_material

NS = "tenant"
PASSWORD = "Pw-0f-the-ACL-user-9c1e"

# Generous: these tests measure permissions, never speed.
TIMEOUT = 5.0


def quiet_policy(url: str, **options) -> SecurityPolicy:
    """A policy from ``url`` whose decisions do not depend on this
    machine's load."""
    options.setdefault("timeout", TIMEOUT)
    return SecurityPolicy.from_url(
        url, cpu_threshold=None, memory_threshold=None, **options
    )


# -- ACL ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_server():
    """A server with the namespace's ACL user, a second namespace's data
    and a key of no namespace, made by the default (admin) user."""
    server = RedisServer().start()
    admin = server.client()
    try:
        line = acl_setuser_line(NS, "app", PASSWORD)
        admin.execute_command(*shlex.split(line))
        admin.hset("other:{u}:profile", "blocked", "1")
        admin.set("unrelated", "secret data")
        admin.hset(f"{NS}2:{{u}}:profile", "blocked", "1")
        yield server
    finally:
        admin.close()
        server.close()


def acl_url(server: RedisServer) -> str:
    secret = quote(PASSWORD, safe="")
    return f"redis://app:{secret}@127.0.0.1:{server.port}/0"


@pytest.mark.slow
async def test_acl_user_runs_every_call_of_the_api(acl_server):
    """Every decision and API call works through the namespace's ACL user,
    including the recovery of a flushed script cache."""
    admin = acl_server.client()
    admin.script_flush()
    policy = quiet_policy(
        acl_url(acl_server), namespace=NS, auto_block_threshold=1
    )
    async with policy:
        assert (await policy.check_rate_limit("u")).allowed
        profile = UserProfile.parse(
            {
                **UserProfile.from_tier("u", UserTier.PRO).model_dump(),
                "allowed_ports": [8080],
            }
        )
        await policy.set_user_profile(profile)
        assert await policy.get_user_profile("u") == profile
        start = await policy.check_can_start_service("u", "s", port=8080)
        assert start.allowed and not start.degraded
        assert await policy.register_service("u", "s") == start.fence
        assert [o.status for o in await policy.renew_leases()] == ["ok"]
        assert (await policy.get_user_state("u")).running == 1
        assert await policy.get_user_service_count("u") == 1
        assert await policy.get_services_started_last_hour("u") == 1
        assert await policy.unregister_service("u", "s")

        # A port outside the list is a strike; at 1 the user is blocked.
        denied = await policy.check_can_start_service("u", "t", port=22)
        assert not denied.allowed and not denied.degraded
        assert not (await policy.check_can_start_service("u", "t")).allowed
        await policy.unblock_user("u")
        await policy.block_user("u", "manual")
        assert not (await policy.check_can_start_service("u", "t")).allowed
        await policy.unblock_user("u")
        assert (await policy.check_can_start_service("u", "t")).allowed

        assert await policy.anomalies.by_user("u")
        assert await policy.anomalies.by_type(AnomalyType.USER_AUTO_BLOCKED)
        assert await policy.anomalies.recent(5)
        summary = await policy.get_anomaly_summary(1)
        assert summary["by_type"]["user_auto_blocked"] == 1
        assert await policy.delete_user_profile("u")
    admin.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ("GET", "unrelated"),
        ("SET", "unrelated", "x"),
        ("HGETALL", "other:{u}:profile"),
        ("DEL", "other:{u}:profile"),
        ("HSET", f"{NS}2:{{u}}:profile", "blocked", "0"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("SCRIPT", "FLUSH"),
        ("SCRIPT", "KILL"),
        ("FUNCTION", "FLUSH"),
        ("CONFIG", "GET", "requirepass"),
        ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
        ("ACL", "SETUSER", "app", "+@all"),
        ("ACL", "LIST"),
        ("SHUTDOWN",),
        ("PUBLISH", "channel", "x"),
        ("MIGRATE", "127.0.0.1", "1", f"{NS}:x", "0", "1"),
    ],
    ids=" ".join,
)
def test_acl_user_cannot_leave_its_namespace(acl_server, command):
    """Outside its keys and commands the ACL user is refused (NOPERM)."""
    client = acl_server.client(username="app", password=PASSWORD)
    try:
        with pytest.raises(NoPermissionError):
            client.execute_command(*command)
    finally:
        client.close()
    admin = acl_server.client()
    assert admin.get("unrelated") == b"secret data"
    assert admin.hgetall("other:{u}:profile") == {b"blocked": b"1"}
    admin.close()


# How Redis words a refusal: NOPERM for a command, and for a call made by
# a script "The user executing the script can't access/run ...".
REFUSED = r"(?i)noperm|no permissions|user executing the script can't"

EVIL_SCRIPTS = [
    # A key named in KEYS, outside the namespace.
    ("return redis.call('GET', KEYS[1])", ["unrelated"]),
    ("return redis.call('SET', KEYS[1], 'x')", ["unrelated"]),
    # A key the script names itself, never declared.
    ("return redis.call('HGETALL', 'other:{u}:profile')", []),
    ("return redis.call('DEL', 'unrelated')", []),
    (f"return redis.call('HSET', '{NS}2:{{u}}:profile', 'blocked', '0')", []),
    # Commands the user lacks, from inside a script.
    ("return redis.call('FLUSHALL')", []),
    ("return redis.call('KEYS', '*')", []),
    ("return redis.call('SCAN', '0')", []),
    # A namespace key moved out of the namespace.
    ("return redis.call('RENAME', KEYS[1], KEYS[2])", [f"{NS}:x", "out"]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("source", "keys"), EVIL_SCRIPTS)
def test_acl_user_cannot_script_its_way_out(acl_server, source, keys):
    """A script the ACL user sends itself is held to the same keys and
    commands: Redis checks each call a script makes against the user."""
    admin = acl_server.client()
    # Even a script someone else loaded runs with the caller's rights.
    sha = admin.script_load(source)
    client = acl_server.client(username="app", password=PASSWORD)
    try:
        with pytest.raises(ResponseError, match=REFUSED):
            client.eval(source, len(keys), *keys)
        with pytest.raises(ResponseError, match=REFUSED):
            client.evalsha(sha, len(keys), *keys)
    finally:
        client.close()
    assert admin.get("unrelated") == b"secret data"
    assert admin.hgetall("other:{u}:profile") == {b"blocked": b"1"}
    assert admin.hgetall(f"{NS}2:{{u}}:profile") == {b"blocked": b"1"}
    admin.close()


@pytest.mark.slow
def test_what_eval_still_allows_inside_the_namespace(acl_server):
    """The residual risk docs/security.md names: with EVAL (or SCRIPT LOAD
    and EVALSHA, which is the same power) the user runs any Lua on the
    namespace's keys with the listed commands, e.g. rewriting a profile."""
    client = acl_server.client(username="app", password=PASSWORD)
    key = f"{NS}:{{victim}}:profile"
    try:
        client.eval(
            "return redis.call('HSET', KEYS[1], 'blocked', '0')", 1, key
        )
        assert client.hget(key, "blocked") == b"0"
    finally:
        client.delete(key)
        client.close()


def test_acl_line_is_one_safe_command():
    """The line splits into ACL SETUSER, the user, and rules that reset
    keys, channels and commands before granting the namespace only."""
    parts = shlex.split(acl_setuser_line(NS, "app", PASSWORD))
    assert parts[:3] == ["ACL", "SETUSER", "app"]
    assert f"~{NS}:*" in parts and "resetkeys" in parts
    assert "-@all" in parts and "resetchannels" in parts
    assert parts.index("-@all") < min(
        i for i, p in enumerate(parts) if p.startswith("+")
    )
    assert not {"+@all", "allkeys", "~*", "+script|flush", "+keys"} & set(parts)


# -- TLS ---------------------------------------------------------------------


def leaf_for_another_name(material: dict[str, str], folder: Path) -> dict:
    """A server certificate from the right CA that names only
    ``other.example``: no IP address, so 127.0.0.1 does not match it."""
    folder.mkdir()
    config = folder / "leaf.cnf"
    config.write_text(
        "[req]\ndistinguished_name = dn\nprompt = no\n"
        "[dn]\nCN = other.example\n"
        "[ext]\nbasicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\nsubjectAltName = DNS:other.example\n"
    )

    def openssl(*args: str) -> None:
        subprocess.run(
            ["openssl", *args], cwd=folder, check=True, capture_output=True,
            timeout=30,
        )

    openssl(
        "req", "-new", "-config", str(config), "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "other.key", "-out", "other.csr",
    )
    openssl(
        "x509", "-req", "-in", "other.csr", "-CA", material["ca"],
        "-CAkey", material["ca_key"], "-set_serial", "7",
        "-extfile", str(config), "-extensions", "ext", "-days", "2",
        "-out", "other.crt",
    )
    return {
        **material,
        "cert": str(folder / "other.crt"),
        "key": str(folder / "other.key"),
    }


@pytest.fixture(scope="module")
def tls_servers(tmp_path_factory):
    """(material, a TLS server for 127.0.0.1, one whose certificate names
    another host)."""
    folder = tmp_path_factory.mktemp("tls")
    material = make_tls_material(folder / "ca")
    right = RedisServer(tls=material).start()
    other = RedisServer(tls=leaf_for_another_name(material, folder / "other"))
    # The harness's readiness probe checks the host name, which this
    # server is made to fail; it is probed without the check instead.
    other.start(wait=False)
    wait_for_ping(other.client(ssl_check_hostname=False))
    try:
        yield material, right, other
    finally:
        right.close()
        other.close()


def wait_for_ping(client: redis.Redis, timeout: float = 10.0) -> None:
    """Return once ``client`` gets an answer to PING.

    Raises:
        TimeoutError: no answer within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        "the TLS server did not answer"
                    ) from None
                time.sleep(0.05)
    finally:
        client.close()


def tls_url(server: RedisServer, ca: str, **query: str) -> str:
    options = {"ssl_ca_certs": ca, **query}
    params = "&".join(f"{k}={quote(v, safe='')}" for k, v in options.items())
    return f"rediss://127.0.0.1:{server.port}/0?{params}"


@pytest.mark.slow
async def test_tls_with_the_right_ca_works(tls_servers):
    """A policy from a rediss:// URL naming the CA decides over TLS."""
    material, server, _ = tls_servers
    async with quiet_policy(tls_url(server, material["ca"])) as policy:
        result = await policy.check_rate_limit("u")
        assert result.allowed and not result.degraded
        start = await policy.check_can_start_service("u", "s")
        assert start.allowed and not start.degraded
        assert (await policy.get_user_state("u")).running == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("which", "query"),
    [
        ("wrong CA", {}),
        ("wrong host name", {"ssl_check_hostname": "true"}),
    ],
)
async def test_tls_refuses_an_untrusted_server(tls_servers, which, query):
    """A server whose certificate is not from the trusted CA, or names
    another host, is refused: no decision is taken from it."""
    material, right, other = tls_servers
    if which == "wrong CA":
        url = tls_url(right, material["wrong_ca"], **query)
    else:
        url = tls_url(other, material["ca"], **query)
    client = connect(url, socket_timeout=TIMEOUT)
    with pytest.raises(redis.exceptions.ConnectionError) as caught:
        await client.ping()
    await client.aclose()
    assert "certificate verify failed" in str(caught.value).lower()
    async with quiet_policy(
        url, rate_limit_fail_mode="closed", start_fail_mode="closed"
    ) as policy:
        result = await policy.check_rate_limit("u")
        assert result.degraded and not result.allowed
        start = await policy.check_can_start_service("u", "s")
        assert start.degraded and not start.allowed


@pytest.mark.slow
async def test_tls_other_name_is_the_only_fault(tls_servers):
    """The certificate for another name is otherwise good: with hostname
    checking off it is accepted, so the refusal above is the name's."""
    material, _, other = tls_servers
    url = tls_url(other, material["ca"], ssl_check_hostname="false")
    async with quiet_policy(url) as policy:
        assert not (await policy.check_rate_limit("u")).degraded


# -- secrets -----------------------------------------------------------------

SECRET = "Sup3r-Secret/Pass?word#1"


@pytest.fixture(scope="module")
def password_server():
    """A server whose default user needs SECRET."""
    server = RedisServer().start()
    admin = server.client()
    admin.config_set("requirepass", SECRET)
    admin.close()
    try:
        yield server
    finally:
        server.close()


def secret_forms() -> set[str]:
    """The secret as it may be spelled: raw, percent-encoded, and its
    halves (a parser may quote part of a URL)."""
    half = len(SECRET) // 2
    return {
        SECRET,
        quote(SECRET, safe=""),
        SECRET[:half],
        SECRET[half:],
    }


def failing_urls(server: RedisServer) -> dict[str, str]:
    good = quote(SECRET, safe="")
    port = server.port
    return {
        "right password": f"redis://:{good}@127.0.0.1:{port}/0",
        "wrong password": f"redis://:{good}x@127.0.0.1:{port}/0",
        "wrong user": f"redis://nobody:{good}@127.0.0.1:{port}/0",
        "wrong port": f"redis://:{good}@127.0.0.1:{free_port()}/0",
        "password in query": (
            f"redis://127.0.0.1:{free_port()}/0?password={good}"
        ),
        "unescaped password": f"redis://:{SECRET}@127.0.0.1:{port}/0",
    }


async def every_call(policy: SecurityPolicy) -> list[str]:
    """Run each call of the API, returning what each produced (result or
    exception with its full chain), as text."""
    seen = []
    calls = [
        lambda: policy.set_user_profile(with_ports("u", [8000])),
        lambda: policy.check_rate_limit("u"),
        lambda: policy.check_can_start_service("u", "s", port=8000),
        lambda: policy.register_service("u", "s"),
        lambda: policy.unregister_service("u", "s"),
        lambda: policy.check_can_start_service("u", "s", port=22),
        lambda: policy.get_user_profile("u"),
        lambda: policy.block_user("u", "x"),
        lambda: policy.unblock_user("u"),
        lambda: policy.get_user_state("u"),
        lambda: policy.renew_leases(),
        lambda: policy.anomalies.recent(),
        lambda: policy.get_anomaly_summary(1),
    ]
    for call in calls:
        try:
            seen.append(repr(await call()))
        except Exception as exc:  # noqa: BLE001 - every outcome is inspected
            seen.append("".join(traceback.format_exception(exc)))
            seen.append(repr(exc))
    return seen


@pytest.mark.slow
async def test_passwords_appear_nowhere(password_server, caplog, tmp_path):
    """Neither a URL's password nor any part of it shows up in logs (at
    DEBUG), reprs, exceptions with their causes, anomaly events or the
    anomaly file, whether the password is right, wrong, or the URL is
    malformed."""
    caplog.set_level(logging.DEBUG)
    outputs: list[str] = []
    events = []
    log_file = tmp_path / "anomalies.jsonl"
    for name, url in failing_urls(password_server).items():
        try:
            policy = quiet_policy(
                url,
                timeout=1.0,
                auto_block_threshold=1,
                anomaly_log_path=log_file,
                on_anomaly=events.append,
            )
        except InvalidInputError as exc:
            assert name == "unescaped password"
            outputs.append("".join(traceback.format_exception(exc)))
            continue
        async with policy:
            outputs.append(repr(policy))
            outputs.append(repr(policy._client))  # noqa: SLF001 - checked too
            outputs += await every_call(policy)
            if name == "right password":
                assert not (await policy.check_rate_limit("v")).degraded
                assert await policy.anomalies.by_type(
                    AnomalyType.USER_AUTO_BLOCKED
                )
    outputs += [record.getMessage() for record in caplog.records]
    outputs += [
        "".join(traceback.format_exception(r.exc_info[1]))
        for r in caplog.records
        if r.exc_info
    ]
    outputs += [json.dumps(event.to_dict()) for event in events]
    outputs.append(log_file.read_text() if log_file.exists() else "")
    assert events and caplog.records
    everything = "\n".join(outputs)
    for form in secret_forms():
        assert form not in everything


# -- automatic blocking ------------------------------------------------------


def with_ports(user_id: str, ports: list[int]) -> UserProfile:
    base = UserProfile.from_tier(user_id, UserTier.PRO)
    return UserProfile.parse({**base.model_dump(), "allowed_ports": ports})


def blocking_policy(make_policy, **options):
    options.setdefault("auto_block_threshold", 3)
    options.setdefault("auto_block_window", 60)
    options.setdefault("auto_block_duration", 300)
    return make_policy(**options)


async def offend(policy, user_id: str = "u", times: int = 1) -> list:
    """Ask for a port outside the user's list: a high-severity anomaly."""
    results = []
    for _ in range(times):
        result = await policy.check_can_start_service(user_id, "s", port=22)
        assert result.reason == "Port 22 not allowed for your account"
        results.append(result)
    return results


async def auto_blocked(policy, user_id: str = "u") -> bool:
    result = await policy.check_can_start_service(user_id, "ok", port=8000)
    if result.allowed:
        await policy.unregister_service(user_id, "ok")
        return False
    assert result.reason.startswith("User temporarily blocked"), result.reason
    return True


async def test_threshold_of_offences_blocks_until_the_duration_passes(
    make_policy, redis_client, clock
):
    """The K-th high-severity anomaly within the window blocks the user's
    starts, records USER_AUTO_BLOCKED, and the block ends by the clock."""
    policy = blocking_policy(make_policy)
    await policy.set_user_profile(with_ports("u", [8000]))
    await offend(policy, times=2)
    assert not await auto_blocked(policy)
    await offend(policy)
    assert await auto_blocked(policy)

    events = await policy.anomalies.by_type(AnomalyType.USER_AUTO_BLOCKED)
    assert [(e.user_id, e.metadata["strikes"]) for e in events] == [("u", 3)]
    assert events[0].severity.value == "high"
    keys = policy.keys.user("u")
    assert 0 < await redis_client.pttl(keys.auto_block) <= 300_000
    assert not await redis_client.exists(keys.strikes)

    clock.advance(299)
    result = await policy.check_can_start_service("u", "ok", port=8000)
    assert result.reason == (
        "User temporarily blocked after repeated violations. Retry in 1s"
    )
    clock.advance(1)
    assert not await auto_blocked(policy)


async def test_offences_outside_the_window_do_not_add_up(make_policy, clock):
    """Strikes older than the window are forgotten."""
    policy = blocking_policy(make_policy)
    await policy.set_user_profile(with_ports("u", [8000]))
    await offend(policy, times=2)
    clock.advance(61)
    await offend(policy)
    assert not await auto_blocked(policy)
    await offend(policy)
    clock.advance(59)
    await offend(policy)
    assert await auto_blocked(policy)


async def test_off_by_default(make_policy, redis_client):
    """Without a threshold, offences block nobody and leave no strikes."""
    policy = make_policy()
    await policy.set_user_profile(with_ports("u", [8000]))
    await offend(policy, times=10)
    assert not await auto_blocked(policy)
    keys = policy.keys.user("u")
    assert not await redis_client.exists(keys.strikes, keys.auto_block)


async def test_unblock_lifts_an_auto_block_and_forgets_strikes(
    make_policy, redis_client
):
    """unblock_user ends an automatic block and clears the strikes."""
    policy = blocking_policy(make_policy)
    await policy.set_user_profile(with_ports("u", [8000]))
    await offend(policy, times=3)
    assert await auto_blocked(policy)
    await policy.unblock_user("u")
    assert not await auto_blocked(policy)
    await offend(policy, times=2)
    await policy.unblock_user("u")
    await offend(policy, times=2)
    assert not await auto_blocked(policy)
    assert await redis_client.zcard(policy.keys.user("u").strikes) == 2


async def test_replicas_share_strikes_and_blocks(make_policy):
    """Strikes counted by different replicas add up; the block holds on
    every replica; other users are not touched."""
    first, second = blocking_policy(make_policy), blocking_policy(make_policy)
    await first.set_user_profile(with_ports("u", [8000]))
    await second.set_user_profile(with_ports("v", [8000]))
    await offend(first)
    await offend(second)
    await offend(second, "v", times=2)
    assert not await auto_blocked(first)
    await offend(first)
    assert await auto_blocked(second)
    assert await auto_blocked(first)
    assert not await auto_blocked(second, "v")


async def test_attempts_while_blocked_and_system_faults_are_not_strikes(
    make_policy, redis_client
):
    """Starts tried while blocked, and PROFILE_CORRUPT (high severity, but
    the system's fault) never count toward an automatic block."""
    policy = blocking_policy(make_policy, auto_block_threshold=1)
    await policy.block_user("u", "manual")
    for _ in range(3):
        assert not (await policy.check_can_start_service("u", "s")).allowed
    await redis_client.hset(policy.keys.user("c").profile, "tier", "bogus")
    for _ in range(3):
        result = await policy.check_can_start_service("c", "s")
        assert result.anomaly.anomaly_type is AnomalyType.PROFILE_CORRUPT
    for user in ("u", "c"):
        keys = policy.keys.user(user)
        assert not await redis_client.exists(keys.strikes, keys.auto_block)


async def test_auto_block_keys_expire_with_their_state(
    make_policy, redis_client
):
    """Strikes live as long as the window, a block as long as itself."""
    policy = blocking_policy(
        make_policy, auto_block_window=45, auto_block_duration=120
    )
    await policy.set_user_profile(with_ports("u", [8000]))
    keys = policy.keys.user("u")
    await offend(policy)
    assert 40_000 < await redis_client.pttl(keys.strikes) <= 45_000
    await offend(policy, times=2)
    assert 115_000 < await redis_client.pttl(keys.auto_block) <= 120_000
