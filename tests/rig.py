"""A throwaway PostgreSQL server for the test suite and the benchmarks.

Runs the machine's PostgreSQL binaries (``pg_config --bindir`` or
``/usr/lib/postgresql/*/bin``) on a free loopback port with a temporary data
directory, as the ``postgres`` user when we are root (initdb refuses root).
``ALCHEMIUM_TEST_POSTGRES_URL`` points everything at an existing server instead.

The throwaway server has no TLS, so its URLs say ``ssl=disable``: with asyncpg's default
(``prefer``) every connection first asks for TLS, and a socket closed before the server
answers (a restart, a killed backend) leaves a "Future exception was never retrieved"
behind (MagicStack/asyncpg#1211).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from alchemium.events.relay import asyncpg_dsn


def postgres_bindir() -> Path:
    """Where the PostgreSQL server binaries are; RuntimeError saying what to install if nowhere."""
    pg_config = shutil.which("pg_config")
    candidates = []
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(Path(out.stdout.strip()))
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    raise RuntimeError(
        "PostgreSQL server binaries not found; install the 'postgresql' package "
        "or set ALCHEMIUM_TEST_POSTGRES_URL"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running throwaway server; ``url(db)`` gives an asyncpg URL."""

    port: int
    datadir: Path | None = None
    bindir: Path | None = None
    external_url: str | None = None
    settings: tuple[str, ...] = ()  # extra -c settings, e.g. ("wal_level=logical",)
    _user: str | None = field(default=None, repr=False)

    def url(self, database: str = "postgres", driver: str = "postgresql+asyncpg") -> str:
        if self.external_url:
            base = self.external_url.rsplit("/", 1)[0]
            return f"{base}/{database}".replace("postgresql://", f"{driver}://", 1)
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}?ssl=disable"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if self._user:
            cmd = ["runuser", "-u", self._user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=120)

    def pg_ctl(self, action: str, *extra: str) -> None:
        assert self.bindir is not None
        assert self.datadir is not None
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.datadir / "data"),
            "-w",
            "-t",
            "60",
            action,
            *extra,
        )

    def start(self) -> None:
        assert self.datadir is not None
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.datadir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=300 -c shared_buffers=128MB"
        )
        opts += "".join(f" -c {setting}" for setting in self.settings)
        self.pg_ctl("start", "-o", opts, "-l", str(self.datadir / "server.log"))

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("stop", "-m", mode)

    def restart(self) -> None:
        """Stop (immediately, like a crash) and start again on the same port."""
        self.stop("immediate")
        self.start()


def libpq_dsn(url: str) -> str:
    """``url`` (SQLAlchemy's asyncpg form) as a DSN for ``asyncpg.connect`` or ``psql``."""
    return asyncpg_dsn(url)


@contextlib.contextmanager
def postgres_server(settings: tuple[str, ...] = ()) -> Iterator[PostgresServer]:
    external = os.environ.get("ALCHEMIUM_TEST_POSTGRES_URL")
    if external and not settings:
        yield PostgresServer(port=0, external_url=external)
        return
    bindir = postgres_bindir()
    tmp = Path(tempfile.mkdtemp(prefix="alchemium-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", user], check=True)
        shutil.chown(tmp, user)
        os.chmod(tmp, 0o700)
    server = PostgresServer(
        port=free_port(), datadir=tmp, bindir=bindir, settings=settings, _user=user
    )
    try:
        server._run(
            str(bindir / "initdb"),
            "-D",
            str(tmp / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        server.start()
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.stop("immediate")
        shutil.rmtree(tmp, ignore_errors=True)


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")
