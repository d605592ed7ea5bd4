"""The cluster of ``docker-compose.yml`` as local processes, in one command.

::

    python examples/local_topology.py [--replicas 3] [--requests 60]
        [--concurrency 3] [--key KEY] [--redis-url URL] [--serve]

Starts one ``redis-server`` on a free port of 127.0.0.1 (or uses
``--redis-url``, else ``REDIS_URL`` when set), three uvicorn processes of
``examples/app`` on free ports, all configured like the compose services,
then sends one API key's requests round-robin to them with
``examples/loadgen.py`` and prints what each replica answered. With
``--serve`` the replicas keep running until Ctrl-C.

Every process it starts is stopped when it ends, also on Ctrl-C, SIGTERM or
an error; on Linux they are also killed if this process itself is killed.
The exit status is the load generator's (0: one shared limit), 130 after
an interrupt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import httpx
import psutil
import redis

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APP_DIR = HERE / "app"
HARNESS = REPO / "tests" / "servers.py"

# The load generator lives beside this file; running this file puts its
# folder on sys.path, importing it by path does not.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402

from pactown_redis.errors import InvalidInputError  # noqa: E402

HOST = "127.0.0.1"
#: The options of the compose file's Redis that matter to the limits: a
#: full Redis refuses writes instead of evicting someone's bucket.
REDIS_ARGS = ("--maxmemory-policy", "noeviction")

#: Seconds a replica may take to listen and answer /health.
START_TIMEOUT = 60.0
#: Seconds a process has to exit after SIGTERM before it is killed.
STOP_TIMEOUT = 10.0
_POLL_INTERVAL = 0.05
_LOG_TAIL_CHARS = 3000


class RedisProcess(Protocol):
    """What the topology needs of a started Redis server."""

    @property
    def url(self) -> str: ...

    def close(self) -> None: ...


def _die_with_parent() -> Optional[Callable[[], None]]:
    """Return a pre-exec hook that has Linux SIGTERM the child when this
    process dies, so that even a SIGKILL of this script orphans nothing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return hook


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``process``, SIGKILL it after ``STOP_TIMEOUT``, and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-_LOG_TAIL_CHARS:]


class BareRedis:
    """A ``redis-server`` on a free port of 127.0.0.1, without the test
    harness: no persistence, ``REDIS_ARGS`` applied, data in ``workdir``.
    """

    def __init__(self, workdir: Path) -> None:
        program = shutil.which("redis-server")
        if program is None:
            raise RuntimeError(
                "redis-server is not installed; run scripts/setup.sh, or "
                "pass --redis-url"
            )
        self._program = program
        self._dir = workdir
        self._log = workdir / "redis.log"
        self._process: Optional[subprocess.Popen[bytes]] = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "BareRedis":
        """Start the server and wait for its PING; a port another process
        took in the meantime is replaced by a new one.

        Raises:
            RuntimeError: the server exited; the message ends with its log.
            TimeoutError: no PONG within ``timeout`` seconds.
        """
        for _ in range(5):
            self.port = _free_port()
            self._process = self._spawn()
            try:
                self._wait(timeout)
                return self
            except RuntimeError:
                self._process.wait()
                if "Address already in use" not in _tail(self._log):
                    raise
            except BaseException:
                _stop(self._process)
                raise
        raise RuntimeError("no free port for redis-server")

    def _spawn(self) -> subprocess.Popen[bytes]:
        args = [
            self._program, "--bind", HOST, "--port", str(self.port),
            "--dir", str(self._dir), "--save", "", "--appendonly", "no",
            "--daemonize", "no", *REDIS_ARGS,
        ]
        with open(self._log, "ab") as log:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
            )

    def _wait(self, timeout: float) -> None:
        assert self._process is not None
        client = redis.Redis(
            host=HOST, port=self.port, socket_timeout=1.0,
            socket_connect_timeout=1.0,
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited:\n{_tail(self._log)}"
                    )
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"redis-server gave no PONG in {timeout} s:\n"
                        f"{_tail(self._log)}"
                    )
                time.sleep(_POLL_INTERVAL)
        finally:
            client.close()

    def close(self) -> None:
        if self._process is not None:
            _stop(self._process)


class _GivenRedis:
    """A Redis someone else runs: nothing to start or stop."""

    def __init__(self, url: str) -> None:
        self.url = url

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


_harness: list[Optional[ModuleType]] = []


def _load_harness() -> Optional[ModuleType]:
    """Return the test suite's server harness, or None outside a full
    checkout (an sdist or a copied example)."""
    if not _harness:
        _harness.append(_import_harness())
    return _harness[0]


def _import_harness() -> Optional[ModuleType]:
    if not HARNESS.is_file():
        return None
    spec = importlib.util.spec_from_file_location(
        "pactown_topology_servers", HARNESS
    )
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ImportError:
        del sys.modules[spec.name]
        return None
    return module


def start_redis(workdir: Path, *, use_harness: bool = True) -> RedisProcess:
    """Start a private redis-server: the test harness's ``RedisServer`` when
    the checkout has it and ``use_harness`` is true, else :class:`BareRedis`.

    Raises:
        RuntimeError, TimeoutError: the server did not come up.
    """
    harness = _load_harness() if use_harness else None
    if harness is None:
        return BareRedis(workdir).start()
    server = harness.RedisServer(extra_args=REDIS_ARGS)
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    started: RedisProcess = server
    return started


class Replica:
    """One uvicorn process of the example app on a free port, one of
    ``replicas`` on the same Redis."""

    def __init__(
        self, number: int, redis_url: str, workdir: Path, *, replicas: int
    ) -> None:
        self.number = number
        self.log_path = workdir / f"replica-{number}.log"
        self.port = 0
        # Without Redis each replica allows its share of a limit, so that
        # all of them together still allow it once.
        env = {
            **os.environ,
            "PACTOWN_REDIS_URL": redis_url,
            "PACTOWN_REPLICAS": str(replicas),
        }
        # The replicas import pactown_redis from this checkout even when it
        # is not installed.
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
        )
        command = [
            sys.executable, "-m", "uvicorn", "--factory",
            "--app-dir", str(APP_DIR), "main:create_app",
            # Port 0: the kernel picks a free port, so no other process can
            # take it between choosing and binding.
            "--host", HOST, "--port", "0", "--no-access-log",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent(),
            )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _listening_port(self) -> int:
        try:
            process = psutil.Process(self.pid)
            # net_connections is psutil 6's name for connections.
            listing = getattr(process, "net_connections", process.connections)
            connections = listing("tcp")
        except psutil.Error:
            return 0
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                return int(conn.laddr.port)
        return 0

    def wait_ready(self, deadline: float) -> None:
        """Block until the replica listens and answers ``GET /health``.

        Args:
            deadline: a ``time.monotonic()`` value.

        Raises:
            RuntimeError: the process exited; the message ends with its log.
            TimeoutError: the deadline passed.
        """
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"replica {self.number} exited with status "
                    f"{self.process.returncode}:\n{_tail(self.log_path)}"
                )
            if not self.port:
                self.port = self._listening_port()
            if self.port and self._healthy():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"replica {self.number} not ready in time:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)

    def _healthy(self) -> bool:
        try:
            response = httpx.get(self.url + loadgen.HEALTH_PATH, timeout=1.0)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    def close(self) -> None:
        _stop(self.process)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM inside the block, so that a second Ctrl-C
    cannot cut a teardown short; only the main thread may do this."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = (signal.SIGINT, signal.SIGTERM)
    previous = {name: signal.signal(name, signal.SIG_IGN) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)


class Topology:
    """One Redis and ``replicas`` processes of the example app on it.

    Args:
        replicas: how many app processes (1..16).
        redis_url: a Redis to use; by default a private redis-server is
            started and stopped with the topology.
        use_harness: start that server with the test harness when the
            checkout has it.

    Use it as a context manager, or call :meth:`start` and :meth:`close`.

    Raises:
        InvalidInputError: ``replicas`` out of range.
    """

    def __init__(
        self,
        replicas: int = 3,
        *,
        redis_url: Optional[str] = None,
        use_harness: bool = True,
    ) -> None:
        loadgen.check_count(replicas, "replicas", 16)
        self.replica_count = replicas
        self.given_url = redis_url
        self.use_harness = use_harness
        self.redis: Optional[RedisProcess] = None
        self.replicas: list[Replica] = []
        self.workdir: Optional[Path] = None

    @property
    def urls(self) -> list[str]:
        """The replicas' base URLs."""
        return [replica.url for replica in self.replicas]

    @property
    def redis_url(self) -> str:
        if self.redis is None:
            raise RuntimeError("the topology is not started")
        return self.redis.url

    def start(self) -> "Topology":
        """Start Redis and the replicas and wait until all answer; on any
        failure stop whatever was started, then raise.

        Raises:
            RuntimeError, TimeoutError: a process did not come up; the
                message ends with its log.
        """
        self.workdir = Path(tempfile.mkdtemp(prefix="pactown-topology-"))
        try:
            if self.given_url is not None:
                self.redis = _GivenRedis(self.given_url)
            else:
                self.redis = start_redis(
                    self.workdir, use_harness=self.use_harness
                )
            # One at a time, so that a failed spawn leaves the ones before
            # it in the list that close() stops.
            for number in range(1, self.replica_count + 1):
                self.replicas.append(
                    Replica(
                        number, self.redis.url, self.workdir,
                        replicas=self.replica_count,
                    )
                )
            deadline = time.monotonic() + START_TIMEOUT
            for replica in self.replicas:
                replica.wait_ready(deadline)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every replica, then Redis, and remove the logs; safe to
        call more than once."""
        with _signals_ignored():
            for replica in self.replicas:
                replica.close()
            if self.redis is not None:
                self.redis.close()
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def __enter__(self) -> "Topology":
        return self.start()

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt inside the block, so that a
    terminated run tears down like one stopped with Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the compose cluster as local processes: one Redis, "
        "replicas of the example app, and the load generator."
    )
    parser.add_argument(
        "--replicas", type=int, default=3,
        help="app processes to start (default 3)",
    )
    loadgen.add_load_arguments(parser)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"),
        help="use this Redis instead of starting one (default: $REDIS_URL)",
    )
    parser.add_argument(
        "--serve", action="store_true",
        help="keep the replicas running after the load until Ctrl-C",
    )
    return parser.parse_args(argv)


def _describe(topology: Topology) -> str:
    origin = "given" if topology.given_url is not None else "started here"
    lines = [f"redis      {topology.redis_url} ({origin})"]
    for replica in topology.replicas:
        lines.append(
            f"replica {replica.number}  {replica.url} (pid {replica.pid})"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the topology once; return the exit status (see the module's
    docstring)."""
    args = _parse(argv)
    try:
        with _sigterm_interrupts(), Topology(
            args.replicas, redis_url=args.redis_url
        ) as topology:
            print(_describe(topology), flush=True)
            report = asyncio.run(
                loadgen.send_load(
                    topology.urls,
                    key=args.key or loadgen.new_key(),
                    requests=args.requests,
                    concurrency=args.concurrency,
                )
            )
            print(loadgen.format_report(report), flush=True)
            if args.serve:
                print("serving until Ctrl-C", flush=True)
                while True:
                    time.sleep(3600)
            return report.verdict()[0]
    except KeyboardInterrupt:
        print("interrupted: every process stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, InvalidInputError) as exc:
        print(f"local_topology: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
