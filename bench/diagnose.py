"""Small reproductions behind the findings in docs/benchmarks.md.

    python -m bench.diagnose overhead [--requests 2000] [--clients 1] [--profile]
        Per-request CPU of the W3 view, in-process (no HTTP, no wrk): the ASGI
        app is called directly, one request after another (or --clients at
        once, as wrk's connections), in a fresh process per variant, variants
        alternated. Shows what the middleware costs when a request makes one
        query, without the machine's noise in req/s; also the process's thread
        switches per request.

    python -m bench.diagnose instructions [--requests 300] [--variants a,b]
        Instructions per request, counted by valgrind (callgrind) in the
        serving process: exact where CPU time on a shared VM swings by 10-15%
        between runs. Each variant runs twice, with 100 and 100 + --requests
        requests; the difference is divided out, so start-up and warm-up
        cancel. Variants (INSTRUCTION_VARIANTS): the W3 view (one pk lookup)
        on stock Django and at p=1 and p=4, the middleware's halves, and W4's
        four-lookup request as a saturated server serves it. Needs valgrind
        (Debian: apt-get install valgrind).

    python -m bench.diagnose hop [--calls 200]
        Instructions per no-op call on a request's thread (valgrind, as
        above: 100 and 100 + --calls calls, the difference divided out):
        through asgi_dbset's hop (run_as_stock) and through asgiref's
        SyncToAsync, the per-call figures docs/how-it-works.md quotes.

    python -m bench.diagnose saturation [--seconds 5] [--rounds 2]
        W4 (64 clients, pool of 16) on stock Django and at each parallelism,
        with what the sets did per request (lanes leased, refused, used; time
        queued for a lane) and the pool's mean wait for a connection.

    python -m bench.diagnose lanes [--seconds 3]
        W1 at k = p with one client: per request, how long the set was open,
        how long its calls ran in all, how long they queued for a lane while
        the set leased its extra lanes.

    python -m bench.diagnose features [--seconds 3] [--rounds 3]
        What a request pays for snapshot=True and asgi_dbset.atomic(): W1 with
        and without each, one client, variants interleaved. ``make bench``
        records it and the report shows it beside plain W1.

    python -m bench.diagnose pgbouncer [--seconds 3] [--rounds 3]
        W1 through a PgBouncer in transaction pooling mode (Debian's package,
        started for the run by tests/pgbouncer.py in front of BENCH_DSN's
        server, pool_size 20) beside W1 on direct connections: stock Django
        and asgi_dbset at p = k, one client, interleaved. ``make bench``
        records it and the report shows it beside plain W1.

    python -m bench.diagnose sweep [--seconds 4] [--rounds 2]
        W6: the client sweep 1, 4, 8, 16, 20, 32, 64, 200 on a pool of 20
        (default budget), stock Django against a view gathering 8 x 20 ms
        lookups under @db_parallelism(8): req/s, p50, p99 and the most server
        connections each server held; the client counts interleaved, the
        stock measured between the other two, their order reversing each
        round. A second stock server runs beside them: its ratio to stock,
        measured the same way, is how far two identical servers stray apart
        in this run. Each ratio is the median over rounds of the two servers'
        ratio at that count in that round (measured one right after the
        other; none from a round in which either had errors). Then W1 written as
        sync functions (k of one lookup each): stock's sync_to_async against
        sync_to_lane at p = k, one client. ``make bench`` records it.

    python -m bench.diagnose floor [--calls 400]
        W1's floor: the CPU one W1 lookup spends before its query leaves
        (queryset, SQL, cursor) and after its rows return (model objects), on
        stock Django, one thread, no HTTP. In one process these parts of k
        gathered calls take turns on the GIL, so the k-th query cannot leave
        before the k calls' "before" parts have run: no variant that runs the
        Django ORM in one process answers W1 much faster than the lowest k = 1
        latency (stock's or asgi_dbset's) plus (k - 1) x "before". Prints JSON;
        ``make bench`` records it and the report sets W1 against it.

    python -m bench.diagnose breakdown [--k 8] [--requests 60] [--rounds 3]
                                       [--switch 0.005,0.001]
        Where each W1 call's time goes at p = k, in-process (no HTTP), on the
        dbset variant: per call, the hop out (from the call being made on the
        loop to its function starting on its lane's thread, the lease of a
        new lane included, shown apart), the ORM's work before the query
        leaves (wall time, and the thread's CPU time: the rest is waiting for
        the GIL), the server, the ORM's work after the rows return, and the
        hop back (from the function's return to the caller resuming on the
        loop). Medians per position in the gather, and the request's latency
        against W1's floor. Runs once per ``sys.setswitchinterval`` given
        (--switch, seconds; Python's default is 0.005), interleaved.

    python -m bench.diagnose spin
        ConnectionSet.aclose() on Python 3.12+: a background task that ends in
        the same loop iteration in which _release_all() starts keeps the loop
        busy forever (asyncio.gather completes eagerly on 3.12, so the `while
        self._background` loop never yields and the done-callback that would
        empty the set never runs). Exits 1 when the loop hangs, 0 when not.

Both need the bench database (``make bench`` creates it) only for ``overhead``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# -- overhead ---------------------------------------------------------------------


def _scope(path: str, query: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 12345),
        "server": ("127.0.0.1", 80),
        "state": {},
    }


async def _one(app: Any, path: str, query: str) -> int:
    status = 0
    done = asyncio.Event()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(_scope(path, query), receive, send)
    return status


def _wrapped(how: str) -> Any:
    """The app as the variant builds it (how ""); else Django's app bare
    ("bare": the ORM routed, no middleware), in a ThreadSensitiveContext
    ("tsc") or in a connection set ("set"), to see which part costs what."""
    if not how:
        from bench.djsite.asgi import application

        return application
    from asgiref.sync import ThreadSensitiveContext
    from django.core.asgi import get_asgi_application

    application = get_asgi_application()
    if how == "bare":
        return application

    from asgi_dbset import connection_set

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if how == "tsc":
            async with ThreadSensitiveContext():
                await application(scope, receive, send)
        else:
            async with connection_set():
                await application(scope, receive, send)

    return app


def _child(path: str, query: str, requests: int, profile: bool, clients: int) -> None:
    """Runs in the variant's own process; prints one JSON line. ``clients``
    request loops run at once, as wrk's connections do."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.djsite.settings")
    application = _wrapped(os.environ.get("BENCH_WRAP", ""))

    async def run() -> dict[str, Any]:
        for _ in range(200):  # warm: pool, threads, caches
            assert await _one(application, path, query) == 200

        async def client(n: int) -> None:
            for _ in range(n):
                await _one(application, path, query)

        share = [requests // clients + (i < requests % clients) for i in range(clients)]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client(n) for n in share))
        after = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "cpu_us": (time.process_time() - cpu) / requests * 1e6,
            "wall_us": (time.perf_counter() - wall) / requests * 1e6,
            # Thread switches (the process's, all threads): a hop to another
            # thread costs one or two, whatever the machine's noise.
            "switches": (
                after.ru_nvcsw + after.ru_nivcsw - usage.ru_nvcsw - usage.ru_nivcsw
            )
            / requests,
        }

    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        result = asyncio.run(run())
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(25)
    else:
        result = asyncio.run(run())
    print(json.dumps(result), flush=True)


#: name: (BENCH_VARIANT, path, BENCH_WRAP)
VARIANTS = {
    "stock": ("stock", "/p1/w3/", ""),
    "dbset-p1": ("dbset", "/p1/w3/", ""),
    "dbset-p4": ("dbset", "/p4/w3/", ""),
}
#: With --split: asgi_dbset installed but the Django app bare ("routing"), or
#: wrapped in only a ThreadSensitiveContext ("tsc-only", what the middleware
#: adds for non-Django apps) or only a connection set ("set-only").
SPLIT = {
    "routing": ("dbset", "/p1/w3/", "bare"),
    "tsc-only": ("dbset", "/p1/w3/", "tsc"),
    "set-only": ("dbset", "/p1/w3/", "set"),
}


def _run_child(
    args: list[str],
    variant: str,
    wrap: str,
    timeout: float,
    extra: dict[str, str] | None = None,
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """``python -m bench.diagnose *args`` in a fresh process serving *variant*
    (BENCH_VARIANT) wrapped as *wrap* (BENCH_WRAP), run under *prefix*."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "bench.diagnose", *args],
        cwd=REPO,
        env={
            **os.environ,
            **(extra or {}),
            "BENCH_VARIANT": variant,
            "BENCH_WRAP": wrap,
            "PYTHONPATH": str(REPO),
        },
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def overhead(
    requests: int, rounds: int, profile: str | None, split: bool, clients: int = 1
) -> None:
    variants = {**VARIANTS, **(SPLIT if split else {})}
    results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    order = list(variants)
    for round_no in range(rounds):
        for name in order[round_no % len(order) :] + order[: round_no % len(order)]:
            variant, path, wrap = variants[name]
            args = ["_child", path, str(requests), "--clients", str(clients)]
            if profile == name:
                args.append("--profile")
            out = _run_child(args, variant, wrap, timeout=600)
            if profile == name and round_no == 0:
                print(out.stderr)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["cpu_us"] for r in results["stock"])
    print(
        f"in-process W3 (one pk lookup), {requests} requests x {rounds} rounds, "
        f"{clients} at a time, median:"
    )
    for name, runs in results.items():
        cpu = statistics.median(r["cpu_us"] for r in runs)
        wall = statistics.median(r["wall_us"] for r in runs)
        switches = statistics.median(r["switches"] for r in runs)
        print(
            f"  {name:9} CPU {cpu:7.0f} us/request ({cpu / base:.3f} x stock)  "
            f"wall {wall:7.0f} us/request  {switches:5.1f} thread switches/request"
            "   runs: " + ", ".join(f"{r['cpu_us']:.0f}" for r in runs)
        )


# -- instructions -----------------------------------------------------------------


def _serve_requests(path: str, query: str, requests: int) -> None:
    """Runs under valgrind: *requests* requests, one after another."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.djsite.settings")
    application = _wrapped(os.environ.get("BENCH_WRAP", ""))

    async def run() -> None:
        for _ in range(requests):
            assert await _one(application, path, query) == 200

    asyncio.run(run())


#: name: (BENCH_VARIANT, path, query string, BENCH_WRAP, extra environment)
INSTRUCTION_VARIANTS: dict[str, tuple[str, str, str, str, dict[str, str]]] = {
    # W3 (one pk lookup): overhead's variants and the middleware's halves.
    **{
        name: (variant, path, "", wrap, {})
        for name, (variant, path, wrap) in {**VARIANTS, **SPLIT}.items()
    },
    # W3 with asgi_dbset.opentelemetry's metrics on (the SDK, nothing exporting).
    "dbset-p1-otel": ("dbset", "/p1/w3/", "", "", {"BENCH_OTEL": "1"}),
    "dbset-p4-otel": ("dbset", "/p4/w3/", "", "", {"BENCH_OTEL": "1"}),
    # W4's request as a saturated server serves it: four lookups, no extra
    # lane to be had (a pool of one connection leaves the sets no budget), so
    # at p=4 they queue on lane 0 as they do when the pool is busy.
    "w4-stock": ("stock", "/p1/w1/", "k=4", "", {"BENCH_POOL_MAX_SIZE": "1"}),
    "w4-p1": ("dbset", "/p1/w1/", "k=4", "", {"BENCH_POOL_MAX_SIZE": "1"}),
    "w4-p4": ("dbset", "/p4/w1/", "k=4", "", {"BENCH_POOL_MAX_SIZE": "1"}),
}
#: The variants each group is compared with.
_BASELINES = {"w4-": "w4-stock", "": "stock"}


def _instructions(name: str, requests: int) -> int:
    variant, path, query, wrap, extra = INSTRUCTION_VARIANTS[name]
    return _counted(
        ["_serve", path, str(requests), "--query", query], variant, wrap, extra
    )


def _counted(args: list[str], variant: str, wrap: str, extra: dict[str, str]) -> int:
    """The instructions of ``python -m bench.diagnose *args`` in a child run
    under callgrind."""
    out = _run_child(
        args,
        variant,
        wrap,
        timeout=1800,
        # The same string hashes, so the same dict layouts, in every run.
        extra={**extra, "PYTHONHASHSEED": "0"},
        prefix=("valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"),
    )
    for line in out.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1].strip())
    raise RuntimeError(f"valgrind printed no instruction count:\n{out.stderr}")


def count_instructions(requests: int, names: list[str], jobs: int) -> dict[str, Any]:
    """Instructions per request of each variant, and its ratio to its group's
    stock variant when that was counted too."""
    from concurrent.futures import ThreadPoolExecutor

    base = 100
    # Counts do not depend on timing, so variants may run side by side.
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        runs = {
            (name, n): pool.submit(_instructions, name, n)
            for name in names
            for n in (base, base + requests)
        }
        counts = {key: future.result() for key, future in runs.items()}
    per_request = {
        name: (counts[name, base + requests] - counts[name, base]) / requests
        for name in names
    }
    out: dict[str, Any] = {}
    for name, value in per_request.items():
        baseline = next(
            b for prefix, b in _BASELINES.items() if name.startswith(prefix)
        )
        out[name] = {
            "per_request": round(value),
            "baseline": baseline,
            "ratio": (
                round(value / per_request[baseline], 4)
                if baseline in per_request
                else None
            ),
        }
    return out


def instructions(requests: int, names: list[str], jobs: int) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is missing: apt-get install valgrind")
    counted = count_instructions(requests, names, jobs)
    print(f"instructions per request ({requests} requests; (N+100) - 100):")
    for name, row in counted.items():
        ratio = f"({row['ratio']:.3f} x {row['baseline']})" if row["ratio"] else ""
        print(f"  {name:9} {row['per_request'] / 1e6:7.3f} M  {ratio}")


def _noop_calls(how: str, calls: int) -> None:
    """Runs under valgrind: *calls* no-op calls on a request's thread."""
    from asgiref.sync import SyncToAsync, ThreadSensitiveContext

    from asgi_dbset.hop import run_as_stock

    def noop() -> None:
        return None

    async def run() -> None:
        async with ThreadSensitiveContext():
            await SyncToAsync(noop)()  # the request's thread exists
            for _ in range(calls):
                if how == "hop":
                    await run_as_stock(noop)
                else:
                    await SyncToAsync(noop)()

    asyncio.run(run())


def hop_instructions(calls: int) -> dict[str, int]:
    """Instructions per no-op call through the hop and through SyncToAsync."""

    def count(how: str, n: int) -> int:
        return _counted(["_noop", how, str(n)], "dbset", "", {})

    base = 100
    return {
        how: round((count(how, base + calls) - count(how, base)) / calls)
        for how in ("hop", "SyncToAsync")
    }


# -- saturation -------------------------------------------------------------------


def saturation(seconds: int, clients: int, rounds: int) -> None:
    """W4 at each parallelism, with the sets' figures and the pool's counters."""
    from bench.run import Server, http_get, wrk

    def stats(server: Server) -> dict[str, Any]:
        return json.loads(http_get(server.base + "/stats/")[1])

    def delta(after: dict[str, Any], before: dict[str, Any], key: str) -> float:
        return float(after.get(key, 0)) - float(before.get(key, 0))

    rows: dict[str, list[dict[str, Any]]] = {}
    for round_no in range(rounds):
        for name, env in (("stock", {}), ("dbset", {"BENCH_TRACE": "1"})):
            server = Server(name, env)
            server.start()
            try:
                prefixes = ["/p1"] if name == "stock" else ["/p1", "/p2", "/p4", "/p8"]
                for prefix in prefixes:
                    wrk(f"{server.base}{prefix}/w1/?k=4", clients, 1)
                for i in range(len(prefixes)):
                    prefix = prefixes[(i + round_no) % len(prefixes)]
                    label = "stock" if name == "stock" else f"dbset-{prefix[1:]}"
                    time.sleep(0.5)
                    before = stats(server)
                    figures = wrk(f"{server.base}{prefix}/w1/?k=4", clients, seconds)
                    time.sleep(0.5)
                    after = stats(server)
                    n = figures["requests"] or 1
                    row = {
                        "rps": figures["requests"] / (figures["duration_us"] / 1e6),
                        "p50": figures["latency_us"]["p50"] / 1000,
                        "p99": figures["latency_us"]["p99"] / 1000,
                        "pool_wait_ms": delta(
                            after["pool"], before["pool"], "requests_wait_ms"
                        )
                        / max(delta(after["pool"], before["pool"], "requests_num"), 1),
                        "pool_timeouts": delta(
                            after["pool"], before["pool"], "requests_errors"
                        ),
                    }
                    if "asgi_dbset" in after:
                        a, b = after["asgi_dbset"], before["asgi_dbset"]
                        ta, tb = after["trace"]["totals"], before["trace"]["totals"]
                        sets = max(delta(ta, tb, "requests"), 1)
                        row.update(
                            leased=delta(a, b, "lanes_leased") / n,
                            refused=delta(a, b, "lease_failures") / n,
                            lanes_used=sum(
                                int(k) * (v - before["trace"]["lanes_used"].get(k, 0))
                                for k, v in after["trace"]["lanes_used"].items()
                            )
                            / sets,
                            wait_ms=delta(ta, tb, "wait_ms") / sets,
                            wall_ms=delta(ta, tb, "wall_ms") / sets,
                            query_ms=delta(ta, tb, "query_ms") / sets,
                        )
                    rows.setdefault(label, []).append(row)
            finally:
                server.stop()
    print(
        f"W4 ({clients} clients, pool of 16, four 20 ms queries), {rounds} rounds, medians:"
    )
    print(
        "  variant     req/s   p50 ms  p99 ms | pool wait ms  pool timeouts | per request:"
        " lanes leased  refused  lanes used  queued ms  set wall ms  query ms"
    )
    for label, runs in rows.items():

        def m(key: str, runs: list[dict[str, Any]] = runs) -> float:
            values = [r[key] for r in runs if key in r]
            return statistics.median(values) if values else float("nan")

        line = (
            f"  {label:9} {m('rps'):7.1f} {m('p50'):8.0f} {m('p99'):7.0f} |"
            f" {m('pool_wait_ms'):12.1f} {m('pool_timeouts'):14.0f} |"
        )
        if "leased" in runs[0]:
            line += (
                f" {m('leased'):25.2f} {m('refused'):8.2f} {m('lanes_used'):11.2f}"
                f" {m('wait_ms'):10.1f} {m('wall_ms'):12.1f} {m('query_ms'):9.1f}"
            )
        print(line)


# -- lanes --------------------------------------------------------------------------


def lanes(seconds: int) -> None:
    """W1 at k = p, one client: where a request's time goes inside its set."""
    from bench.run import Server, http_get, wrk

    server = Server("dbset", {"BENCH_TRACE": "1"})
    server.start()
    try:
        wrk(f"{server.base}/p8/w1/?k=8", 64, 1)  # grow the pool, start lane threads
        print(f"W1 on the dbset server, one client, {seconds} s per line; per request:")
        for p, k in ((1, 1), (8, 1), (2, 2), (4, 4), (8, 8)):
            time.sleep(0.3)
            before = json.loads(http_get(server.base + "/stats/")[1])
            figures = wrk(f"{server.base}/p{p}/w1/?k={k}", 1, seconds)
            time.sleep(0.3)
            after = json.loads(http_get(server.base + "/stats/")[1])
            ta, tb = after["trace"]["totals"], before["trace"]["totals"]
            n = max(ta["requests"] - tb["requests"], 1)
            leased, refused = (
                after["asgi_dbset"][key] - before["asgi_dbset"][key]
                for key in ("lanes_leased", "lease_failures")
            )
            print(
                f"  p={p} k={k}: client latency {figures['latency_us']['mean'] / 1000:6.2f} ms"
                f" | set open {(ta['wall_ms'] - tb['wall_ms']) / n:6.2f} ms"
                f" | calls ran {(ta['query_ms'] - tb['query_ms']) / n:7.2f} ms in all"
                f" | calls queued for a lane {(ta['wait_ms'] - tb['wait_ms']) / n:6.2f} ms"
                f" | lanes leased {leased / n:4.2f}, refused {refused / n:4.2f}"
            )
    finally:
        server.stop()


# -- features ---------------------------------------------------------------------

#: (label, path with query): W1 with and without each feature, one client.
FEATURES = (
    ("plain p=4 k=4", "/p4/w1/?k=4"),
    ("snapshot p=4 k=4", "/p4/w1/?k=4&feature=snapshot"),
    ("plain p=1 k=1", "/p1/w1/?k=1"),
    ("snapshot p=1 k=1", "/p1/w1/?k=1&feature=snapshot"),
    ("plain p=4 k=1", "/p4/w1/?k=1"),
    ("atomic p=4 k=1", "/p4/w1/?k=1&feature=atomic"),
)


def features(seconds: int, rounds: int) -> dict[str, Any]:
    """W1 with and without snapshot=True and asgi_dbset.atomic(), one client,
    on the dbset server; variants interleaved, the median of *rounds* means."""
    from bench.run import Server, wrk

    server = Server("dbset")
    server.start()
    means: dict[str, list[float]] = {label: [] for label, _ in FEATURES}
    try:
        wrk(f"{server.base}/p8/w1/?k=8", 64, 1)  # grow the pool, start lane threads
        for _ in range(rounds):
            for label, path in FEATURES:
                figures = wrk(f"{server.base}{path}", 1, seconds)
                means[label].append(figures["latency_us"]["mean"] / 1000)
    finally:
        server.stop()
    return {
        "seconds": seconds,
        "rounds": rounds,
        "mean_ms": {
            label: round(statistics.median(v), 3) for label, v in means.items()
        },
    }


def print_features(seconds: int, rounds: int) -> None:
    result = features(seconds, rounds)
    print(f"W1, one client, median of {rounds} rounds of {seconds} s (mean latency):")
    for label, ms in result["mean_ms"].items():
        print(f"  {label:18} {ms:7.2f} ms")


# -- pgbouncer --------------------------------------------------------------------

#: (label, server, path): W1 at k = p, each through PgBouncer and direct.
PGBOUNCER_RUNS = tuple(
    (f"{variant} k={k}", variant, f"/p{1 if variant == 'stock' else k}/w1/?k={k}")
    for k in (1, 2, 4, 8)
    for variant in ("stock", "dbset")
)


def pgbouncer(seconds: int, rounds: int) -> dict[str, Any]:
    """W1 through a PgBouncer (transaction pooling) and direct, one client;
    the runs interleaved, the median of *rounds* means per run."""
    from bench import config
    from bench.run import Server, wrk
    from tests.pgbouncer import in_front_of

    # Its pool holds every connection a process may use here (the app's pool
    # is 16): the figures are PgBouncer's hop, not a queue in front of it.
    bouncer, url = in_front_of(config.SERVER_DSN, pool_size=20)
    servers = {}
    try:
        for route, env in (
            ("direct", {}),
            ("pgbouncer", {"BENCH_DSN": url, "BENCH_PGBOUNCER": "1"}),
        ):
            for variant in ("stock", "dbset"):
                server = Server(variant, env)
                server.log = server.log.with_name(f"{variant}-{route}.log")
                server.start()
                servers[route, variant] = server
                wrk(f"{server.base}/p1/w1/?k=1", 16, 1)  # grow the pool
                if variant == "dbset":
                    wrk(f"{server.base}/p8/w1/?k=8", 8, 1)  # start lane threads
        means: dict[str, list[float]] = {}
        for _ in range(rounds):
            for label, variant, path in PGBOUNCER_RUNS:
                for route in ("direct", "pgbouncer"):
                    figures = wrk(f"{servers[route, variant].base}{path}", 1, seconds)
                    means.setdefault(f"{route} {label}", []).append(
                        figures["latency_us"]["mean"] / 1000
                    )
    finally:
        for server in servers.values():
            server.stop()
        bouncer.stop()
    return {
        "seconds": seconds,
        "rounds": rounds,
        "pool_size": bouncer.pool_size,
        "mean_ms": {
            label: round(statistics.median(v), 3) for label, v in means.items()
        },
    }


def print_pgbouncer(seconds: int, rounds: int) -> None:
    result = pgbouncer(seconds, rounds)
    print(
        f"W1 at k = p, one client, median of {rounds} rounds of {seconds} s "
        "(mean latency, ms):"
    )
    print(f"  {'':12} {'direct':>8} {'PgBouncer':>10}")
    for label, _, _ in PGBOUNCER_RUNS:
        direct = result["mean_ms"][f"direct {label}"]
        pooled = result["mean_ms"][f"pgbouncer {label}"]
        print(f"  {label:12} {direct:8.2f} {pooled:10.2f}")


# -- sweep (W6) -------------------------------------------------------------------

#: W6's client counts, and its pool.
SWEEP_CLIENTS = (1, 4, 8, 16, 20, 32, 64, 200)
SWEEP_POOL = 20
#: W1 as sync functions: (label, server, path), one client.
SYNC_RUNS = tuple(
    (f"{variant} k={k}", variant, f"/p{1 if variant == 'stock' else k}/w1sync/?k={k}")
    for k in (1, 2, 4, 8)
    for variant in ("stock", "dbset")
)


def _sweep_seconds(seconds: int, clients: int) -> int:
    """A W6 run's length: twice *seconds* where the pool binds the servers
    (clients >= its size), whose requests take seconds each at 200 clients:
    a short run would be mostly its start and end, and its ratio the noise
    the verdict is judged against."""
    return seconds if clients < SWEEP_POOL else 2 * seconds


def _quiet(app_name: str, limit: float = 20.0) -> None:
    """Wait until no query of *app_name* runs on the server (a closed-loop
    run's last requests drain after wrk stops: they must not overlap the next
    run), at most *limit* seconds."""
    import psycopg

    from bench import config

    deadline = time.monotonic() + limit
    quiet = 0
    with psycopg.connect(config.db_dsn("bench_harness"), autocommit=True) as conn:
        while quiet < 3 and time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND state = 'active'",
                (app_name,),
            ).fetchone()
            quiet = quiet + 1 if row and row[0] == 0 else 0
            time.sleep(0.05)


class _ActiveSampler:
    """The most queries each server had running at once (pg_stat_activity,
    every 20 ms): the connections it used, out of the pool's."""

    def __init__(self) -> None:
        self.max: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _ActiveSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        import psycopg

        from bench import config

        with psycopg.connect(config.db_dsn("bench_harness"), autocommit=True) as conn:
            while not self._stop.is_set():
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE datname = %s AND state <> 'idle' AND pid <> pg_backend_pid() "
                    "GROUP BY 1",
                    (config.DB_NAME,),
                ).fetchall()
                for name, count in rows:
                    self.max[name] = max(self.max.get(name, 0), int(count))
                self._stop.wait(0.02)


def sweep(seconds: int, rounds: int) -> dict[str, Any]:
    """W6 and W1 as sync functions; see the module docstring."""
    from bench.run import Server, http_get, wrk

    env = {"BENCH_POOL_MAX_SIZE": str(SWEEP_POOL)}
    paths = {
        "stock": "/p1/w1/?k=8",
        "dbset": "/p8/w1/?k=8",
        "stock-twin": "/p1/w1/?k=8",
    }
    servers = {name: Server(name, env) for name in paths}
    runs: dict[str, list[dict[str, float]]] = {}
    # Per client count, each round's ratio to stock of the same round.
    paired: dict[str, dict[str, list[float | None]]] = {}
    sync: dict[str, list[float]] = {}

    def leased() -> float:
        counts = json.loads(http_get(servers["dbset"].base + "/stats/")[1])
        return float(counts["asgi_dbset"]["lanes_leased"])

    try:
        for name, server in servers.items():
            server.start()
            wrk(f"{server.base}{paths[name]}", SWEEP_POOL, 2)  # grow the pool
            _quiet(f"bench_{name}")
        for round_no in range(rounds):
            # Stock in the middle: asgi_dbset and the second stock server are
            # each measured right next to it, before it one round and after
            # it the next, so an effect of the order cancels over two rounds.
            order = ["dbset", "stock", "stock-twin"]
            if round_no % 2:
                order.reverse()
            for clients in SWEEP_CLIENTS:
                rps: dict[str, float] = {}
                failed: dict[str, bool] = {}
                for name in order:
                    server = servers[name]
                    before, cpu_before = leased(), server.cpu_seconds()
                    with _ActiveSampler() as sampler:
                        figures = wrk(
                            f"{server.base}{paths[name]}",
                            clients,
                            _sweep_seconds(seconds, clients),
                        )
                    _quiet(f"bench_{name}")
                    # (After the drain: the requests wrk left in flight are
                    # counted in both, as in the lanes below.)
                    cpu = server.cpu_seconds() - cpu_before
                    n = max(figures["requests"], 1)
                    rps[name] = figures["requests"] / (figures["duration_us"] / 1e6)
                    errors = float(sum(figures["errors"].values()))
                    # (No ratio from a run that failed: errors, or no request.)
                    failed[name] = bool(errors) or not rps[name]
                    runs.setdefault(f"{name} c={clients}", []).append(
                        {
                            "rps": rps[name],
                            "p50_ms": figures["latency_us"]["p50"] / 1000,
                            "p99_ms": figures["latency_us"]["p99"] / 1000,
                            "errors": errors,
                            "connections": float(sampler.max.get(f"bench_{name}", 0)),
                            # (Leased by the dbset server; requests drained
                            # after wrk stopped are counted too.)
                            "lanes_per_request": (leased() - before) / n,
                            "server_cpu_ms_per_request": cpu * 1000 / n,
                        }
                    )
                ratios = paired.setdefault(
                    str(clients), {"dbset": [], "stock-twin": []}
                )
                for name, found in ratios.items():
                    # None: either server failed its run this round.
                    found.append(
                        None
                        if failed["stock"] or failed[name]
                        else round(rps[name] / rps["stock"], 4)
                    )
            for label, name, path in SYNC_RUNS:
                figures = wrk(f"{servers[name].base}{path}", 1, max(1, seconds // 2))
                sync.setdefault(label, []).append(figures["latency_us"]["mean"] / 1000)
    finally:
        for server in servers.values():
            server.stop()
    return {
        "seconds": seconds,
        "bound_seconds": _sweep_seconds(seconds, SWEEP_POOL),
        "rounds": rounds,
        "pool": SWEEP_POOL,
        "clients": list(SWEEP_CLIENTS),
        "w6": {
            label: {
                key: round(statistics.median(r[key] for r in rows), 3)
                for key in rows[0]
            }
            for label, rows in runs.items()
        },
        "paired": paired,
        "w1sync_mean_ms": {
            label: round(statistics.median(v), 3) for label, v in sync.items()
        },
    }


def print_sweep(seconds: int, rounds: int) -> None:
    from bench.report import w6_ratios

    result = sweep(seconds, rounds)
    w6 = result["w6"]
    ratios, twins = w6_ratios(result)
    print(
        f"W6: 8 x 20 ms lookups per request, pool {result['pool']}, median of "
        f"{rounds} rounds of {seconds} s"
    )
    print(
        f"  {'clients':>7} | {'stock req/s':>11} {'p50':>7} {'p99':>7} {'conns':>5} |"
        f" {'dbset req/s':>11} {'p50':>7} {'p99':>7} {'conns':>5} | {'ratio':>5}"
        f" {'twin':>5}"
    )
    for c in result["clients"]:
        s, d = w6[f"stock c={c}"], w6[f"dbset c={c}"]
        print(
            f"  {c:7d} | {s['rps']:11.1f} {s['p50_ms']:7.1f} {s['p99_ms']:7.1f}"
            f" {s['connections']:5.0f} | {d['rps']:11.1f} {d['p50_ms']:7.1f}"
            f" {d['p99_ms']:7.1f} {d['connections']:5.0f}"
            f" | {ratios.get(c, math.nan):5.2f} {twins.get(c, math.nan):5.2f}"
            f" | lanes/request {d['lanes_per_request']:.2f}"
            f" | CPU ms/request {s['server_cpu_ms_per_request']:.2f}"
            f" / {d['server_cpu_ms_per_request']:.2f}"
        )
    print("W1 as sync functions, one client (mean latency, ms):")
    for label, ms in result["w1sync_mean_ms"].items():
        print(f"  {label:12} {ms:8.2f}")


# -- floor ------------------------------------------------------------------------


def floor(calls: int) -> dict[str, Any]:
    """W1's lookup, timed in thread CPU time around the moment its query is sent;
    see the module's docstring. Runs in a child process on stock Django."""
    out = _run_child(["_floor", str(calls)], "stock", "", timeout=300)
    return dict(json.loads(out.stdout))


def _floor_child(calls: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.djsite.settings")
    import django

    django.setup()
    from django.db import connection

    from bench.config import pk_for
    from bench.djsite.views import sleep_queryset

    marks: dict[str, float] = {}

    def sent_at(execute: Any, sql: Any, params: Any, many: bool, context: Any) -> Any:
        marks["sent"] = time.thread_time()
        try:
            return execute(sql, params, many, context)
        finally:
            marks["back"] = time.thread_time()

    warm = 50
    before: list[float] = []
    after: list[float] = []
    whole: list[float] = []
    with connection.execute_wrapper(sent_at):
        for i in range(warm + calls):
            started = time.thread_time()
            # The W1 view's own call, as its lane thread (or stock's) runs it.
            sleep_queryset().get(pk=pk_for(i * 13, 0))
            ended = time.thread_time()
            if i >= warm:
                before.append(marks["sent"] - started)
                after.append(ended - marks["back"])
                whole.append(ended - started)
    connection.close()

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 4)

    print(
        json.dumps(
            {
                "calls": calls,
                "before_send_ms": ms(before),
                "after_result_ms": ms(after),
                "call_cpu_ms": ms(whole),
                "python": sys.version.split()[0],
            }
        )
    )


# -- breakdown --------------------------------------------------------------------


#: The switch intervals ``make bench`` runs the breakdown with: Python's
#: default, and two shorter ones (a waiting thread forces a GIL switch sooner).
SWITCHES = (0.005, 0.001, 0.0002)


def breakdown(
    k: int, requests: int, switches: list[float], rounds: int
) -> dict[str, Any]:
    """W1 at p = k, each call's time split into phases (see the module's
    docstring); one child process per switch interval and round, interleaved."""
    runs: dict[str, list[dict[str, Any]]] = {str(sw): [] for sw in switches}
    for round_no in range(rounds):
        order = switches if round_no % 2 == 0 else list(reversed(switches))
        for sw in order:
            out = _run_child(
                ["_breakdown", str(k), str(requests), "--switch", str(sw)],
                "dbset",
                "",
                timeout=600,
            )
            runs[str(sw)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {"k": k, "requests": requests, "rounds": rounds, "runs": runs}


def _breakdown_child(k: int, requests: int, switch: float) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.djsite.settings")
    import contextvars

    sys.setswitchinterval(switch)
    application = _wrapped("")
    import psycopg_pool
    from django.db.backends import utils

    from asgi_dbset.dbset import ConnectionSet
    from asgi_dbset.targets import target_of

    current: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar(
        "breakdown_call", default=None
    )
    calls: list[dict[str, float]] = []
    here = threading.local()
    perf, cpu = time.perf_counter, time.thread_time

    original_call = ConnectionSet.call

    async def call(
        self: ConnectionSet,
        func: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        where: Any = None,
    ) -> Any:
        target = where or target_of(func, args, kwargs)
        if target is None:
            return await original_call(self, func, args, kwargs, where)
        record = {"made": perf()}

        def timed(*a: Any, **kw: Any) -> Any:
            lease = getattr(here, "lease", None)
            here.lease = None
            record["lease"] = lease if lease is not None else 0.0
            record["start"], record["start_cpu"] = perf(), cpu()
            try:
                return func(*a, **kw)
            finally:
                record["end"], record["end_cpu"] = perf(), cpu()

        # (The target is passed on as found; the set's records read the name.)
        timed.__name__ = getattr(func, "__name__", "?")
        token = current.set(record)
        try:
            result = await original_call(self, timed, args, kwargs, target)
        finally:
            current.reset(token)
        record["resumed"] = perf()
        calls.append(record)
        return result

    ConnectionSet.call = call  # type: ignore[method-assign]

    original_execute = utils.CursorWrapper._execute

    def execute(self: Any, sql: Any, params: Any, *ignored: Any) -> Any:
        record = current.get()
        if record is not None:
            record["sent"], record["sent_cpu"] = perf(), cpu()
        try:
            return original_execute(self, sql, params, *ignored)
        finally:
            if record is not None:
                record["back"], record["back_cpu"] = perf(), cpu()

    utils.CursorWrapper._execute = execute  # type: ignore[method-assign]

    original_getconn = psycopg_pool.ConnectionPool.getconn

    def getconn(self: Any, timeout: float | None = None) -> Any:
        started = perf()
        try:
            return original_getconn(self, timeout)
        finally:
            here.lease = perf() - started

    psycopg_pool.ConnectionPool.getconn = getconn  # type: ignore[method-assign]

    path, query = f"/p{k}/w1/", f"k={k}"
    latencies: list[float] = []
    per_request: list[list[dict[str, float]]] = []

    async def run() -> None:
        for _ in range(30):  # warm: pool, lane threads, caches
            assert await _one(application, path, query) == 200
        for _ in range(requests):
            calls.clear()
            started = perf()
            assert await _one(application, path, query) == 200
            latencies.append(perf() - started)
            per_request.append(sorted(calls, key=lambda r: r["made"]))

    asyncio.run(run())

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1000, 3)

    phases = {
        "hop_out_ms": lambda r: r["start"] - r["made"] - r["lease"],
        "lease_ms": lambda r: r["lease"],
        "before_wall_ms": lambda r: r["sent"] - r["start"],
        "before_cpu_ms": lambda r: r["sent_cpu"] - r["start_cpu"],
        "server_ms": lambda r: r["back"] - r["sent"],
        "after_wall_ms": lambda r: r["end"] - r["back"],
        "after_cpu_ms": lambda r: r["end_cpu"] - r["back_cpu"],
        "hop_back_ms": lambda r: r["resumed"] - r["end"],
    }
    complete = [
        rs for rs in per_request if len(rs) == k and all("sent" in r for r in rs)
    ]
    positions = []
    for i in range(k):
        row = {name: ms([f(rs[i]) for rs in complete]) for name, f in phases.items()}
        # When its query left and when its caller resumed, from the first call made.
        row["sent_at_ms"] = ms([rs[i]["sent"] - rs[0]["made"] for rs in complete])
        row["resumed_at_ms"] = ms([rs[i]["resumed"] - rs[0]["made"] for rs in complete])
        positions.append(row)
    print(
        json.dumps(
            {
                "switch": switch,
                "latency_ms": ms(latencies),
                "requests": len(complete),
                # How long the loop took to make the k calls (each call's work
                # on the loop, before any thread runs one), from the first.
                "made_span_ms": ms([rs[-1]["made"] - rs[0]["made"] for rs in complete]),
                "last_resumed_ms": ms(
                    [rs[-1]["resumed"] - rs[0]["made"] for rs in complete]
                ),
                "positions": positions,
            }
        )
    )


def print_breakdown(k: int, requests: int, switches: list[float], rounds: int) -> None:
    result = breakdown(k, requests, switches, rounds)
    fl = floor(400)
    print(
        f"W1 at p = k = {k}, in-process, {requests} requests x {rounds} rounds; floor CPU "
        f"{fl['before_send_ms']} ms before a query leaves, {fl['after_result_ms']} ms after"
    )
    for sw, runs in result["runs"].items():
        lat = statistics.median(r["latency_ms"] for r in runs)
        span = statistics.median(r["last_resumed_ms"] for r in runs)
        print(
            f"\nswitch interval {sw} s: request {lat:.2f} ms, first call made to last resumed {span:.2f} ms"
        )
        print(
            "  call  hop-out  lease  before(cpu)    server  after(cpu)   hop-back  sent@  resumed@"
        )
        for i in range(result["k"]):

            def m(key: str, i: int = i, runs: list[Any] = runs) -> float:
                return statistics.median(r["positions"][i][key] for r in runs)

            print(
                f"  {i:4d}  {m('hop_out_ms'):7.3f}  {m('lease_ms'):5.2f}  "
                f"{m('before_wall_ms'):5.3f}({m('before_cpu_ms'):5.3f})  {m('server_ms'):7.3f}  "
                f"{m('after_wall_ms'):5.3f}({m('after_cpu_ms'):5.3f})  {m('hop_back_ms'):7.3f}  "
                f"{m('sent_at_ms'):5.2f}  {m('resumed_at_ms'):7.2f}"
            )


# -- spin -------------------------------------------------------------------------


def spin() -> None:
    import django
    from django.conf import settings

    settings.configure()
    django.setup()
    from asgi_dbset.dbset import ConnectionSet

    def watchdog() -> None:
        time.sleep(3)
        print(
            f"Python {sys.version.split()[0]}: ConnectionSet.aclose() still running "
            f"after 3 s: the event loop is spinning in _release_all()",
            flush=True,
        )
        os._exit(1)

    async def main() -> None:
        async with ConnectionSet(parallelism=2) as dbset:

            async def ends_at_once() -> None:
                # Stands for a _cancel(), _retire() or _grow() task that ends
                # without waiting, e.g. cancel_query() on a lane whose
                # connection is already closed.
                return None

            # Spawned just before the set closes: it runs and ends in the same
            # loop iteration in which _release_all() first runs, so its
            # done-callback (self._background.discard) is still only scheduled.
            dbset._scheduler._spawn(ends_at_once())
        print(f"Python {sys.version.split()[0]}: aclose() returned", flush=True)

    threading.Thread(target=watchdog, daemon=True).start()
    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.diagnose")
    sub = parser.add_subparsers(dest="command", required=True)
    over = sub.add_parser("overhead")
    over.add_argument("--requests", type=int, default=2000)
    over.add_argument("--rounds", type=int, default=3)
    over.add_argument("--profile", choices=list(VARIANTS), help="cProfile one variant")
    over.add_argument(
        "--split", action="store_true", help="also the middleware's halves"
    )
    over.add_argument(
        "--clients", type=int, default=1, help="requests in flight at once (wrk's -c)"
    )
    ins = sub.add_parser("instructions")
    ins.add_argument("--requests", type=int, default=300)
    ins.add_argument(
        "--variants",
        default="stock,dbset-p1,dbset-p4",
        help="comma-separated, of: " + ", ".join(INSTRUCTION_VARIANTS),
    )
    ins.add_argument("--jobs", type=int, default=2, help="valgrinds at once")
    hp = sub.add_parser("hop")
    hp.add_argument("--calls", type=int, default=200)
    noop = sub.add_parser("_noop")
    noop.add_argument("how", choices=["hop", "SyncToAsync"])
    noop.add_argument("calls", type=int)
    sat = sub.add_parser("saturation")
    sat.add_argument("--seconds", type=int, default=5)
    sat.add_argument("--clients", type=int, default=64)
    sat.add_argument("--rounds", type=int, default=2)
    ln = sub.add_parser("lanes")
    ln.add_argument("--seconds", type=int, default=3)
    ft = sub.add_parser("features")
    ft.add_argument("--seconds", type=int, default=3)
    ft.add_argument("--rounds", type=int, default=3)
    pb = sub.add_parser("pgbouncer")
    pb.add_argument("--seconds", type=int, default=3)
    pb.add_argument("--rounds", type=int, default=3)
    sw = sub.add_parser("sweep")
    sw.add_argument("--seconds", type=int, default=4)
    sw.add_argument("--rounds", type=int, default=2)
    fl = sub.add_parser("floor")
    fl.add_argument("--calls", type=int, default=400)
    sub.add_parser("spin")
    bd = sub.add_parser("breakdown")
    bd.add_argument("--k", type=int, default=8)
    bd.add_argument("--requests", type=int, default=60)
    bd.add_argument("--rounds", type=int, default=3)
    bd.add_argument(
        "--switch", default="0.005", help="comma-separated sys.setswitchinterval values"
    )
    bd_child = sub.add_parser("_breakdown")
    bd_child.add_argument("k", type=int)
    bd_child.add_argument("requests", type=int)
    bd_child.add_argument("--switch", type=float, default=0.005)
    fl_child = sub.add_parser("_floor")
    fl_child.add_argument("calls", type=int)
    child = sub.add_parser("_child")
    child.add_argument("path")
    child.add_argument("requests", type=int)
    child.add_argument("--profile", action="store_true")
    child.add_argument("--clients", type=int, default=1)
    serve = sub.add_parser("_serve")
    serve.add_argument("path")
    serve.add_argument("requests", type=int)
    serve.add_argument("--query", default="")
    args = parser.parse_args()
    if args.command == "overhead":
        overhead(args.requests, args.rounds, args.profile, args.split, args.clients)
    elif args.command == "instructions":
        names = args.variants.split(",")
        unknown = sorted(set(names) - set(INSTRUCTION_VARIANTS))
        if unknown:
            parser.error(
                f"unknown variants {unknown}: use {list(INSTRUCTION_VARIANTS)}"
            )
        instructions(args.requests, names, args.jobs)
    elif args.command == "_serve":
        _serve_requests(args.path, args.query, args.requests)
    elif args.command == "hop":
        if shutil.which("valgrind") is None:
            raise SystemExit("valgrind is missing: apt-get install valgrind")
        for how, per_call in hop_instructions(args.calls).items():
            print(f"  {how:12} {per_call / 1000:7.1f} k instructions per no-op call")
    elif args.command == "_noop":
        _noop_calls(args.how, args.calls)
    elif args.command == "saturation":
        saturation(args.seconds, args.clients, args.rounds)
    elif args.command == "lanes":
        lanes(args.seconds)
    elif args.command == "features":
        print_features(args.seconds, args.rounds)
    elif args.command == "pgbouncer":
        print_pgbouncer(args.seconds, args.rounds)
    elif args.command == "sweep":
        print_sweep(args.seconds, args.rounds)
    elif args.command == "floor":
        print(json.dumps(floor(args.calls), indent=1))
    elif args.command == "_floor":
        _floor_child(args.calls)
    elif args.command == "spin":
        spin()
    elif args.command == "breakdown":
        switches = [float(v) for v in args.switch.split(",")]
        print_breakdown(args.k, args.requests, switches, args.rounds)
    elif args.command == "_breakdown":
        _breakdown_child(args.k, args.requests, args.switch)
    else:
        _child(args.path, "", args.requests, args.profile, args.clients)


if __name__ == "__main__":
    main()
