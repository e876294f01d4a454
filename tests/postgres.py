"""A throwaway PostgreSQL server for tests: `initdb` and `pg_ctl` in a temporary directory.

The real server of the Debian `postgresql` package (``.ci/run`` installs it when
missing), started once per test session on a free loopback port, with trust
authentication for connections from 127.0.0.1 and ``fsync=off`` (tests do not pull the
plug on PostgreSQL; everything else is the server as it runs in production). Each test
gets a database of its own (`Cluster.create_database`).

PostgreSQL refuses to run as root: under root, the cluster runs as the `postgres`
system user the package creates, in a directory that user owns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

SUPERUSER = "runbook"


def binaries() -> Path | None:
    """The directory of `initdb` and `pg_ctl` (PG_BINDIR, `pg_config`, or the newest
    /usr/lib/postgresql/<version>/bin), or None when PostgreSQL is not installed."""
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout
        candidates.append(Path(out.strip()))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    candidates += reversed(versions)
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """One PostgreSQL server; `url(database)` for clients."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="runbook-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._as = {"user": "postgres", "group": "postgres"}
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            argv, capture_output=True, text=True, cwd=self.root, check=False, **self._as
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"),
            "-D", str(self.data),
            "-U", SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
        )  # fmt: skip
        self.start_server()

    def start_server(self) -> None:
        """Start the server of the initialized cluster (again, after `stop_server`)."""
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D", str(self.data),
            "-o", options,
            "-l", str(self.root / "server.log"),
            "-w", "start",
        )  # fmt: skip

    def stop_server(self) -> None:
        """Stop the server, dropping every client's connection (`start_server` again)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def started_cluster() -> Cluster | None:
    """A throwaway server, started (benchmarks' `--postgres local`); None when
    PostgreSQL is not installed. Its owner calls `stop()`."""
    bindir = binaries()
    if bindir is None:
        return None
    cluster = Cluster(bindir)
    cluster.start()
    return cluster
