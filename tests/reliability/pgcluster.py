"""A throwaway PostgreSQL of the test's own, to stop and start mid-load.

The shared server is never restarted: other runs depend on it. This one lives
in a temporary directory, listens on 127.0.0.1 and a free port (and a socket
in that directory), and is always stopped (``-m immediate``) at the end.

The binaries are the first of: ``$REL_PG_BIN``, the newest
``/usr/lib/postgresql/*/bin``, the ``pgserver`` package's, ``pg_config
--bindir``. As root, the server runs as the ``postgres`` (or ``pgserver``)
system user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


class ClusterError(RuntimeError):
    """The throwaway server could not be set up."""


def find_bindir() -> Path:
    candidates: list[str] = []
    if os.environ.get("REL_PG_BIN"):
        candidates.append(os.environ["REL_PG_BIN"])
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]),
        reverse=True,
    )
    # Located without importing it: importing pgserver has side effects.
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "pginstall" / "bin"))
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    for candidate in candidates:
        if (
            candidate
            and (Path(candidate) / "pg_ctl").exists()
            and (Path(candidate) / "initdb").exists()
        ):
            return Path(candidate)
    raise ClusterError(
        "No PostgreSQL binaries (initdb, pg_ctl) found for the throwaway server: "
        "set REL_PG_BIN to a PostgreSQL bin directory, or install pgserver."
    )


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    for user in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(user)
            return user
        except KeyError:
            continue
    raise ClusterError("Running as root, and no 'postgres' user to run PostgreSQL as.")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Cluster:
    """``with Cluster() as pg: pg.url; pg.stop(); pg.start()``."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="asgi_dbset_rel_pg_"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _cmd(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        return [*prefix, *args]

    def _run(self, *args: str, timeout: float = 60) -> None:
        result = subprocess.run(
            self._cmd(*args), capture_output=True, text=True, timeout=timeout
        )
        if result.returncode != 0:
            raise ClusterError(
                f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n"
                f"{result.stderr}\n{self.log_tail()}"
            )

    def __enter__(self) -> Cluster:
        try:
            self.init()
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    def init(self) -> None:
        if self.user:
            shutil.chown(self.root, self.user)
            os.chmod(self.root, 0o700)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def start(self, timeout: float = 60) -> None:
        options = (
            f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off "
            "-c max_connections=40 -c shared_buffers=16MB"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            str(int(timeout)),
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """``fast`` terminates every session, as a restart or failover does."""
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"
        )

    def restart(self, downtime: float) -> None:
        """Stop, stay down ``downtime`` seconds, start again."""
        self.stop()
        time.sleep(downtime)
        self.start()
        self.restarts += 1

    def running(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.Error:
            return False

    def destroy(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                subprocess.run(
                    self._cmd(
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(self.data),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ),
                    capture_output=True,
                    timeout=60,
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
