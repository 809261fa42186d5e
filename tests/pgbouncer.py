"""A real PgBouncer, in transaction pooling mode, in front of the test server.

Debian's ``pgbouncer`` package (``make pgbouncer`` installs it when missing;
``make test`` does that first). PgBouncer refuses to run as root: as root it
runs as ``postgres`` (Debian's PostgreSQL user), with its files in a
directory that user owns. It listens on 127.0.0.1 only, on a free port, and
is stopped at exit.

    with PgBouncer("127.0.0.1", 5432, pool_size=5) as bouncer:
        url = bouncer.url("postgresql://postgres@127.0.0.1:5432/postgres")
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


class PgBouncerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PgBouncer:
    """One PgBouncer process; see the module docstring."""

    def __init__(
        self,
        server_host: str,
        server_port: int,
        *,
        user: str = "postgres",
        pool_size: int = 5,
        max_client_conn: int = 500,
    ) -> None:
        binary = shutil.which("pgbouncer") or (
            "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
        )
        if binary is None:
            raise PgBouncerError(
                "pgbouncer is not installed: run `make pgbouncer` (as root it "
                "installs Debian's package; otherwise: sudo apt-get install pgbouncer)."
            )
        self.binary = binary
        self.server_host = server_host
        self.server_port = server_port
        self.user = user
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgBouncer 127.0.0.1:{self.port} -> {self.server_host}:{self.server_port}>"

    def url(self, server_url: str) -> str:
        """*server_url* (a libpq URL of the server), through this PgBouncer."""
        return make_conninfo(server_url, host="127.0.0.1", port=str(self.port))

    def start(self) -> None:
        self.port = _free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="asgi_dbset_pgbouncer_"))
        (self.dir / "userlist.txt").write_text(f'"{self.user}" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            f"admin_users = {self.user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            f"max_client_conn = {self.max_client_conn}\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
            # Clients' own startup parameter (psycopg sends none of these by
            # default; a libpq `options=` would be refused otherwise).
            "ignore_startup_parameters = extra_float_digits\n"
            "log_connections = 0\n"
            "log_disconnections = 0\n"
        )
        command = [self.binary, str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            # PgBouncer refuses root: run it as the server's own user (the
            # owner of its socket's directory, which only that user may enter,
            # or Debian's postgres for a server on TCP).
            if self.server_host.startswith("/"):
                owner = pwd.getpwuid(os.stat(self.server_host).st_uid)
            else:
                owner = pwd.getpwnam("postgres")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            for path in self.dir.iterdir():
                os.chown(path, owner.pw_uid, owner.pw_gid)
            command = ["runuser", "-u", owner.pw_name, "--", *command]
        # Its own process group: stop() signals PgBouncer itself, not only
        # runuser (which does not pass every signal on).
        self.process = subprocess.Popen(
            command,
            # (Its log goes to its logfile: an unread pipe would fill up and
            # stop it.)
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        atexit.register(self.stop)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PgBouncerError(
                    f"pgbouncer exited ({self.process.returncode}): {self.log()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise PgBouncerError(f"pgbouncer did not listen within 15 s: {self.log()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                # SIGINT: PgBouncer's immediate shutdown.
                os.killpg(process.pid, signal.SIGINT)
                process.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def log(self) -> str:
        path = self.dir / "pgbouncer.log" if self.dir else None
        return path.read_text()[-4000:] if path and path.exists() else ""

    def admin(self, command: str) -> list[tuple[object, ...]]:
        """Run a command on PgBouncer's admin console (simple query protocol)."""
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            dbname="pgbouncer",
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
        ) as conn:
            cursor = conn.execute(command)
            return list(cursor.fetchall()) if cursor.description else []

    def close_server_connections(self, dbname: str) -> None:
        """Close PgBouncer's server connections to *dbname* (so it can be
        dropped), and let clients connect again."""
        try:
            self.admin(f"KILL {dbname}")
        finally:
            self.admin(f"RESUME {dbname}")


def in_front_of(server_url: str, **options: object) -> tuple[PgBouncer, str]:
    """Start a PgBouncer in front of the server of *server_url*; it and the
    URL through it."""
    params = conninfo_to_dict(server_url)
    # A TCP host, or the directory of the server's Unix socket (the embedded
    # server's): PgBouncer's `host=` takes either.
    host = str(params.get("host") or "127.0.0.1")
    bouncer = PgBouncer(
        host,
        int(params.get("port") or 5432),
        user=str(params.get("user") or "postgres"),
        **options,  # type: ignore[arg-type]
    )
    bouncer.start()
    return bouncer, bouncer.url(server_url)
