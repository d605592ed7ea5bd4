"""Real Redis processes for the tests: standalone, cluster, sentinel and TLS.

Every server binds to 127.0.0.1 only, lives in a temporary directory of its
own and writes its log there.  Every process a test starts is killed at the
latest when the interpreter exits, and on Linux also when the process that
started it dies, so an aborted test run leaves nothing behind.

Waits poll with short sleeps against a monotonic deadline.  A wait that runs
out raises ``TimeoutError``; a server that exits while it is awaited raises
``RuntimeError``.  Both messages end with the tail of the server's log.

The module needs only the standard library, the ``redis`` client and the
``redis-server``, ``redis-cli``, ``redis-sentinel`` and ``openssl`` programs;
``scripts/setup.sh`` installs the programs.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel

__all__ = [
    "LocalCluster",
    "LocalSentinel",
    "RedisServer",
    "free_cluster_port",
    "free_port",
    "make_tls_material",
]

HOST = "127.0.0.1"
CLUSTER_BUS_OFFSET = 10000
CLUSTER_SLOTS = 16384

_SETUP_HINT = "run scripts/setup.sh (or `make test`) to install it"
_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 30

T = TypeVar("T")

# Ports handed out by this process.  The kernel may offer a port again once
# its first owner has stopped, and a cluster node also needs port + 10000,
# which the kernel knows nothing about.
_reserved_ports: set[int] = set()

# Every server whose process or directory still exists; the exit hook below
# tears them down even if a test forgot to.
_live_servers: set[RedisServer] = set()


def _require_program(name: str) -> str:
    """Return the path of the program ``name``.

    Raises:
        RuntimeError: the program is not on ``PATH``.
    """
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed; {_SETUP_HINT}")
    return path


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is never handed out twice by this process.  Another process may
    still take it before a server binds it; ``RedisServer.start`` retries
    with a new port when that happens.

    Raises:
        RuntimeError: no unused port was found.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _reserved_ports:
            _reserved_ports.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1")


def _ephemeral_port_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_cluster_port() -> int:
    """Return a port P such that P and the cluster bus port P + 10000 are free.

    Both ports are taken from below the kernel's ephemeral range, so that
    outgoing connections of other programs cannot land on them, and both
    are reserved against later calls of this function and ``free_port``.

    Raises:
        RuntimeError: no such pair was found.
    """
    high = _ephemeral_port_floor() - CLUSTER_BUS_OFFSET
    low = min(11000, high - 1000)
    if low < 1024:
        raise RuntimeError("the ephemeral port range leaves no cluster ports")

    for _ in range(200):
        port = random.randrange(low, high)
        bus = port + CLUSTER_BUS_OFFSET
        if port in _reserved_ports or bus in _reserved_ports:
            continue
        if _port_is_free(port) and _port_is_free(bus):
            _reserved_ports.update((port, bus))
            return port
    raise RuntimeError("no free pair of cluster ports on 127.0.0.1")


def _parent_death_hook() -> Callable[[], None] | None:
    """Return a pre-exec hook that kills the child when its parent dies.

    Only Linux offers this; elsewhere the exit hook alone cleans up.  The
    signal fires when the *thread* that started the child ends, so servers
    must be started from a thread that lives as long as they should.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigkill = int(signal.SIGKILL)

    def hook() -> None:
        prctl(pr_set_pdeathsig, sigkill, 0, 0, 0)

    return hook


_PREEXEC = _parent_death_hook()


def _wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    details: Callable[[], str],
    alive: Callable[[], str | None] = lambda: None,
) -> T:
    """Call ``check`` until it returns something other than None or False.

    ``check`` may raise ``redis.RedisError`` or ``OSError``; both count as
    "not yet".  ``alive`` returns a reason to stop waiting at once (a process
    that died), or None.

    Returns:
        The first value of ``check`` that is neither None nor False.

    Raises:
        TimeoutError: ``timeout`` seconds passed; the message names ``what``
            and ends with ``details()``.
        RuntimeError: ``alive`` returned a reason.
    """
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            result = check()
        except (redis.RedisError, OSError) as exc:
            result = None
            last_error = f"{type(exc).__name__}: {exc}"
        if result is not None and result is not False:
            return result

        dead = alive()
        if dead is not None:
            raise RuntimeError(f"{what}: {dead}\n{details()}")
        if time.monotonic() >= deadline:
            suffix = f" (last error: {last_error})" if last_error else ""
            raise TimeoutError(
                f"{what}: not reached within {timeout} s{suffix}\n{details()}"
            )
        time.sleep(_POLL_INTERVAL)


def _teardown_all() -> None:
    for server in list(_live_servers):
        server.close()


atexit.register(_teardown_all)


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 in a directory of its own.

    Args:
        persistence: when true the server keeps an append-only file synced on
            every write (``appendfsync always``), so data survives ``kill``;
            when false it never writes data to disk.  RDB snapshots are off
            either way.
        extra_args: further command-line options, e.g.
            ``["--maxmemory", "1mb"]``.
        tls: paths as returned by ``make_tls_material`` (keys ``cert``,
            ``key`` and ``ca``).  The server then accepts TLS only; clients
            may, but need not, present a certificate signed by ``ca``.
        port: a fixed port; by default ``pick_port`` chooses one.
        pick_port: returns a free port; ``free_port`` by default.

    The directory and log survive ``stop``, ``kill`` and ``restart``; they
    go on ``close``, which the context manager and the exit hook call.
    """

    program = "redis-server"

    def __init__(
        self,
        *,
        persistence: bool = False,
        extra_args: Sequence[str] = (),
        tls: dict[str, str] | None = None,
        port: int | None = None,
        pick_port: Callable[[], int] = free_port,
    ) -> None:
        self._executable = _require_program(self.program)
        self.persistence = persistence
        self.extra_args = list(extra_args)
        self.tls = dict(tls) if tls is not None else None
        self._port = port
        self._port_fixed = port is not None
        self._pick_port = pick_port
        self._proc: subprocess.Popen[bytes] | None = None
        self._frozen = False
        self.dir = Path(tempfile.mkdtemp(prefix="pactown-redis-"))
        self.log_path = self.dir / "server.log"
        _live_servers.add(self)

    # -- addresses --------------------------------------------------------

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The port the server listens on (TLS port when ``tls`` is set).

        Raises:
            RuntimeError: the server was never started.
        """
        if self._port is None:
            raise RuntimeError("the server has not been started yet")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``, or ``rediss://`` with TLS."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int:
        """Process id of the running server.

        Raises:
            RuntimeError: the server is not running.
        """
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("the server is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self, **kwargs: Any) -> redis.Redis:
        """Return a client for this server; ``kwargs`` go to ``redis.Redis``.

        With TLS the client trusts the server's CA unless ``kwargs`` say
        otherwise.
        """
        options: dict[str, Any] = {"host": HOST, "port": self.port}
        if self.tls:
            options.update(ssl=True, ssl_ca_certs=self.tls["ca"])
        options.update(kwargs)
        return redis.Redis(**options)

    @contextlib.contextmanager
    def probe(self) -> Iterator[redis.Redis]:
        """Yield a client for health checks, closed on leaving the block.

        It gives up after one second and never retries, so that a wait
        around it keeps to its own deadline.
        """
        client = self.client(
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        try:
            yield client
        finally:
            client.close()

    # -- lifecycle --------------------------------------------------------

    def _command(self) -> list[str]:
        args = [
            self._executable,
            "--bind", HOST,
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--save", "",
            # A replica should sync at once; the default delay of five
            # seconds waits for more replicas to share one transfer.
            "--repl-diskless-sync-delay", "0",
        ]
        if self.persistence:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]

        if self.tls:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", self.tls["cert"],
                "--tls-key-file", self.tls["key"],
                "--tls-ca-cert-file", self.tls["ca"],
                "--tls-auth-clients", "optional",
            ]
        else:
            args += ["--port", str(self.port)]
        return args + self.extra_args

    def start(
        self, *, wait: bool = True, timeout: float = 10.0
    ) -> RedisServer:
        """Start the server; with ``wait`` block until it answers PING.

        The first start picks a port (unless one was given) and picks
        another when the chosen one turns out to be taken.  Later starts
        reuse the port and directory, so persisted data is loaded again.

        Returns:
            self.

        Raises:
            RuntimeError: the server is already running, or it exited
                during startup.
            TimeoutError: it did not answer within ``timeout`` seconds.
        """
        if self.running:
            raise RuntimeError(f"server on port {self._port} already runs")

        attempts = 1 if self._port_fixed else 5
        for attempt in range(attempts):
            if self._port is None:
                self._port = self._pick_port()
            log_offset = self._spawn()
            if not wait:
                break
            try:
                self.wait_ready(timeout)
            except RuntimeError:
                log = self._log_since(log_offset)
                taken = "Address already in use" in log
                if not taken or attempt + 1 == attempts:
                    raise
                self._port = None
                continue
            break

        self._port_fixed = True
        return self

    def _spawn(self) -> int:
        """Launch the process; return the log size before it started."""
        with open(self.log_path, "ab") as log:
            offset = log.tell()
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session keeps a terminal's Ctrl-C away from the
                # servers, so that the tests' teardown decides their end.
                start_new_session=True,
                preexec_fn=_PREEXEC,
            )
        self._frozen = False
        return offset

    def _exit_reason(self) -> str | None:
        if self._proc is None:
            return "the server was never started"
        code = self._proc.poll()
        if code is None:
            return None
        return f"{self.program} exited with status {code}"

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the server answers PING (and has loaded its data).

        Raises:
            RuntimeError: the process exited meanwhile.
            TimeoutError: no answer within ``timeout`` seconds.
        """

        def ping() -> bool:
            with self.probe() as client:
                return bool(client.ping())

        _wait_until(
            ping,
            timeout=timeout,
            what=f"{self.program} on port {self._port}",
            details=self.log_tail,
            alive=self._exit_reason,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM); SIGKILL after ``timeout`` s.

        A frozen server is thawed first, since a stopped process cannot act
        on SIGTERM.  Does nothing when the server is not running.
        """
        if not self.running:
            return
        assert self._proc is not None
        self.thaw()
        self._proc.terminate()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would.

        Does nothing when the server is not running.
        """
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._frozen = False

    def restart(self, *, timeout: float = 10.0) -> RedisServer:
        """Stop the server gracefully if it runs, then start it again.

        The port and directory stay the same, so a persisting server comes
        back with its data.

        Returns:
            self, answering PING.
        """
        self.stop()
        return self.start(timeout=timeout)

    def freeze(self) -> None:
        """Suspend the process (SIGSTOP): connections open, nothing answers.

        Raises:
            RuntimeError: the server is not running.
        """
        os.kill(self.pid, signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        """Resume a frozen process (SIGCONT); harmless if it is not frozen."""
        if self._frozen and self.running:
            assert self._proc is not None
            os.kill(self._proc.pid, signal.SIGCONT)
        self._frozen = False

    def close(self) -> None:
        """Kill the server and delete its directory, log included."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        _live_servers.discard(self)

    def __enter__(self) -> RedisServer:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- diagnostics ------------------------------------------------------

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last ``lines`` lines of the server's log."""
        text = self._log_since(0)
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- {self.log_path} (last {lines} lines) ---\n{tail}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} port={self._port} {state}>"


class _SentinelServer(RedisServer):
    """A ``redis-sentinel`` process watching one primary.

    Sentinel rewrites its configuration file as it learns about replicas,
    other sentinels and failovers, so the file is written once and kept
    across restarts.  The port is given on the command line instead, as
    the first start may have to try more than one.
    """

    program = "redis-sentinel"

    def __init__(
        self,
        *,
        service_name: str,
        primary: tuple[str, int],
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
    ) -> None:
        super().__init__()
        self._monitor = (
            f"sentinel monitor {service_name} {primary[0]} {primary[1]} "
            f"{quorum}\n"
            f"sentinel down-after-milliseconds {service_name} "
            f"{down_after_ms}\n"
            f"sentinel failover-timeout {service_name} "
            f"{failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service_name} 1\n"
        )
        self.config_path = self.dir / "sentinel.conf"

    def _command(self) -> list[str]:
        if not self.config_path.exists():
            self.config_path.write_text(
                f"bind {HOST}\n"
                f"dir {self.dir}\n"
                "daemonize no\n" + self._monitor
            )
        port = str(self.port)
        return [self._executable, str(self.config_path), "--port", port]


class LocalCluster:
    """Six ``redis-server`` nodes forming one Redis Cluster on 127.0.0.1.

    Three primaries share the 16384 slots and each has one replica.  The
    node timeout is ``node_timeout_ms`` (1000 by default) so that a failover
    completes in a few seconds, and replicas take over whatever the age of
    their data.  No node writes data to disk.

    ``start`` (or entering the context manager) returns only once every node
    reports ``cluster_state:ok``, every slot is served, all nodes agree on
    who serves which slots and every replica is in sync with its primary.
    """

    def __init__(
        self,
        *,
        node_timeout_ms: int = 1000,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._cli = _require_program("redis-cli")
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisServer] = []
        for _ in range(6):
            node = RedisServer(
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-replica-validity-factor", "0",
                    *extra_args,
                ],
                pick_port=free_cluster_port,
            )
            self.nodes.append(node)
        self._dead_slots: dict[int, list[tuple[int, int]]] = {}

    # -- addresses --------------------------------------------------------

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node, dead or alive."""
        return [node.address for node in self.nodes]

    @property
    def url(self) -> str:
        """URL of the first node that is still running."""
        return self._live_nodes()[0].url

    def client(self, **kwargs: Any) -> RedisCluster:
        """Return a cluster client; ``kwargs`` go to ``RedisCluster``."""
        nodes = [ClusterNode(host, port) for host, port in self.startup_nodes]
        return RedisCluster(startup_nodes=nodes, **kwargs)

    def node(self, port: int) -> RedisServer:
        """Return the node listening on ``port``.

        Raises:
            KeyError: no node of this cluster has that port.
        """
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(port)

    # -- lifecycle --------------------------------------------------------

    def start(self, timeout: float = 30.0) -> LocalCluster:
        """Start all nodes, create the cluster and wait until it is healthy.

        Returns:
            self.

        Raises:
            RuntimeError: a node exited or ``redis-cli`` failed.
            TimeoutError: the cluster was not healthy within ``timeout`` s.
        """
        deadline = time.monotonic() + timeout

        for node in self.nodes:
            node.start(timeout=_remaining(deadline))

        self._create(_remaining(deadline))
        self.wait_healthy(_remaining(deadline))
        return self

    def _create(self, timeout: float) -> None:
        command = [
            self._cli, "--cluster", "create",
            *(f"{HOST}:{node.port}" for node in self.nodes),
            "--cluster-replicas", "1",
            "--cluster-yes",
        ]
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(
                f"redis-cli --cluster create: no result within {timeout} s\n"
                + self.log_tails()
            ) from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(
                f"redis-cli --cluster create failed "
                f"(status {done.returncode}):\n{output}"
            )

    def close(self) -> None:
        """Kill every node and delete their directories."""
        for node in self.nodes:
            node.close()

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- topology ---------------------------------------------------------

    def _live_nodes(self) -> list[RedisServer]:
        live = [node for node in self.nodes if node.running]
        if not live:
            raise RuntimeError("no node of the cluster is running")
        return live

    def _view(self, node: RedisServer | None = None) -> list[_NodeEntry]:
        """Return the cluster as one node (first live one) sees it."""
        node = node or self._live_nodes()[0]
        with node.probe() as client:
            raw = client.execute_command("CLUSTER", "NODES")
        return [_NodeEntry.parse(line) for line in raw.splitlines() if line]

    def primaries(self) -> list[int]:
        """Ports of the primaries that are up, as a live node sees them."""
        return sorted(
            entry.port
            for entry in self._view()
            if entry.is_primary and not entry.failed
        )

    def replica_of(self, primary: int) -> int:
        """Port of a replica of the primary on port ``primary``.

        Raises:
            LookupError: that primary has no replica that is up.
        """
        view = self._view()
        ids = {entry.port: entry.node_id for entry in view}
        for entry in view:
            if entry.primary_id == ids.get(primary) and not entry.failed:
                return entry.port
        raise LookupError(f"no live replica of the primary on port {primary}")

    def kill_node(self, port: int) -> None:
        """SIGKILL the node on ``port``, remembering the slots it served."""
        slots = [e.slots for e in self._view() if e.port == port]
        self._dead_slots[port] = slots[0] if slots else []
        self.node(port).kill()

    # -- waits ------------------------------------------------------------

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Block until every live node sees a complete, agreed cluster.

        Raises:
            TimeoutError: not reached within ``timeout`` seconds.
        """
        _wait_until(
            self._healthy,
            timeout=timeout,
            what="cluster healthy",
            details=self.log_tails,
        )

    def _healthy(self) -> bool:
        live = self._live_nodes()
        views = []
        for node in live:
            with node.probe() as c:
                info = c.cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
                if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                    return False
                link = c.info("replication").get("master_link_status")
                if link not in (None, "up"):
                    return False
            views.append(self._slot_map(self._view(node)))
        return all(view == views[0] for view in views)

    @staticmethod
    def _slot_map(view: list[_NodeEntry]) -> set[tuple[int, int, int]]:
        return {
            (start, end, entry.port)
            for entry in view
            if entry.is_primary and not entry.failed
            for start, end in entry.slots
        }

    def wait_for_failover(self, dead_port: int, timeout: float = 20.0) -> int:
        """Block until a replica of the killed primary serves its slots.

        ``dead_port`` must have been killed with ``kill_node`` while it was
        a primary.  The wait also requires the cluster to be healthy again
        (see ``wait_healthy``).

        Returns:
            The port of the promoted replica.

        Raises:
            ValueError: ``dead_port`` was not a killed primary.
            TimeoutError: no promotion within ``timeout`` seconds.
        """
        slots = self._dead_slots.get(dead_port)
        if not slots:
            raise ValueError(f"port {dead_port} was not a primary killed here")
        start, end = slots[0]

        def promoted() -> int | None:
            view = self._view()
            owners = [
                e.port for e in view
                if e.is_primary and not e.failed and (start, end) in e.slots
            ]
            if not owners or owners[0] == dead_port:
                return None
            if not self._healthy():
                return None
            return owners[0]

        return _wait_until(
            promoted,
            timeout=timeout,
            what=f"failover of the primary on port {dead_port}",
            details=self.log_tails,
        )

    def log_tails(self, lines: int = 10) -> str:
        """Return the last ``lines`` log lines of every node."""
        return "\n".join(node.log_tail(lines) for node in self.nodes)


class _NodeEntry:
    """One line of ``CLUSTER NODES``."""

    def __init__(
        self,
        node_id: str,
        port: int,
        flags: set[str],
        primary_id: str,
        slots: list[tuple[int, int]],
    ) -> None:
        self.node_id = node_id
        self.port = port
        self.flags = flags
        self.primary_id = primary_id
        self.slots = slots

    @classmethod
    def parse(cls, line: str) -> _NodeEntry:
        fields = line.split()
        address = fields[1].split("@")[0]
        slots = []
        # Slots under migration appear as "[slot->-id]"; a healthy test
        # cluster has none, and they would not count as served anyway.
        for spec in fields[8:]:
            if spec.startswith("["):
                continue
            first, _, last = spec.partition("-")
            slots.append((int(first), int(last or first)))
        return cls(
            node_id=fields[0],
            port=int(address.rsplit(":", 1)[1]),
            flags=set(fields[2].split(",")),
            primary_id=fields[3],
            slots=slots,
        )

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "noaddr", "handshake"})


class LocalSentinel:
    """One primary, one replica and three sentinels on 127.0.0.1.

    The sentinels watch the primary under ``service_name`` with quorum 2,
    call it down after one second without an answer and allow five seconds
    for a failover.  No data server writes to disk.

    ``start`` (or entering the context manager) returns once the replica is
    in sync and every sentinel knows the replica and the other two
    sentinels, which a failover needs.
    """

    service_name = "mymaster"

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer()
        self.sentinel_servers: list[RedisServer] = []
        self._killed: tuple[str, int] | None = None

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of the three sentinels."""
        return [server.address for server in self.sentinel_servers]

    def client(self, **kwargs: Any) -> Sentinel:
        """Return a ``redis.sentinel.Sentinel``; ``kwargs`` go to it."""
        return Sentinel(self.sentinels, **kwargs)

    def start(self, timeout: float = 30.0) -> LocalSentinel:
        """Start the servers and sentinels and wait until they know each other.

        Returns:
            self.

        Raises:
            RuntimeError: a process exited during startup.
            TimeoutError: not ready within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        self.primary.start(timeout=_remaining(deadline))
        primary_port = str(self.primary.port)
        self.replica.extra_args = ["--replicaof", HOST, primary_port]
        self.replica.start(timeout=_remaining(deadline))

        for _ in range(3):
            sentinel = _SentinelServer(
                service_name=self.service_name,
                primary=self.primary.address,
                quorum=2,
                down_after_ms=1000,
                failover_timeout_ms=5000,
            )
            self.sentinel_servers.append(sentinel)
            sentinel.start(timeout=_remaining(deadline))

        _wait_until(
            self._acquainted,
            timeout=_remaining(deadline),
            what="sentinels aware of the replica and of each other",
            details=self.log_tails,
        )
        return self

    def _acquainted(self) -> bool:
        with self.replica.probe() as c:
            if c.info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinel_servers:
            with sentinel.probe() as c:
                state = c.sentinel_master(self.service_name)
            if not isinstance(state, dict):
                return False
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        return True

    def _reported_primary(self) -> tuple[str, int] | None:
        """The primary all live sentinels agree on, or None."""
        answers = set()
        for sentinel in self.sentinel_servers:
            if not sentinel.running:
                continue
            with sentinel.probe() as c:
                reply = c.sentinel_get_master_addr_by_name(self.service_name)
            if not isinstance(reply, tuple):
                return None
            host, port = reply
            answers.add((str(host), int(port)))
        return answers.pop() if len(answers) == 1 else None

    def _server_at(self, address: tuple[str, int]) -> RedisServer:
        for server in (self.primary, self.replica):
            if server.address == address:
                return server
        raise LookupError(f"no data server of this setup is at {address}")

    def kill_primary(self) -> tuple[str, int]:
        """SIGKILL the server the sentinels currently name as primary.

        Returns:
            Its (host, port).

        Raises:
            RuntimeError: the sentinels disagree about the primary.
        """
        address = self._reported_primary()
        if address is None:
            raise RuntimeError("the sentinels disagree about the primary")
        self._server_at(address).kill()
        self._killed = address
        return address

    def wait_for_new_primary(self, timeout: float = 30.0) -> tuple[str, int]:
        """Block until all sentinels name a new primary that acts as one.

        Returns:
            The new primary's (host, port) as the sentinels report it.

        Raises:
            RuntimeError: ``kill_primary`` was not called first.
            TimeoutError: no failover within ``timeout`` seconds.
        """
        killed = self._killed
        if killed is None:
            raise RuntimeError("call kill_primary() before waiting")

        def new_primary() -> tuple[str, int] | None:
            address = self._reported_primary()
            if address is None or address == killed:
                return None
            server = self._server_at(address)
            with server.probe() as c:
                if c.info("replication").get("role") != "master":
                    return None
            return address

        return _wait_until(
            new_primary,
            timeout=timeout,
            what=f"a primary other than {killed[0]}:{killed[1]}",
            details=self.log_tails,
        )

    def close(self) -> None:
        """Kill every process and delete their directories."""
        for server in (*self.sentinel_servers, self.replica, self.primary):
            server.close()

    def __enter__(self) -> LocalSentinel:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def log_tails(self, lines: int = 10) -> str:
        """Return the last ``lines`` log lines of every process."""
        servers = (self.primary, self.replica, *self.sentinel_servers)
        return "\n".join(server.log_tail(lines) for server in servers)


def _remaining(deadline: float) -> float:
    """Seconds left until ``deadline``; at least a sliver, never negative."""
    return max(deadline - time.monotonic(), 0.1)


# -- TLS ------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = pactown-redis test

[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always

[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:{hostname}, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer

[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""

# Elliptic-curve keys are generated in milliseconds where RSA takes far
# longer, which matters for a fixture that runs on every test session.
_KEY_OPTIONS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
_VALID_DAYS = "3"


def _openssl(openssl: str, *args: str, cwd: Path) -> None:
    done = subprocess.run(
        [openssl, *args],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).decode(errors="replace")
        raise RuntimeError(f"openssl {args[0]} failed:\n{output}")


def _make_ca(openssl: str, config: Path, name: str, cn: str) -> None:
    _openssl(
        openssl, "req", "-x509", "-new", "-config", str(config),
        "-extensions", "ca_ext", *_KEY_OPTIONS, "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt",
        "-days", _VALID_DAYS, "-subj", f"/CN={cn}",
        cwd=config.parent,
    )


def _make_leaf(
    openssl: str, config: Path, name: str, cn: str, extensions: str
) -> None:
    _openssl(
        openssl, "req", "-new", "-config", str(config), *_KEY_OPTIONS,
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={cn}",
        cwd=config.parent,
    )
    _openssl(
        openssl, "x509", "-req", "-in", f"{name}.csr",
        "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", str(secrets.randbits(63)),
        "-extfile", str(config), "-extensions", extensions,
        "-sha256", "-days", _VALID_DAYS, "-out", f"{name}.crt",
        cwd=config.parent,
    )


def make_tls_material(
    dirpath: str | os.PathLike[str], hostname: str = "localhost"
) -> dict[str, str]:
    """Create a test CA, certificates signed by it and an unrelated CA.

    The server certificate names ``hostname`` and 127.0.0.1.  Certificates
    are valid for three days from now; keys are unencrypted P-256 keys.

    Returns:
        Absolute paths, by key: ``ca`` and ``ca_key`` (the CA),
        ``cert`` and ``key`` (the server), ``client_cert`` and
        ``client_key`` (a client certificate from the same CA),
        ``wrong_ca`` and ``wrong_ca_key`` (a CA that signed nothing here,
        for clients that must reject the server).  The dict can be passed
        as ``RedisServer(tls=...)`` as it is.

    Raises:
        RuntimeError: ``openssl`` is missing or one of its steps failed.
    """
    openssl = _require_program("openssl")
    folder = Path(dirpath).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG.format(hostname=hostname))

    _make_ca(openssl, config, "ca", "pactown-redis test CA")
    _make_ca(openssl, config, "wrong-ca", "pactown-redis unrelated CA")
    _make_leaf(openssl, config, "server", hostname, "server_ext")
    _make_leaf(openssl, config, "client", "pactown-redis client", "client_ext")

    def path(name: str) -> str:
        return str(folder / name)

    return {
        "ca": path("ca.crt"),
        "ca_key": path("ca.key"),
        "cert": path("server.crt"),
        "key": path("server.key"),
        "client_cert": path("client.crt"),
        "client_key": path("client.key"),
        "wrong_ca": path("wrong-ca.crt"),
        "wrong_ca_key": path("wrong-ca.key"),
    }


class ReplyDropper:
    """Threads relaying TCP between a client and Redis; armed, they lose
    the answer to the next script call. Being threads, they serve sync and
    async clients alike.

    The call reaches Redis and runs; its reply is swallowed and both
    sockets are shut, so the policy sees a broken connection and cannot
    know whether the script ran. Each connection gets two relay threads.
    """

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.armed = False
        self.dropped = 0
        self._listener = socket.create_server((HOST, 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "ReplyDropper":
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        # shutdown() wakes the threads blocked in accept() and recv().
        with self._lock:
            opened = [self._listener, *self._sockets]
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._acceptor.join(5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection((HOST, self.upstream))
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(
                target=self._serve, args=(client, upstream), daemon=True
            ).start()

    def _serve(self, client: socket.socket, upstream: socket.socket) -> None:
        cut = threading.Event()

        def to_server() -> None:
            while data := client.recv(65536):
                if self.armed and b"EVAL" in data.upper():
                    self.armed = False
                    cut.set()
                upstream.sendall(data)

        def to_client() -> None:
            while data := upstream.recv(65536):
                if cut.is_set():
                    self.dropped += 1
                    return
                client.sendall(data)

        pumps = [
            threading.Thread(target=_quietly, args=(pump,), daemon=True)
            for pump in (to_server, to_client)
        ]
        for pump in pumps:
            pump.start()
        pumps[1].join()
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        pumps[0].join()


def _quietly(pump: Any) -> None:
    # A pump ends when either side closes its socket.
    with contextlib.suppress(OSError):
        pump()
