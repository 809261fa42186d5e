"""The benchmark harness: ``python -m bench [--quick]`` (``make bench``).

1. Creates and seeds the benchmark database (``BENCH_DB``, default
   ``bench_asgi_dbset``) on ``BENCH_DSN`` and checks that Django still
   generates the SQL the ceiling sends.
2. W1, W2, W3: every server up at once (uvicorn, each its own process), wrk
   (another process) runs each point on every variant in turn, A B C ... A B
   C, rounds after rounds, so drift of the machine's load lands on every
   variant alike.
3. W4: one server at a time, since each fills its pool, every variant on a
   fresh server of its own; rounds rotate the order. W5: W1 again with all
   servers behind bench/delayproxy.py.
4. Writes the results JSON and the report (``bench/report.py``).

Every run is bounded: wrk by ``-d``, every subprocess by a timeout, the whole
harness by ``--deadline``. Load only ever targets 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo

from bench import config

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
WORK = BENCH / ".work"
LUA = BENCH / "report.lua"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", flush=True)


# -- plan -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    w3_rounds: int
    w1_ks: tuple[int, ...]
    w2_ks: tuple[int, ...]
    w1_seconds: int
    w2_seconds: int
    w3_seconds: int
    w4_seconds: int
    warm_seconds: int
    w5_rounds: int = 1
    w5_ks: tuple[int, ...] = (1, 4)
    w5_seconds: int = 1
    w3_clients: int = 8
    w4_clients: int = 64
    w4_k: int = 4
    #: W4's rounds; each variant runs on a fresh server of its own every round.
    w4_rounds: int = 1


FULL = Plan(
    rounds=3,
    w3_rounds=6,
    w1_ks=(1, 2, 3, 4, 5, 6, 7, 8),
    w2_ks=(1, 2, 4, 8),
    w1_seconds=1,
    w2_seconds=1,
    w3_seconds=2,
    w4_seconds=5,
    warm_seconds=1,
    w5_rounds=2,
    w5_ks=(1, 2, 4, 8),
    w4_rounds=5,
)
QUICK = Plan(
    rounds=1,
    w3_rounds=2,
    w1_ks=(1, 2, 4, 8),
    w2_ks=(1, 4),
    w1_seconds=1,
    w2_seconds=1,
    w3_seconds=1,
    w4_seconds=2,
    warm_seconds=1,
)


@dataclass(frozen=True)
class Series:
    """One measured variant: a server and the URL prefix of its views."""

    name: str
    server: str
    prefix: str
    parallelism: int | None = None


#: Each server: its ASGI app, its environment, its venv ("main" runs the
#: harness too; "dab" is Python 3.12 + Django 6.1 + django-async-backend).
SERVERS: dict[str, dict[str, str]] = {
    "stock": {
        "app": "bench.djsite.asgi:application",
        "BENCH_VARIANT": "stock",
        "venv": "main",
    },
    "dbset": {
        "app": "bench.djsite.asgi:application",
        "BENCH_VARIANT": "dbset",
        "venv": "main",
    },
    # W6's second stock server: stock against stock in the same run measures
    # how far two identical servers' figures stray apart (the run's resolution).
    "stock-twin": {
        "app": "bench.djsite.asgi:application",
        "BENCH_VARIANT": "stock",
        "venv": "main",
    },
    "ceiling": {"app": "bench.ceiling:app", "venv": "main"},
    "stock-dj61": {
        "app": "bench.djsite.asgi:application",
        "BENCH_VARIANT": "stock",
        "venv": "dab",
    },
    "dab": {
        "app": "bench.djsite.asgi:application",
        "BENCH_VARIANT": "dab",
        "venv": "dab",
    },
    # asgi_dbset on django-async-backend's Django 6.1 / Python 3.12: W1 like
    # for like with it and with stock-dj61.
    "dbset-dj61": {
        "app": "bench.djsite.asgi:application",
        "BENCH_VARIANT": "dbset",
        "venv": "dab",
    },
}
VENVS = {"main": Path(sys.executable), "dab": WORK / "venv-dab" / "bin" / "python"}

ALL_SERIES = (
    Series("stock", "stock", "/p1"),
    Series("dbset-p1", "dbset", "/p1", 1),
    Series("dbset-p2", "dbset", "/p2", 2),
    Series("dbset-p4", "dbset", "/p4", 4),
    Series("dbset-p8", "dbset", "/p8", 8),
    Series("ceiling", "ceiling", "/p1"),
    Series("stock-dj61", "stock-dj61", "/p1"),
    Series("dab", "dab", "/p1"),
    Series("dbset-dj61-p2", "dbset-dj61", "/p2", 2),
    Series("dbset-dj61-p4", "dbset-dj61", "/p4", 4),
    Series("dbset-dj61-p8", "dbset-dj61", "/p8", 8),
)
W3_SERIES = ("stock", "dbset-p1", "dbset-p4", "ceiling", "stock-dj61", "dab")
#: Series measured in W1 only: the like-for-like comparison with
#: django-async-backend on its interpreter and Django.
W1_ONLY_SERIES = ("dbset-dj61-p2", "dbset-dj61-p4", "dbset-dj61-p8")


def rotate(items: list[Any], n: int) -> list[Any]:
    if not items:
        return items
    n %= len(items)
    return items[n:] + items[:n]


# -- database -------------------------------------------------------------------


SEED_SQL = """
CREATE TABLE IF NOT EXISTS bench_item (
    id bigint PRIMARY KEY,
    category integer NOT NULL,
    price integer NOT NULL,
    qty integer NOT NULL,
    name varchar(32) NOT NULL
);
CREATE OR REPLACE FUNCTION bench_sleep(seconds double precision) RETURNS boolean
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_sleep(seconds);
    RETURN true;
END $$;
"""


def prepare_database() -> dict[str, Any]:
    """Create and seed DB_NAME (idempotent); return the server's settings."""
    with psycopg.connect(config.SERVER_DSN, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (config.DB_NAME,)
        ).fetchone()
        if not exists:
            say(f"creating database {config.DB_NAME}")
            conn.execute(f'CREATE DATABASE "{config.DB_NAME}"')
        # One core per query, so parallel lanes are what spreads a request's
        # work over the server's cores; no JIT compile time in the figures.
        conn.execute(
            f'ALTER DATABASE "{config.DB_NAME}" SET max_parallel_workers_per_gather = 0'
        )
        conn.execute(f'ALTER DATABASE "{config.DB_NAME}" SET jit = off')
    with psycopg.connect(config.db_dsn("bench_harness"), autocommit=True) as conn:
        conn.execute(SEED_SQL)
        rows = conn.execute("SELECT count(*) FROM bench_item").fetchone()[0]
        if rows != config.ROWS:
            say(f"seeding bench_item with {config.ROWS} rows")
            conn.execute("TRUNCATE bench_item")
            conn.execute(
                "INSERT INTO bench_item (id, category, price, qty, name) "
                "SELECT g, g %% 100, (g * 7) %% 1000, g %% 97, 'item ' || g "
                "FROM generate_series(1, %s) AS g",
                (config.ROWS,),
            )
            conn.execute("VACUUM ANALYZE bench_item")
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('max_connections', 'shared_buffers', 'max_parallel_workers_per_gather',"
                " 'jit', 'server_version', 'work_mem', 'effective_io_concurrency')"
            ).fetchall()
        )
        started = time.perf_counter()
        conn.execute(config.AGGREGATE_SQL, (0,)).fetchall()
        settings["aggregate_ms"] = round((time.perf_counter() - started) * 1000, 1)
        settings["table_mb"] = conn.execute(
            "SELECT pg_total_relation_size('bench_item') / 1048576"
        ).fetchone()[0]
    return settings


def check_sql(python: str) -> dict[str, Any]:
    """Run bench.sqlcheck in a fresh process: Django's SQL vs the ceiling's."""
    out = subprocess.run(
        [python, "-m", "bench.sqlcheck"],
        cwd=REPO,
        env=_env({"BENCH_VARIANT": "stock"}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench: the SQL check failed:\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout)


# -- servers --------------------------------------------------------------------


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("DJANGO_SETTINGS_MODULE", "bench.djsite.settings")
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:2000]


class Server:
    """One uvicorn process serving one variant on 127.0.0.1."""

    def __init__(self, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.python = str(VENVS[SERVERS[name]["venv"]])
        self.extra_env = env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = WORK / "logs" / f"{name}.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        spec = SERVERS[self.name]
        self.port = free_port()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = _env({k: v for k, v in spec.items() if k.startswith("BENCH_")})
        # The connection sampler counts this server's connections by this name.
        env["BENCH_APP_NAME"] = f"bench_{self.name}"
        env.update(self.extra_env)
        command = [
            self.python,
            "-m",
            "uvicorn",
            spec["app"],
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        with self.log.open("ab") as log:
            log.write(f"\n--- {time.ctime()} {' '.join(command)}\n".encode())
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server {self.name} exited with {self.proc.returncode}:\n"
                    + self.log.read_text()[-3000:]
                )
            with contextlib.suppress(OSError):
                if http_get(self.base + "/health/", timeout=2)[0] == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server {self.name} did not answer within {timeout} s")

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process, all its threads."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / CLK_TCK

    def stats(self) -> dict[str, Any]:
        status, body = http_get(self.base + "/stats/")
        return json.loads(body) if status == 200 else {"error": body[:500]}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


# -- measuring ------------------------------------------------------------------


class ConnectionSampler:
    """Polls pg_stat_activity and keeps the most connections seen per
    application_name (the servers name theirs bench_<variant>)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.max: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ConnectionSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=10)

    def _run(self) -> None:
        with psycopg.connect(config.db_dsn("bench_harness"), autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid() GROUP BY 1",
                    (config.DB_NAME,),
                ).fetchall()
                for name, count in rows:
                    self.max[name] = max(self.max[name], count)
                self._stop.wait(self.interval)


def _target() -> str:
    params = config.server_params()
    return f"{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}"


def _measure_rtt(proxied_dsn: str, n: int = 200) -> dict[str, float]:
    """Median time of `SELECT 1`, directly and through the proxy (ms)."""
    out = {}
    deadline = time.monotonic() + 30
    for name, dsn in (("direct_ms", config.SERVER_DSN), ("proxied_ms", proxied_dsn)):
        while True:
            try:
                conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with conn:
            times = []
            for _ in range(n):
                started = time.perf_counter()
                conn.execute("SELECT 1").fetchone()
                times.append((time.perf_counter() - started) * 1000)
        out[name] = round(statistics.median(times), 3)
    return out


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wrk(url: str, clients: int, seconds: int) -> dict[str, Any]:
    command = [
        "wrk",
        "-t1",
        f"-c{clients}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line.removeprefix("BENCHJSON "))
    raise RuntimeError(
        f"wrk gave no figures ({out.returncode}): {out.stdout}{out.stderr}"
    )


@dataclass
class Harness:
    plan: Plan
    deadline: float
    workloads: frozenset[str] = frozenset({"W1", "W2", "W3", "W4"})
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    server_stats: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    skipped_runs: int = 0

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    def measure(
        self,
        server: Server,
        series: Series,
        workload: str,
        path: str,
        *,
        k: int | None,
        clients: int,
        seconds: int,
        round_no: int,
        sample: bool,
    ) -> None:
        if self.out_of_time():
            self.skipped_runs += 1
            return
        query = f"?k={k}" if k is not None else ""
        url = f"{server.base}{series.prefix}/{path}/{query}"
        load = os.getloadavg()[0]
        # Under W4, what the sets did: the library's counters around the run.
        counted = workload == "W4" and series.server == "dbset"
        before = server.stats().get("asgi_dbset", {}) if counted else {}
        cpu0, wrk0 = server.cpu_seconds(), children_cpu()
        sampler = ConnectionSampler() if sample else contextlib.nullcontext()
        with sampler as seen:
            figures = wrk(url, clients, seconds)
        cpu1, wrk1 = server.cpu_seconds(), children_cpu()
        seconds_run = figures["duration_us"] / 1e6
        requests = figures["requests"]
        per_request = {}
        if counted and requests:
            after = server.stats().get("asgi_dbset", {})
            per_request = {
                key: round((after.get(key, 0) - before.get(key, 0)) / requests, 3)
                for key in ("lanes_leased", "lease_failures", "waits", "cancels")
            }
        run = {
            "workload": workload,
            "series": series.name,
            "k": k,
            "clients": clients,
            "round": round_no,
            "at": time.time(),
            "seconds": round(seconds_run, 3),
            "requests": requests,
            "rps": round(requests / seconds_run, 2) if seconds_run else 0.0,
            "latency_us": figures["latency_us"],
            "errors": {k_: v for k_, v in figures["errors"].items() if v},
            "server_cpu_s": round(cpu1 - cpu0, 3),
            "server_cpu_us_per_request": (
                round((cpu1 - cpu0) / requests * 1e6, 1) if requests else None
            ),
            "wrk_cpu_s": round(wrk1 - wrk0, 3),
            "load_1min": load,
        }
        if per_request:
            run["sets_per_request"] = per_request
        if seen is not None:
            run["max_connections"] = seen.max.get(f"bench_{series.server}", 0)
            run["max_connections_all"] = sum(
                n for name, n in seen.max.items() if name.startswith("bench_")
            )
        self.runs.append(run)
        lat = figures["latency_us"]
        say(
            f"  {workload} {series.name:9} k={k if k is not None else '-'} "
            f"c={clients}: {run['rps']:8.1f} req/s  mean {lat['mean'] / 1000:7.2f} ms"
            f"  p99 {lat['p99'] / 1000:7.2f} ms"
            + (f"  conns {run['max_connections']}" if seen is not None else "")
            + (f"  errors {run['errors']}" if run["errors"] else "")
        )

    def sanity(self, server: Server, series: Series) -> bool:
        """One request per view, each must answer 200."""
        for path, k in (("w1", 2), ("w2", 1), ("w3", None)):
            query = f"?check=1&k={k}" if k else "?check=1"
            status, body = http_get(f"{server.base}{series.prefix}/{path}/{query}", 30)
            if status != 200:
                self.notes.append(
                    f"{series.name}: /{path}/ answered {status}; series skipped: "
                    f"{body[:300]}"
                )
                return False
        return True

    def lane_check(self, server: Server, members: list[Series]) -> None:
        """With a warm pool: how many lanes one request at k = p used."""
        for series in members:
            if not series.parallelism:
                continue
            k = series.parallelism
            _status, body = http_get(
                f"{server.base}{series.prefix}/w1/?check=1&k={k}", 30
            )
            data = json.loads(body)
            self.checks.append(
                {
                    "series": series.name,
                    "k": k,
                    "parallelism": data.get("parallelism"),
                    "lanes_used": data.get("lanes_used"),
                }
            )

    def warm(self, server: Server, series: list[Series], clients: int) -> None:
        # Grows the pool (to max_size with 64 clients), starts the lane threads
        # and caches the table: every variant is measured warm.
        for s in series:
            k = s.parallelism or 8
            wrk(f"{server.base}{s.prefix}/w1/?k={k}", clients, self.plan.warm_seconds)
            wrk(f"{server.base}{s.prefix}/w2/?k=2", 1, self.plan.warm_seconds)

    def together(
        self,
        series: list[Series],
        blocks: list[tuple[int, list[tuple[str, str, int | None, int, int]]]],
        *,
        title: str,
        env: dict[str, str] | None = None,
        first: bool = False,
    ) -> None:
        """All servers up at once; every point runs each variant in turn.

        ``blocks`` is a list of (rounds, points), a point being (workload,
        view, k, clients, seconds). Consecutive runs of one point are seconds
        apart, so a change in the machine's load lands on every variant alike.
        Single-client and 8-client work only: the pools stay well under
        max_size, so the servers together hold a few dozen connections.
        """
        names = sorted({s.server for s in series}, key=list(SERVERS).index)
        servers: dict[str, Server] = {}
        for name in names:
            server = Server(name, env)
            try:
                server.start()
            except RuntimeError as exc:
                self.notes.append(f"{title}: server {name} did not start: {exc}")
                continue
            servers[name] = server
        try:
            say(f"{title}: servers {', '.join(servers)} up at once")
            members = [s for s in series if s.server in servers]
            if first:
                members = [s for s in members if self.sanity(servers[s.server], s)]
            for name, server in servers.items():
                self.warm(server, [s for s in members if s.server == name], 1)
            if first:
                for name, server in servers.items():
                    self.lane_check(server, [s for s in members if s.server == name])
            turn = 0
            for rounds, points in blocks:
                for round_no in range(rounds):
                    for workload, view, k, clients, seconds in points:
                        if self.out_of_time():
                            self.notes.append(f"deadline reached in {title}")
                            return
                        turn += 1
                        for s in rotate(members, turn):
                            if workload == "W3" and s.name not in W3_SERIES:
                                continue
                            if workload != "W1" and s.name in W1_ONLY_SERIES:
                                continue
                            self.measure(
                                servers[s.server], s, workload, view, k=k,
                                clients=clients, seconds=seconds,
                                round_no=round_no, sample=False,
                            )  # fmt: skip
            for name, server in servers.items():
                self.server_stats.append(
                    {"phase": title, "server": name, **server.stats()}
                )
        finally:
            for server in servers.values():
                server.stop()

    def latency_and_overhead(self, series: list[Series]) -> None:
        """W1, W2 and W3, interleaved variant by variant."""
        plan = self.plan
        blocks: list[tuple[int, list[tuple[str, str, int | None, int, int]]]] = []
        if "W1" in self.workloads or "W2" in self.workloads:
            points: list[tuple[str, str, int | None, int, int]] = []
            if "W1" in self.workloads:
                points += [("W1", "w1", k, 1, plan.w1_seconds) for k in plan.w1_ks]
            if "W2" in self.workloads:
                points += [("W2", "w2", k, 1, plan.w2_seconds) for k in plan.w2_ks]
            blocks.append((plan.rounds, points))
        if "W3" in self.workloads:
            w3 = [("W3", "w3", None, plan.w3_clients, plan.w3_seconds)]
            blocks.append((plan.w3_rounds, w3))
        if blocks:
            self.together(series, blocks, title="W1-W3", first=True)

    def saturation(self, series: list[Series]) -> None:
        """W4, one server at a time (each fills its pool): every variant on a
        fresh server of its own, warmed with its own view only, so no variant
        runs on a server that earlier variants' loads have aged; rounds
        rotate the order."""
        members = [s for s in series if s.name not in W1_ONLY_SERIES]
        plan = self.plan
        for round_no in range(plan.w4_rounds):
            for s in rotate(members, round_no):
                if self.out_of_time():
                    self.notes.append(f"deadline reached in W4 round {round_no + 1}")
                    return
                say(f"W4 round {round_no + 1}/{plan.w4_rounds}: {s.name}")
                server = Server(s.server)
                try:
                    server.start()
                except RuntimeError as exc:
                    self.notes.append(f"W4: server {s.server} did not start: {exc}")
                    continue
                try:
                    self.warm(server, [s], plan.w4_clients)
                    self.measure(
                        server, s, "W4", "w1", k=plan.w4_k,
                        clients=plan.w4_clients, seconds=plan.w4_seconds,
                        round_no=round_no, sample=True,
                    )  # fmt: skip
                    self.server_stats.append(
                        {
                            "phase": "W4",
                            "round": round_no,
                            "server": s.server,
                            "series": s.name,
                            **server.stats(),
                        }
                    )
                finally:
                    server.stop()

    def w5(self, series: list[Series], one_way_ms: float) -> dict[str, Any]:
        """W1 again, with the database behind bench.delayproxy."""
        port = free_port()
        log = (WORK / "logs" / "delayproxy.log").open("ab")
        proxy = subprocess.Popen(
            [
                sys.executable, "-m", "bench.delayproxy", "--port", str(port),
                "--target", _target(), "--delay-ms", str(one_way_ms),
                "--max-seconds", "1200",
            ],
            cwd=REPO, env=_env({}), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        dsn = psycopg.conninfo.make_conninfo(
            config.SERVER_DSN, host="127.0.0.1", port=str(port)
        )
        try:
            rtt = _measure_rtt(dsn)
            say(
                f"W5: database behind a delay proxy, round trip "
                f"{rtt['direct_ms']:.3f} ms direct, {rtt['proxied_ms']:.3f} ms proxied"
            )
            plan = self.plan
            points: list[tuple[str, str, int | None, int, int]] = [
                ("W5", "w1", k, 1, plan.w5_seconds) for k in plan.w5_ks
            ]
            self.together(
                [s for s in series if s.name not in W1_ONLY_SERIES],
                [(plan.w5_rounds, points)],
                title="W5",
                env={"BENCH_DSN": dsn},
            )
            return rtt
        finally:
            proxy.terminate()
            try:
                proxy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proxy.kill()
            log.close()


# -- summary --------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds of each (workload, series, k) point."""
    groups: dict[tuple[str, str, int | None], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["workload"], run["series"], run["k"])].append(run)
    rows = []
    for (workload, series, k), group in groups.items():

        def med(getter: Any, group: list[dict[str, Any]] = group) -> float:
            return float(statistics.median(getter(r) for r in group))

        rps = [r["rps"] for r in group]
        mean_ms = [r["latency_us"]["mean"] / 1000 for r in group]
        row = {
            "workload": workload,
            "series": series,
            "k": k,
            "clients": group[0]["clients"],
            "runs": len(group),
            "requests": sum(r["requests"] for r in group),
            "rps": round(med(lambda r: r["rps"]), 2),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "mean_ms": round(med(lambda r: r["latency_us"]["mean"]) / 1000, 3),
            "mean_ms_min": round(min(mean_ms), 3),
            "mean_ms_max": round(max(mean_ms), 3),
            "p50_ms": round(med(lambda r: r["latency_us"]["p50"]) / 1000, 3),
            "p99_ms": round(med(lambda r: r["latency_us"]["p99"]) / 1000, 3),
            "max_ms": round(max(r["latency_us"]["max"] for r in group) / 1000, 3),
            "errors": sum(sum(r["errors"].values()) for r in group),
            "server_cpu_us_per_request": round(
                med(lambda r: r["server_cpu_us_per_request"] or 0.0), 1
            ),
            "wrk_cpu_share": round(
                sum(r["wrk_cpu_s"] for r in group) / sum(r["seconds"] for r in group), 3
            ),
        }
        if "max_connections" in group[0]:
            row["max_connections"] = max(r["max_connections"] for r in group)
        if "sets_per_request" in group[0]:
            row["sets_per_request"] = {
                key: round(
                    statistics.median(r["sets_per_request"][key] for r in group), 3
                )
                for key in group[0]["sets_per_request"]
            }
        rows.append(row)
    return rows


# -- machine ----------------------------------------------------------------------


def _run_text(command: list[str]) -> str:
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except OSError:
        return ""


def machine(pg: dict[str, Any]) -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        match = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1) if match else ""
    mem_kb = 0
    with contextlib.suppress(OSError):
        match = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        mem_kb = int(match.group(1)) if match else 0
    versions = {}
    for dist in (
        "django",
        "psycopg",
        "psycopg-binary",
        "psycopg-pool",
        "asgiref",
        "uvicorn",
        "uvloop",
        "httptools",
        "starlette",
        "django-async-backend",
        "matplotlib",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    commit = _run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(REPO), "status", "--porcelain", "asgi_dbset"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1048576, 1),
        "kernel": platform.release(),
        "os": _run_text(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "packages": versions,
        "postgresql": pg,
        "wrk": _run_text(["sh", "-c", "wrk --version 2>&1 | head -1"]).split(
            " Copyright"
        )[0],
        "commit": commit + ("+local changes in asgi_dbset/" if dirty else ""),
    }


def dab_versions() -> dict[str, Any] | None:
    """Python and package versions of venv-dab, or None when it is unusable."""
    python = VENVS["dab"]
    if not python.exists():
        return None
    code = (
        "import json, platform, importlib.metadata as m, django_async_backend; "
        "print(json.dumps({'python': platform.python_version(), 'packages': "
        "{d: m.version(d) for d in ('django', 'django-async-backend', 'psycopg', "
        "'psycopg-pool', 'asgiref', 'uvicorn', 'uvloop', 'httptools')}}))"
    )
    out = subprocess.run(
        [str(python), "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return json.loads(out.stdout) if out.returncode == 0 else None


def spin_check() -> dict[str, Any]:
    """``python -m bench.diagnose spin`` on each venv's Python: does
    ConnectionSet.aclose() hang there? (It does on 3.12+; see diagnose.py.)"""
    out: dict[str, Any] = {}
    for name, python in VENVS.items():
        if not python.exists():
            continue
        try:
            result = subprocess.run(
                [str(python), "-m", "bench.diagnose", "spin"],
                cwd=REPO,
                env=_env({}),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            # (A check that fails for another reason is no hang: its error
            # is kept, and the report does not claim one.)
            out[name] = {
                "hangs": "still running" in result.stdout,
                "output": result.stdout.strip(),
            }
            if result.returncode != 0 and not out[name]["hangs"]:
                out[name]["error"] = result.stderr.strip()[-500:]
        except subprocess.TimeoutExpired:
            out[name] = {"hangs": True, "output": "timed out"}
    return out


def instruction_counts(requests: int) -> dict[str, Any]:
    """W3's and W4's requests, counted in instructions by valgrind (see
    ``python -m bench.diagnose instructions``): exact where req/s and CPU time
    on a shared VM swing by 10-15%."""
    if shutil.which("valgrind") is None:
        return {"missing": "valgrind is not installed (apt-get install valgrind)"}
    from bench import diagnose

    names = ["stock", "dbset-p1", "dbset-p4", "w4-stock", "w4-p1", "w4-p4"]
    return {
        "requests": requests,
        "variants": diagnose.count_instructions(requests, names, jobs=2),
    }


def load_snapshot() -> dict[str, Any]:
    top = _run_text(["top", "-bn1", "-w", "160"]).splitlines()
    return {"loadavg": list(os.getloadavg()), "at": time.time(), "top": top[:14]}


def wait_for_quiet(threshold: float, max_wait: float) -> dict[str, Any]:
    """Wait (bounded) for the 1-minute load average to drop below threshold."""
    started = time.monotonic()
    while os.getloadavg()[0] >= threshold and time.monotonic() - started < max_wait:
        say(
            f"load {os.getloadavg()[0]:.2f} >= {threshold}; waiting for a quieter machine"
        )
        time.sleep(min(15.0, max_wait))
    waited = time.monotonic() - started
    return {
        "threshold": threshold,
        "waited_s": round(waited, 1),
        "quiet": os.getloadavg()[0] < threshold,
    }


# -- main -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one short round (~2 min); writes under bench/.work/",
    )
    parser.add_argument(
        "--rounds", type=int, help="override the number of rounds (W4's too)"
    )
    parser.add_argument(
        "--workloads", default="W1,W2,W3,W4,W5", help="comma-separated subset"
    )
    parser.add_argument(
        "--series",
        default="",
        help="comma-separated subset of " + ",".join(s.name for s in ALL_SERIES),
    )
    parser.add_argument(
        "--deadline", type=float, default=1500.0, help="seconds; later runs are skipped"
    )
    parser.add_argument(
        "--quiet-load",
        type=float,
        default=1.5,
        help="wait for the 1-min load average to drop below this",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="...but at most this many seconds",
    )
    parser.add_argument("--out", type=Path, help="results JSON path")
    parser.add_argument(
        "--w5-delay-ms",
        type=float,
        default=1.0,
        help="W5: delay added each way between the servers and PostgreSQL",
    )
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument(
        "--no-instructions",
        action="store_true",
        help="skip the valgrind instruction counts of W3 and W4 (~6 min)",
    )
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    if args.rounds:
        plan = Plan(
            **{**plan.__dict__, "rounds": args.rounds, "w4_rounds": args.rounds}
        )
    workloads = {w.strip().upper() for w in args.workloads.split(",") if w.strip()}
    series = list(ALL_SERIES)
    if args.series:
        wanted = {s.strip() for s in args.series.split(",")}
        series = [s for s in series if s.name in wanted]
    notes: list[str] = []
    dab = dab_versions()
    if dab is None:
        series = [s for s in series if SERVERS[s.server]["venv"] != "dab"]
        why = WORK / "async-backend-skipped.txt"
        reason = why.read_text().strip() if why.exists() else "venv-dab missing"
        notes.append(f"django-async-backend skipped: {reason}")

    started = time.monotonic()
    date = dt.date.today().isoformat()
    if args.out:
        # (Absolute: the harness names it relative to the repository.)
        out = args.out.resolve()
    elif args.quick:
        out = WORK / "results" / f"{date}-quick.json"
    else:
        out = BENCH / "results" / f"{date}.json"
        if out.exists():
            # A second full run on one day keeps the first: its file sorts
            # after the day's first and before the next day's (the report
            # compares each run with the newest file sorted before it).
            out = out.with_name(f"{date}T{time.strftime('%H%M')}.json")

    say("preparing the database")
    pg = prepare_database()
    sql = check_sql(sys.executable)
    say(f"SQL check: {sql['summary']}")
    spin = spin_check()
    for name, result in spin.items():
        say(f"release-spin check ({name} venv): {result['output']}")
    quiet = wait_for_quiet(args.quiet_load, args.quiet_wait if not args.quick else 0)
    load_before = load_snapshot()
    say(f"load average {load_before['loadavg']}")

    harness = Harness(
        plan, time.monotonic() + args.deadline, frozenset(workloads), notes=notes
    )
    harness.latency_and_overhead(series)
    if "W4" in workloads:
        harness.saturation(series)
    w5_rtt = harness.w5(series, args.w5_delay_ms) if "W5" in workloads else None
    load_after = load_snapshot()
    w1_floor = w1_breakdown = features = w1_pgbouncer = w6 = None
    if "W1" in workloads:
        say("measuring W1's floor (CPU per lookup before its query leaves)")
        from bench import diagnose

        w1_floor = diagnose.floor(100 if args.quick else 400)
        say("where each W1 call's time goes at p = k = 8, by switch interval")
        w1_breakdown = diagnose.breakdown(
            8, 20 if args.quick else 60, list(diagnose.SWITCHES), 1 if args.quick else 3
        )
        say("measuring what snapshot=True and asgi_dbset.atomic() cost W1")
        features = diagnose.features(1 if args.quick else 3, 1 if args.quick else 3)
        say("measuring W1 through PgBouncer (transaction pooling) beside direct")
        w1_pgbouncer = diagnose.pgbouncer(
            1 if args.quick else 3, 1 if args.quick else 3
        )
        say("W6: the client sweep on a pool of 20, and W1 as sync functions")
        # (An even number of rounds: the servers' order reverses each round.)
        w6 = diagnose.sweep(2 if args.quick else 5, 2 if args.quick else 4)
    # After the HTTP runs, which it would slow down; counts do not depend on time.
    instructions = None
    if workloads & {"W3", "W4"} and not (args.no_instructions or args.quick):
        say("counting instructions per request (valgrind)")
        instructions = instruction_counts(300)

    runs = [r for r in harness.runs if r["workload"] in workloads]
    results = {
        "date": date,
        "mode": "quick" if args.quick else "full",
        "plan": plan.__dict__,
        "config": {
            "rows": config.ROWS,
            "sleep_s": config.SLEEP,
            "pool": config.POOL,
            "db": config.DB_NAME,
            "asgi_dbset": {
                "DEFAULT_PARALLELISM": 1,
                "MAX_PARALLELISM": 8,
                "BUDGET": None,
                "LEASE_TIMEOUT": 0.1,
            },
            "server": "uvicorn, 1 process, --no-access-log",
            "load_generator": "wrk -t1 (one thread), closed loop, keep-alive",
        },
        "machine": {**machine(pg), "dab_venv": dab},
        "sql_check": sql,
        "release_spin_check": spin,
        "w5": {"one_way_delay_ms": args.w5_delay_ms, "round_trip": w5_rtt},
        "instructions": instructions,
        "w1_floor": w1_floor,
        "w1_breakdown": w1_breakdown,
        "features": features,
        "pgbouncer": w1_pgbouncer,
        "w6": w6,
        "quiet": quiet,
        "load_before": load_before,
        "load_after": load_after,
        "lane_checks": harness.checks,
        "notes": harness.notes
        + (
            [f"{harness.skipped_runs} runs skipped at the deadline"]
            if harness.skipped_runs
            else []
        ),
        "elapsed_s": round(time.monotonic() - started, 1),
        "summary": summarise(runs),
        "server_stats": harness.server_stats,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    say(f"wrote {os.path.relpath(out, REPO)} ({results['elapsed_s']} s)")
    if not args.no_report:
        from bench import report

        if args.quick:
            md, img = WORK / "benchmarks-quick.md", WORK / "img"
        else:
            md, img = REPO / "docs" / "benchmarks.md", REPO / "docs" / "img"
        report.write(results, md, img, results_path=out)
        say(f"wrote {md.relative_to(REPO)} and plots in {img.relative_to(REPO)}/")
