"""A uvicorn server in a subprocess, serving :mod:`tests.reliability.app`.

The listening socket is bound here, on 127.0.0.1 and a port the kernel picks,
and handed to uvicorn (``--fd``): no port race between tests. The server's
output goes to a log file the tests read afterwards (errors are one line each,
see :mod:`tests.reliability.server_settings`).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ServerConfig:
    db_url: str
    app_name: str
    db_name: str | None = None
    pool: dict[str, Any] = field(
        default_factory=lambda: {"min_size": 2, "max_size": 10, "timeout": 10}
    )
    asgi_dbset: dict[str, Any] = field(default_factory=dict)
    stock: bool = False
    health_checks: bool = False
    # db_url is a PgBouncer in transaction pooling mode: declare it so.
    transaction_pooled: bool = False

    def environ(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("REL_", "DJANGO_", "PYTEST_"))
        }
        env.update(
            DJANGO_SETTINGS_MODULE="tests.reliability.server_settings",
            REL_DB_URL=self.db_url,
            REL_DB_NAME=self.db_name or "",
            REL_APP_NAME=self.app_name,
            REL_POOL=json.dumps(self.pool),
            REL_ASGI_DBSET=json.dumps(self.asgi_dbset),
            REL_STOCK="1" if self.stock else "",
            REL_HEALTH_CHECKS="1" if self.health_checks else "",
            REL_TRANSACTION_POOLED="1" if self.transaction_pooled else "",
            PYTHONUNBUFFERED="1",
        )
        return env


class ServerError(RuntimeError):
    """The server process did not start, or died."""


class Server:
    """``with Server(config, log_path) as server: server.get("/plain/")``."""

    def __init__(self, config: ServerConfig, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(4096)
        self.port = sock.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "tests.reliability.app:application",
            "--fd",
            str(sock.fileno()),
            "--lifespan",
            "auto" if self.config.stock else "on",
            "--log-level",
            "info",
            "--no-access-log",
            "--timeout-graceful-shutdown",
            "5",
        ]
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    command,
                    cwd=REPO,
                    env=self.config.environ(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=[sock.fileno()],
                    start_new_session=True,
                )
            finally:
                sock.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise ServerError(
                    f"the server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                self.state(timeout=2)
                return
            except OSError:
                time.sleep(0.1)
        raise ServerError(
            f"the server was not ready in {timeout} s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown, lifespan included), then SIGKILL."""
        proc = self.proc
        if proc is None:
            return self.returncode
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            self.returncode = proc.returncode
            self.proc = None
        return self.returncode

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- talking to it ---------------------------------------------------------

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        """One GET; returns the status and the decoded JSON body (or the text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def state(self, timeout: float = 10.0) -> dict[str, Any]:
        status, body = self.get("/_rel/state", timeout=timeout)
        if status != 200:
            raise ServerError(f"/_rel/state answered {status}: {body}")
        return dict(body)

    def wait_quiet(self, timeout: float = 10.0) -> dict[str, Any]:
        """Poll the state until no request, set, lane or connection is out.

        Returns the last state; the caller asserts on it (so a failure shows
        what stayed out).
        """
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if quiet(state) or time.monotonic() >= deadline:
                return state
            time.sleep(0.05)

    # -- its log ---------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_lines(self, needle: str) -> list[str]:
        return [line for line in self.log().splitlines() if needle in line]


def quiet(state: dict[str, Any]) -> bool:
    """Nothing checked out, no extra lane or set open, no request running."""
    counters = state.get("counters", {})
    return (
        state["checked_out"] == 0
        and state["budget"] == 0
        and state["request_contexts"] == 0
        and counters.get("sets_open", 0) == 0
        and counters.get("lanes_open", 0) == 0
    )
