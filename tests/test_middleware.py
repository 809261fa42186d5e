"""DBSetMiddleware around Django's handler and around a Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import warnings
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.db import connections
from django.db.backends.postgresql.base import DatabaseWrapper
from django.test import override_settings

from asgi_dbset import DBSetMiddleware, active_set, connection_set
from asgi_dbset.budget import budget
from asgi_dbset.middleware import wait_for_sets_to_close
from asgi_dbset.types import Message, Receive, Scope, Send
from tests import views
from tests.asgi import request
from tests.helpers import active_sleeps, checked_out, sleeping, timed
from tests.starlette_app import (
    COUNTS_SEEN,
    LANES_SEEN,
    LEFT_RUNNING,
    SIBLINGS,
    GatherFailedError,
    starlette_app,
)
from tests.test_atomic import idle_in_transaction
from tests.testapp.models import Author, Book, Tag
from tests.views import StreamFailedError

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def django_app() -> DBSetMiddleware:
    return DBSetMiddleware(get_asgi_application())


@pytest.fixture
def rows(transactional_db: None) -> None:
    author = Author.objects.create(name="a")
    Book.objects.create(title="b", author=author)
    Book.objects.create(title="c", author=author)
    Tag.objects.create(name="t")


EXPECTED = {"authors": 1, "books": 2, "tags": 1}


def _counts(data: dict[str, Any]) -> dict[str, Any]:
    return {key: data[key] for key in EXPECTED}


@pytest.mark.usefixtures("rows")
@pytest.mark.parametrize(
    "path", ["/dashboard/", "/cbv/", "/cbv-dispatch/", "/cbv-as-view/"]
)
async def test_django_views_run_in_parallel(
    django_app: DBSetMiddleware, path: str
) -> None:
    response, parallel = await timed(request(django_app, path, "sleep=0.2"))
    assert response.status == 200, response.body
    assert _counts(response.json()) == EXPECTED
    assert response.json()["lanes_used"] == 3
    # The same view without the decorator, side by side: one query at a time.
    plain, serial = await timed(request(django_app, "/plain/", "sleep=0.2"))
    assert _counts(plain.json()) == EXPECTED
    assert plain.json()["parallelism"] == 1
    # Three 0.2 s queries one at a time take 0.6 s or more; any overlap of the
    # three shows well below 0.75 of that, with room for leasing under load.
    assert parallel < serial * 0.75, (parallel, serial)


class _SlotsCallMiddleware:
    """An ASGI middleware as Sentry's SentryAsgiMiddleware (and Honeybadger's)
    is written: ``__call__`` an instance slot, chosen in ``__init__``."""

    __slots__ = ("__call__", "app")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.__call__ = self._run_asgi3

    async def _run_asgi3(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def _logged(app: Any) -> Any:
    """A decorator that makes an ASGI app of a function of the scope,
    keeping that function's name (functools.wraps)."""

    @functools.wraps(app)
    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope)(receive, send)

    return wrapper


@pytest.mark.usefixtures("rows")
async def test_apps_whose_signature_cannot_be_read_as_asgi_are_accepted() -> None:
    django = get_asgi_application()

    @_logged
    def by_scope(scope: Scope) -> Any:
        return functools.partial(django, scope)

    for app in (_SlotsCallMiddleware(django), by_scope):
        # Stock: the server calls the app, and it answers.
        stock = await asyncio.wait_for(request(app, "/plain/"), 10)
        assert stock.status == 200, stock.body
        # The library wraps it (it refused both at startup before).
        wrapped = DBSetMiddleware(app)
        response = await asyncio.wait_for(request(wrapped, "/dashboard/"), 10)
        assert response.status == 200, response.body
        assert _counts(response.json()) == EXPECTED


@pytest.mark.usefixtures("rows")
async def test_the_same_view_in_a_starlette_app() -> None:
    app = DBSetMiddleware(starlette_app)
    before = checked_out()
    response, parallel = await timed(request(app, "/dashboard", "sleep=0.2"))
    assert response.status == 200
    assert _counts(response.json()) == EXPECTED
    assert response.json()["lanes_used"] == 3
    plain, serial = await timed(request(app, "/plain", "sleep=0.2"))
    assert _counts(plain.json()) == EXPECTED
    # Three 0.2 s queries one at a time take 0.6 s or more; any overlap of the
    # three shows well below 0.75 of that, with room for leasing under load.
    assert parallel < serial * 0.75, (parallel, serial)
    # The middleware gave each Starlette request its own thread and connection,
    # and returned that connection at the end, as Django's handler does.
    assert checked_out() == before
    assert budget.total == 0


@pytest.mark.usefixtures("rows")
async def test_a_streaming_response_keeps_its_lanes_until_the_body_is_sent(
    django_app: DBSetMiddleware,
) -> None:
    during: list[int] = []
    response = await request(
        django_app,
        "/stream/",
        "chunks=4",
        on_chunk=lambda _: during.append(budget.total),
    )
    assert response.status == 200
    lines = response.body.decode().splitlines()
    assert len(lines) == 4
    # Every chunk was made while the request still held its extra lanes...
    assert all("lanes=3" in line for line in lines), lines
    assert min(during) >= 2
    # ...and they went back once the body was complete.
    assert budget.total == 0


@pytest.mark.usefixtures("rows")
async def test_extra_lanes_are_back_before_the_client_has_the_response(
    django_app: DBSetMiddleware,
) -> None:
    # The request's own connection goes back with Django's request_finished,
    # after the response; the extra lanes go back as its last body goes out,
    # so a client's next request finds them in the pool.
    before = checked_out()
    seen: list[tuple[int, int]] = []
    response = await request(
        django_app,
        "/dashboard/",
        "sleep=0.05",
        on_chunk=lambda _: seen.append((budget.total, checked_out())),
    )
    assert response.status == 200
    assert response.json()["lanes_used"] == 3
    assert seen
    assert seen[-1][0] == 0  # no extra lane held any more
    assert seen[-1][1] <= before + 1  # at most the request's own connection
    assert checked_out() == before


@pytest.mark.parametrize("how", ["finished", "abandoned"])
async def test_a_lane_still_busy_as_the_last_body_goes_out_goes_back_when_idle(
    how: str,
) -> None:
    """An extra lane running a call (or still leasing for it) when the
    response's last body goes out is not idle then: it goes back as soon as it
    is, not when the app returns - an app may go on after its response
    (Starlette's background tasks) while the set stays open."""
    held: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["asgi_dbset"].parallelism = 2
        first = asyncio.ensure_future(sleeping(0.4).acount())  # lane 0
        second = asyncio.ensure_future(sleeping(0.2).acount())  # an extra lane
        await asyncio.sleep(0.05)
        if how == "abandoned":
            second.cancel()  # (its query is cancelled on the server meanwhile)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        # After the response: the calls end, then work with no database.
        await asyncio.gather(first, second, return_exceptions=True)
        await asyncio.sleep(0.05)
        held.append(budget.total)
        held.append(checked_out())

    before = checked_out()
    response = await asyncio.wait_for(request(DBSetMiddleware(app), "/"), 10)
    assert response.status == 200
    # No extra lane held after the calls ended; at most the request's own
    # connection checked out.
    assert held[0] == 0, held
    assert held[1] <= before + 1, (held, before)
    assert budget.total == 0
    assert checked_out() == before


async def test_a_view_raising_while_its_siblings_run(
    django_app: DBSetMiddleware,
) -> None:
    response = await request(django_app, "/fail/")
    assert response.status == 500
    assert budget.total == 0


@pytest.mark.usefixtures("rows")
async def test_a_client_disconnect_cancels_the_queries_on_the_server(
    django_app: DBSetMiddleware,
) -> None:
    task = asyncio.ensure_future(
        request(django_app, "/dashboard/", "sleep=20", disconnect_after=0.5)
    )
    await asyncio.sleep(0.3)
    assert await asyncio.to_thread(active_sleeps) == 3
    _, elapsed = await timed(task)
    assert elapsed < 5
    for _ in range(50):
        if await asyncio.to_thread(active_sleeps) == 0:
            break
        await asyncio.sleep(0.02)
    assert await asyncio.to_thread(active_sleeps) == 0
    assert budget.total == 0


async def test_the_lifespan_shutdown_waits_for_open_sets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with connection_set() as dbset:
        with caplog.at_level(logging.WARNING, logger="asgi_dbset"):
            assert not await wait_for_sets_to_close(0.05)
        assert "connection set(s) still open at shutdown" in caplog.text
        closing = asyncio.ensure_future(wait_for_sets_to_close(5.0))
        await asyncio.sleep(0.05)
        assert not closing.done()
    assert dbset.closed
    assert await closing


@pytest.mark.usefixtures("rows")
async def test_many_requests_against_a_small_pool(django_app: DBSetMiddleware) -> None:
    max_size = settings.DATABASES["default"]["OPTIONS"]["pool"]["max_size"]
    samples: list[int] = []

    async def sample() -> None:
        while True:
            samples.append(checked_out())
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(sample())
    try:
        responses = await asyncio.wait_for(
            asyncio.gather(
                *(request(django_app, "/dashboard/", "sleep=0.05") for _ in range(24))
            ),
            timeout=30,
        )
    finally:
        sampler.cancel()
    assert [r.status for r in responses] == [200] * 24
    assert all(_counts(r.json()) == EXPECTED for r in responses)
    assert max(samples) <= max_size
    assert budget.total == 0


class Recorder:
    """A bare ASGI app that records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls.append((scope["type"], active_set()))
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})


async def test_websocket_and_unknown_scopes_pass_through_without_a_set() -> None:
    app = Recorder()
    middleware = DBSetMiddleware(app)
    messages: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        messages.append(message)

    await middleware({"type": "websocket", "path": "/ws"}, receive, send)
    await middleware({"type": "something-new"}, receive, send)
    assert app.calls == [("websocket", None), ("something-new", None)]
    assert messages == [{"type": "websocket.accept"}]


async def _run_lifespan(app: Any) -> list[Message]:
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []
    for message in ({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}):
        inbox.put_nowait(message)

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "lifespan.startup.complete":
            # Between startup and shutdown, the pools are open.
            assert DatabaseWrapper._connection_pools
            assert all(not p.closed for p in DatabaseWrapper._connection_pools.values())

    await app(
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send
    )
    return sent


@pytest.mark.parametrize("which", ["django", "starlette"])
async def test_lifespan_opens_and_closes_the_pools(which: str) -> None:
    inner = get_asgi_application() if which == "django" else starlette_app
    sent = await _run_lifespan(DBSetMiddleware(inner))
    assert [m["type"] for m in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert DatabaseWrapper._connection_pools == {}


def _lines(response: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in response.body.decode().splitlines()]


@pytest.mark.usefixtures("rows")
async def test_a_streaming_body_keeps_the_decorators_parallelism() -> None:
    """A view decorated @db_parallelism(4) whose streaming body gathers ORM
    calls, behind an async middleware that runs the chain in
    ``async with db_parallelism(2)``: the block exits when the view returns,
    before Django sends the body; the body still runs at the decorator's 4
    (the decorator holds for the rest of the request), as it does with no
    middleware. Rows as on stock (no DBSetMiddleware: the body runs with no
    set)."""
    chain = ["tests.views.NarrowBlockMiddleware"]
    with override_settings(MIDDLEWARE=chain):
        stock_app = get_asgi_application()
        behind_block = DBSetMiddleware(get_asgi_application())
    bare = DBSetMiddleware(get_asgi_application())
    query = "chunks=2&sleep=0.2"
    stock = await asyncio.wait_for(request(stock_app, "/stream-wide/", query), 20)
    plain = await asyncio.wait_for(request(bare, "/stream-wide/", query), 20)
    blocked = await asyncio.wait_for(request(behind_block, "/stream-wide/", query), 20)
    assert stock.status == plain.status == blocked.status == 200
    expected = [[1, 2, 1, 0]] * 2
    assert [line["counts"] for line in _lines(stock)] == expected
    assert [line["counts"] for line in _lines(plain)] == expected
    assert [line["counts"] for line in _lines(blocked)] == expected
    assert [(x["parallelism"], x["lanes"]) for x in _lines(plain)] == [(4, 4)] * 2
    # Side by side with the same view and no middleware: the decorator's 4.
    assert [(x["parallelism"], x["lanes"]) for x in _lines(blocked)] == [
        (x["parallelism"], x["lanes"]) for x in _lines(plain)
    ]
    assert budget.total == 0


# -- a streaming body: disconnects, exceptions, blocks across yields -----------------


def _names(prefix: str) -> list[str]:
    return sorted(
        Author.objects.filter(name__startswith=prefix).values_list("name", flat=True)
    )


async def _outcome(
    app: Any, path: str, query: str, *, stock: bool = False, **kwargs: Any
) -> tuple[list[bytes], str | None, float, int]:
    """The body's chunks as the client got them, the exception the app
    raised to the server (its class name), the time until it had returned and
    no query of it ran on the server any more (a hang fails: TimeoutError,
    AssertionError), and how many pooled connections the request left checked
    out. *stock*: run it in a thread-sensitive context of the test's, which
    Django's handler takes for its own, so that the connection stock Django
    leaves to the request's thread is counted, then closed."""
    chunks: list[bytes] = []
    raised = None
    loop = asyncio.get_running_loop()
    before = checked_out()
    async with contextlib.AsyncExitStack() as stack:
        if stock:
            await stack.enter_async_context(ThreadSensitiveContext())
        started = loop.time()
        try:
            await asyncio.wait_for(
                request(app, path, query, on_chunk=chunks.append, **kwargs), 20
            )
        except StreamFailedError as exc:
            raised = type(exc).__name__
        await _settled()
        elapsed = loop.time() - started
        left = await _left_since(before)
        if stock:
            await sync_to_async(connections.close_all)()
    with warnings.catch_warnings():
        # Django's handler leaves the request's body file to the collector
        # when an exception leaves it, on stock as with the library.
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return chunks, raised, elapsed, left


async def _left_since(before: int) -> int:
    """Pooled connections checked out beyond *before*, once those on their way
    back (from the lanes' and the request's threads, bounded) are back."""
    for _ in range(100):
        if checked_out() == before:
            break
        await asyncio.sleep(0.02)
    return checked_out() - before


async def _settled(timeout: float = 10.0) -> None:
    """Wait (bounded) until no query of the test database sleeps on the server."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await asyncio.to_thread(active_sleeps) > 0:
        if loop.time() > deadline:
            raise AssertionError("queries still running on the server")
        await asyncio.sleep(0.05)


async def test_a_client_disconnect_in_the_middle_of_a_stream(
    django_app: DBSetMiddleware,
) -> None:
    """The client goes away while the body's gathered calls run: they are
    cancelled on the server, the rows are stock's (the first write only), and
    every connection goes back."""
    stock = await _outcome(
        get_asgi_application(),
        "/stream-slow/",
        "prefix=stock&sleep=1",
        stock=True,
        disconnect_after=0.5,
    )
    lib = await _outcome(
        django_app, "/stream-slow/", "prefix=lib&sleep=20", disconnect_after=0.5
    )
    assert (stock[0], stock[1], stock[3]) == ([b"0\n"], None, 0)
    assert (lib[0], lib[1], lib[3]) == (stock[0], stock[1], stock[3])
    assert lib[2] < 5, lib  # (not the 20 s the queries would take)
    assert await sync_to_async(_names)("stock") == ["stock0"]
    assert await sync_to_async(_names)("lib") == ["lib0"]
    assert budget.total == 0


async def test_an_exception_in_the_middle_of_a_stream(
    django_app: DBSetMiddleware,
) -> None:
    """The body raises while its gathered siblings run: the server gets the
    exception as on stock, the siblings' queries run to their end (gather does
    not cancel them), the rows are stock's. Stock Django sends no
    request_finished when an exception leaves its handler, so its request's
    thread keeps its pooled connection for good; the middleware returns it
    (and every lane)."""
    stock = await _outcome(
        get_asgi_application(), "/stream-failing/", "prefix=stock", stock=True
    )
    lib = await _outcome(django_app, "/stream-failing/", "prefix=lib")
    assert stock[:2] == ([b"0\n"], "StreamFailedError")
    assert lib[:2] == stock[:2]
    assert stock[3] == 1  # (stock's leak, closed by _outcome)
    assert lib[3] == 0
    # Side by side: the siblings' queries (1 s each, one after the other on
    # stock's request thread) ran in parallel on the set's lanes.
    assert lib[2] < stock[2], (lib, stock)
    assert await sync_to_async(_names)("stock") == ["stock0"]
    assert await sync_to_async(_names)("lib") == ["lib0"]
    assert budget.total == 0


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous")
@pytest.mark.parametrize("fail", [False, True])
async def test_a_transaction_across_a_streams_yields(
    django_app: DBSetMiddleware, fail: bool
) -> None:
    """A body that writes and reads inside one transaction across its yields:
    on stock, a sync iterator in transaction.atomic() (Django consumes it in
    one sync_to_async call, on the request's thread); with the library, the
    same iterator, and an async one in asgi_dbset.atomic(), after the view
    leased extra lanes. Same lines, rows, exception; nothing left in a
    transaction; every connection back (stock's request thread keeps its
    connection when the body raises: see the test above)."""
    query = "fail=1" if fail else "fail=0"
    stock = await _outcome(
        get_asgi_application(), "/stream-sync/", f"prefix=stock&{query}", stock=True
    )
    lib_sync = await _outcome(django_app, "/stream-sync/", f"prefix=sync&{query}")
    lib_async = await _outcome(django_app, "/stream-atomic/", f"prefix=async&{query}")
    raised = "StreamFailedError" if fail else None
    assert stock[:2] == ([] if fail else [b"1\n", b"3\n", b"4\n"], raised)
    assert stock[3] == int(fail)
    assert lib_sync[:2] == stock[:2]
    # (An async iterator sends each line as it comes: those before the error.)
    assert lib_async[:2] == (stock[0] or [b"1\n", b"3\n"], raised)
    assert lib_sync[3] == lib_async[3] == 0
    expected = [] if fail else ["stock0", "stock1", "stock2", "stock3"]
    assert await sync_to_async(_names)("stock") == expected
    for prefix in ("sync", "async"):
        names = await sync_to_async(_names)(prefix)
        assert [n.replace(prefix, "stock") for n in names] == expected
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def test_a_client_disconnect_inside_a_streams_transaction(
    django_app: DBSetMiddleware,
) -> None:
    """The client goes away while the body's asgi_dbset.atomic() block, open
    across a yield, runs a slow query: the block rolls back (as a cancelled
    block does), its query is cancelled on the server, nothing is left in a
    transaction, and every connection goes back - no hang."""
    chunks, raised, elapsed, left = await _outcome(
        django_app, "/stream-atomic/", "prefix=gone&sleep=20", disconnect_after=0.5
    )
    assert (chunks, raised, left) == ([b"1\n"], None, 0)
    assert elapsed < 5, elapsed
    assert await sync_to_async(_names)("gone") == []
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def _left_by_a_cancelled_request(app: Any, *, stock: bool) -> int:
    """Pooled connections a request leaves checked out when the server cancels
    its task while its view's query runs on the request's thread (see
    :func:`_outcome` for *stock*)."""
    before = checked_out()
    async with contextlib.AsyncExitStack() as stack:
        if stock:
            await stack.enter_async_context(ThreadSensitiveContext())
        task = asyncio.create_task(request(app, "/plain/", "sleep=1"))
        await asyncio.sleep(0.4)  # (its first query is on the server)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)
        await _settled()
        left = await _left_since(before)
        if stock:
            await sync_to_async(connections.close_all)()
    return left


# Django's handler leaves the request's body file unclosed when it is
# cancelled, on stock as with the library.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_request_the_server_cancels_returns_its_connection(
    django_app: DBSetMiddleware,
) -> None:
    """The server cancels a request's task while its view's query runs (a
    shutdown, a timeout in front of the app): Django's handler sends no
    request_finished, so stock's request thread keeps its pooled connection
    for good; the middleware returns it, once the set has stopped the query."""
    assert await _left_by_a_cancelled_request(get_asgi_application(), stock=True) == 1
    assert await _left_by_a_cancelled_request(django_app, stock=False) == 0
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


def _alive(*names: str) -> dict[str, int]:
    """Objects of the classes *names* that are still alive after a collection."""
    gc.collect()
    alive = dict.fromkeys(names, 0)
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in alive:
            alive[name] += 1
    return alive


@pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume synchronous")
async def test_nothing_of_a_finished_request_stays_alive(
    django_app: DBSetMiddleware,
) -> None:
    """A long-running process keeps no request after it is served: stock
    Django's threads drop each call they ran, and so must the lanes' worker
    threads (an idle worker kept its last job - a call closing over the
    request's set, block and context - until its next one: per idle worker,
    a closed set with its records and the call's result, for as long as the
    worker stayed idle)."""
    names = ("ASGIRequest", "ConnectionSet", "Block")
    for prefix in ("stock", "lib"):
        stock = prefix == "stock"
        app = get_asgi_application() if stock else django_app
        path = "/stream-sync/" if stock else "/stream-atomic/"
        for i in range(3):  # (each of the set's lanes runs a last job)
            outcome = await _outcome(app, path, f"prefix={prefix}{i}", stock=stock)
            assert outcome[1:4:2] == (None, 0), outcome
        await asyncio.sleep(0.1)  # (the lanes' threads finish their jobs)
        assert _alive(*names) == dict.fromkeys(names, 0), prefix
    assert budget.total == 0


# -- Starlette: background tasks and streaming responses -----------------------------


@pytest.mark.usefixtures("rows")
async def test_starlette_background_tasks_make_orm_calls_after_the_response() -> None:
    """Background tasks that write and read (gathered, in a block) after the
    response has gone out: the same rows and reads as stock Starlette, the
    calls ran in parallel on the request's set, which stays open for them,
    and every connection is back when the app returns."""
    before = checked_out()
    at_the_end: list[int] = []
    stock = await asyncio.wait_for(
        request(starlette_app, "/background", "prefix=stock&plain=1&sleep=0.1"), 20
    )
    lib = await asyncio.wait_for(
        request(
            DBSetMiddleware(starlette_app),
            "/background",
            "prefix=lib&sleep=0.1",
            on_chunk=lambda _: at_the_end.append(budget.total),
        ),
        20,
    )
    assert stock.json() == lib.json() == {"sent": True}
    assert COUNTS_SEEN["stock"] == [3, 2, 1]
    assert COUNTS_SEEN["lib"] == COUNTS_SEEN["stock"]
    assert LANES_SEEN["stock"] == 0  # (no set: stock)
    assert LANES_SEEN["lib"] == 3
    assert at_the_end == [0]  # (no lane held as the response went out)
    assert await sync_to_async(_names)("stock") == ["stock0", "stock1", "stock2"]
    assert await sync_to_async(_names)("lib") == ["lib0", "lib1", "lib2"]
    await sync_to_async(connections.close_all)()  # (stock's, on asgiref's thread)
    assert checked_out() == before
    assert budget.total == 0


@pytest.mark.usefixtures("rows")
async def test_a_starlette_streaming_response_makes_orm_calls() -> None:
    """A StreamingResponse whose generator writes and gathers reads in a
    block across its yields: the same lines and rows as stock Starlette, the
    reads in parallel, every connection back."""
    stock = await asyncio.wait_for(
        request(starlette_app, "/stream", "prefix=stock&plain=1&sleep=0.1"), 20
    )
    lib = await asyncio.wait_for(
        request(DBSetMiddleware(starlette_app), "/stream", "prefix=lib&sleep=0.1"), 20
    )
    assert stock.status == lib.status == 200
    assert stock.chunks == [b"[1, 2, 1]\n", b"[2, 2, 1]\n"]
    assert lib.chunks == stock.chunks
    assert (LANES_SEEN["stock"], LANES_SEEN["lib"]) == (0, 3)
    assert await sync_to_async(_names)("stock") == ["stock0", "stock1"]
    assert await sync_to_async(_names)("lib") == ["lib0", "lib1"]
    assert budget.total == 0


async def test_a_client_disconnect_in_the_middle_of_a_starlette_stream() -> None:
    """The client goes away while the generator's gathered reads run
    (Starlette cancels it through an anyio cancel scope): the reads are
    cancelled on the server, the rows are stock's, no hang, every connection
    back."""
    stock = await _outcome(
        starlette_app, "/stream", "prefix=stock&plain=1&sleep=1", disconnect_after=0.5
    )
    lib = await _outcome(
        DBSetMiddleware(starlette_app),
        "/stream",
        "prefix=lib&sleep=20",
        disconnect_after=0.5,
    )
    assert (stock[0], stock[1]) == ([], None)
    assert (lib[0], lib[1], lib[3]) == (stock[0], stock[1], 0)
    assert lib[2] < 5, lib  # (not the 20 s the queries would take)
    assert await sync_to_async(_names)("stock") == ["stock0"]
    assert await sync_to_async(_names)("lib") == ["lib0"]
    assert budget.total == 0


async def _left_by_tasks_outliving_their_requests(app: Any, prefix: str) -> int:
    """Three requests each start a task that makes an ORM call after its
    request has ended; pooled connections checked out once the tasks are done,
    collected, and asgiref's shared thread has closed its own."""
    await sync_to_async(connections.close_all)()  # (the shared thread's)
    before = checked_out()
    go_on = starlette_app.state.go_on = asyncio.Event()
    for i in range(3):
        response = await asyncio.wait_for(
            request(app, "/fire-and-forget", f"prefix={prefix}{i}"), 20
        )
        assert response.json() == {"started": True}
    go_on.set()
    await asyncio.wait_for(asyncio.gather(*LEFT_RUNNING), 20)
    LEFT_RUNNING.clear()
    gc.collect()  # (the tasks' contexts, and what asgiref keys on them)
    await sync_to_async(connections.close_all)()
    return await _left_since(before)


async def test_starlette_tasks_outliving_their_requests_leave_no_connection() -> None:
    """A Starlette view starts a task it does not await, which makes an ORM
    call after the response. Without the middleware the call runs on asgiref's
    shared thread (one connection for the process). The task keeps the
    request's thread-sensitive context, which has exited: asgiref gave each
    such task a new thread, whose pooled connection nobody returned - one out
    of the pool for good per request. Now the same rows, and every connection
    back once the shared thread has closed its own, as on stock."""
    stock = await _left_by_tasks_outliving_their_requests(starlette_app, "stock")
    lib = await _left_by_tasks_outliving_their_requests(
        DBSetMiddleware(starlette_app), "lib"
    )
    assert (stock, lib) == (0, 0)
    names = [f"{i}later" for i in range(3)]
    assert await sync_to_async(_names)("stock") == [f"stock{n}" for n in names]
    assert await sync_to_async(_names)("lib") == [f"lib{n}" for n in names]
    assert budget.total == 0


async def _after_a_failed_gather(app: Any, query: str) -> tuple[str, list[Any], int]:
    """What the server got, what the sibling left running ended with, and the
    pooled connections left checked out once it has ended and asgiref's
    shared thread has closed its own."""
    await sync_to_async(connections.close_all)()  # (the shared thread's)
    before = checked_out()
    SIBLINGS.clear()
    raised = ""
    try:
        await asyncio.wait_for(request(app, "/gather-failing", query), 20)
    except GatherFailedError as exc:
        raised = type(exc).__name__
    ended = await asyncio.wait_for(
        asyncio.gather(*SIBLINGS, return_exceptions=True), 20
    )
    await _settled()
    await sync_to_async(connections.close_all)()
    return (
        raised,
        [type(e).__name__ if e else None for e in ended],
        await _left_since(before),
    )


async def test_the_sibling_of_a_call_that_raised_goes_on_as_on_stock() -> None:
    """A Starlette view gathers a read-then-write with a coroutine that raises
    while the read runs. asyncio.gather does not cancel the sibling: on stock
    its read ends and its write lands, after the 500. The set, closing on the
    exception Starlette raises to the server, cancelled the read on the
    server: the sibling ended in OperationalError and its row was missing.
    Now the read ends, the write lands - on asgiref's shared thread, as on
    stock, not on the request's thread, whose connection went back - and
    every connection is back."""
    stock = await _after_a_failed_gather(
        starlette_app, "prefix=stock&plain=1&sleep=0.5"
    )
    lib = await _after_a_failed_gather(
        DBSetMiddleware(starlette_app), "prefix=lib&sleep=0.5"
    )
    assert stock == ("GatherFailedError", [None], 0)
    assert lib == stock
    assert await sync_to_async(_names)("stock") == ["stocksibling"]
    assert await sync_to_async(_names)("lib") == ["libsibling"]
    assert await asyncio.to_thread(idle_in_transaction) == 0
    assert budget.total == 0


async def _rows_of_a_task_outliving_its_request(app: Any, name: str) -> int:
    """A view starts a task that, after the response, turns autocommit off
    with sync_to_async, writes a row with an async ORM call, and rolls back:
    the rows of *name* once it is done."""
    go_on = asyncio.Event()
    views.TASKS_GO_ON.append(go_on)
    response = await asyncio.wait_for(
        request(app, "/transaction-after-the-response/", f"name={name}"), 20
    )
    assert response.json() == {"started": True}
    go_on.set()
    await asyncio.wait_for(asyncio.gather(*views.LEFT_RUNNING), 20)
    views.LEFT_RUNNING.clear()
    await sync_to_async(connections.close_all)()  # (asgiref's shared thread's)
    return await Author.objects.filter(name=name).acount()


async def test_a_task_outliving_its_request_runs_its_orm_calls_in_its_transaction() -> (
    None
):
    stock = await _rows_of_a_task_outliving_its_request(get_asgi_application(), "stock")
    lib = await _rows_of_a_task_outliving_its_request(
        DBSetMiddleware(get_asgi_application()), "lib"
    )
    # On stock the task's sync code and its ORM call run on one thread: the
    # write is inside the transaction, and rolled back. (Before: the ORM call
    # ran on asgiref's shared thread, in autocommit, while the task's own
    # sync_to_async ran on a new thread asgiref made for the exited context:
    # the row was committed, (0, 1).)
    assert (stock, lib) == (0, 0)
