"""What the tools that watch queries see: stock Django's outcome, with and
without ``DBSetMiddleware``.

Each test serves the same requests through Django's handler alone (stock) and
through the middleware, and compares what the watching code saw.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.db import connection
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.db.backends.utils import CursorWrapper
from django.http import HttpRequest, JsonResponse
from django.test import Client, TestCase, TransactionTestCase, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import path

from asgi_dbset import DBSetMiddleware, active_set, db_parallelism, lanes
from tests.asgi import request
from tests.helpers import sleeping

pytestmark = pytest.mark.django_db(transaction=True)

#: The queries the hooks saw, while a test records them.
SEEN: list[str] = []
RECORDING: list[bool] = []
#: The queries the middleware's hook saw, while a test records them.
MIDDLEWARE_SEEN: list[str] = []
#: The lanes each request of the gathering view used.
LANES_USED: list[int] = []


async def gathered(request: HttpRequest) -> JsonResponse:
    counts = await asyncio.gather(*(sleeping(0.2).acount() for _ in range(4)))
    dbset = active_set()
    LANES_USED.append(dbset.lanes_used if dbset is not None else 0)
    return JsonResponse({"counts": counts})


async def one_by_one(request: HttpRequest) -> JsonResponse:
    counts = [await sleeping(0.05).acount() for _ in range(4)]
    return JsonResponse({"counts": counts})


async def warmed_then_gathered(request: HttpRequest) -> JsonResponse:
    """One call first (it opens the request's connection, and its receivers
    install their hooks there), then gathered ones."""
    await sleeping(0.01).acount()
    return await gathered(request)


urlpatterns = [
    path("gathered/", gathered),
    path("warmed-then-gathered/", warmed_then_gathered),
    path("one-by-one/", one_by_one),
    path("gathered-4/", db_parallelism(4)(gathered)),
]


def application_hook(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
) -> Any:
    """An APM's execute wrapper (Scout APM installs its own this way)."""
    if RECORDING and "pg_sleep" in sql:
        SEEN.append(context["connection"].alias)
    return execute(sql, params, many, context)


def install_hook(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
    # Once per Django connection object, as Scout APM's receiver does.
    if application_hook not in connection.execute_wrappers:
        connection.execute_wrappers.append(application_hook)


@pytest.fixture
def recording() -> Iterator[list[str]]:
    SEEN.clear()
    RECORDING.append(True)
    connection_created.connect(install_hook)
    try:
        yield SEEN
    finally:
        connection_created.disconnect(install_hook)
        RECORDING.clear()


def middleware_hook(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
) -> Any:
    """Another hook, which no receiver installs, with its own record."""
    if RECORDING and "pg_sleep" in sql:
        MIDDLEWARE_SEEN.append(context["connection"].alias)
    return execute(sql, params, many, context)


def watching_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """A sync middleware watching the request's queries (a SQL commenter, a
    query counter): its hook is on the request thread's connection only."""

    def middleware(request: HttpRequest) -> Any:
        with connection.execute_wrapper(middleware_hook):
            return get_response(request)

    return middleware


#: len(connection.queries) of pg_sleep queries, as a sync middleware read it.
DEBUG_QUERIES: list[int] = []


def debug_queries_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """A sync middleware reading ``connection.queries`` after the view (as a
    query-count header or a debug panel does), under DEBUG."""

    def middleware(request: HttpRequest) -> Any:
        response = get_response(request)
        DEBUG_QUERIES.append(
            sum(1 for query in connection.queries if "pg_sleep" in query["sql"])
        )
        return response

    return middleware


#: Set by tenant_middleware for the request.
TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="unset")


def tenant_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    async def middleware(request: HttpRequest) -> Any:
        TENANT.set("acme")
        return await get_response(request)

    return middleware


tenant_middleware.async_capable = True  # type: ignore[attr-defined]
tenant_middleware.sync_capable = False  # type: ignore[attr-defined]


async def serve(
    parallelism: int | None, path: str, middleware: list[str] | None = None
) -> list[int]:
    """One request to *path*: through Django's handler alone (None), or
    through DBSetMiddleware at *parallelism*."""
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=middleware or [],
        ASGI_DBSET={
            **getattr(settings, "ASGI_DBSET", {}),
            "DEFAULT_PARALLELISM": parallelism or 1,
        },
    ):
        app = get_asgi_application()
        if parallelism is not None:
            app = DBSetMiddleware(app)
        response = await asyncio.wait_for(request(app, path), 20)
    assert response.status == 200, response.body
    counts: list[int] = response.json()["counts"]
    return counts


@pytest.mark.parametrize("view", ["/gathered/", "/one-by-one/"])
@pytest.mark.parametrize("parallelism", [1, 4])
async def test_a_hook_installed_on_connection_created_sees_every_query(
    recording: list[str], view: str, parallelism: int
) -> None:
    stock = await serve(None, view)
    stock_seen = list(recording)
    recording.clear()
    LANES_USED.clear()
    library = await serve(parallelism, view)

    assert stock_seen == ["default"] * 4
    # (Before: a call that opened the request's connection took the hook off
    # it as it ended, and left its own guard there: 1 query seen of 4.)
    assert (library, recording) == (stock, stock_seen)


@pytest.fixture
def recording_only() -> Iterator[list[str]]:
    """What middleware_hook sees (application_hook may still be on lanes'
    connections from the tests above: it records elsewhere)."""
    MIDDLEWARE_SEEN.clear()
    RECORDING.append(True)
    try:
        yield MIDDLEWARE_SEEN
    finally:
        RECORDING.clear()


@pytest.mark.parametrize("view", ["/gathered/", "/one-by-one/"])
@pytest.mark.parametrize("parallelism", [1, 4])
async def test_a_hook_a_sync_middleware_installs_sees_every_query(
    recording_only: list[str], view: str, parallelism: int
) -> None:
    middleware = [f"{__name__}.watching_middleware"]
    stock = await serve(None, view, middleware)
    stock_seen = list(recording_only)
    recording_only.clear()
    library = await serve(parallelism, view, middleware)

    assert stock_seen == ["default"] * 4
    # (Before: 1 of the 4 gathered queries at parallelism 4; the others ran on
    # extra lanes' connections, which the hook is not on.)
    assert (library, recording_only) == (stock, stock_seen)


async def test_a_watched_request_keeps_its_calls_on_lane_0(
    recording_only: list[str],
) -> None:
    LANES_USED.clear()
    await serve(4, "/gathered/")
    await serve(4, "/gathered/", [f"{__name__}.watching_middleware"])

    # Unwatched, the gathered calls run on extra lanes; watched, every call
    # stays on the request's connection, the one the hook is on.
    assert LANES_USED[0] > 1
    assert (LANES_USED[1], recording_only) == (1, ["default"] * 4)


#: The pg_sleep queries a cursor-wrapping tool saw, while a test records them.
CURSOR_SEEN: list[str] = []


class SeeingCursor(CursorWrapper):
    def execute(self, sql: str, params: Any = None) -> Any:
        if RECORDING and "pg_sleep" in sql:
            CURSOR_SEEN.append(self.db.alias)
        return super().execute(sql, params)


def cursor_wrapping_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """A tool that sees each query by replacing the request thread's
    ``connection.cursor`` and ``chunked_cursor`` with its own, as
    django-debug-toolbar's SQL panel does (``wrap_cursor()`` in
    ``debug_toolbar.panels.sql.tracking``)."""

    def wrapped(make: Callable[..., Any]) -> Callable[..., Any]:
        def cursor(*args: Any, **kwargs: Any) -> Any:
            return SeeingCursor(make(*args, **kwargs).cursor, connection)

        return cursor

    def middleware(request: HttpRequest) -> Any:
        own = connection.cursor, connection.chunked_cursor
        connection.cursor = wrapped(own[0])  # type: ignore[method-assign]
        connection.chunked_cursor = wrapped(own[1])  # type: ignore[method-assign]
        try:
            return get_response(request)
        finally:
            del connection.cursor, connection.chunked_cursor

    return middleware


@pytest.mark.parametrize("view", ["/gathered/", "/one-by-one/"])
@pytest.mark.parametrize("parallelism", [1, 4])
async def test_a_tool_that_wraps_the_connections_cursor_sees_every_query(
    recording_only: list[str], view: str, parallelism: int
) -> None:
    middleware = [f"{__name__}.cursor_wrapping_middleware"]
    CURSOR_SEEN.clear()
    stock = await serve(None, view, middleware)
    stock_seen = list(CURSOR_SEEN)
    CURSOR_SEEN.clear()
    LANES_USED.clear()
    library = await serve(parallelism, view, middleware)

    assert stock_seen == ["default"] * 4
    # (Before: 1 of the 4 gathered queries at parallelism 4; the others ran
    # on extra lanes' connections, whose cursor() the tool had not replaced.)
    assert (library, CURSOR_SEEN) == (stock, stock_seen)
    # (Watched, the gathered calls stay on the request's connection: lane 0.)
    used = {"/gathered/": [0 if parallelism == 1 else 1], "/one-by-one/": []}
    assert LANES_USED == used[view]


def capturing_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """A sync middleware counting the request's queries, as assertNumQueries
    does (``CaptureQueriesContext`` on the request thread's connection)."""

    def middleware(request: HttpRequest) -> Any:
        with CaptureQueriesContext(connection):
            return get_response(request)

    return middleware


@pytest.fixture
def told(
    caplog: pytest.LogCaptureFixture,
) -> Iterator[Callable[[], list[logging.LogRecord]]]:
    """The lines the library has logged about watched connections so far, in
    a process that had told none yet (it tells each watcher once per
    process)."""
    caplog.set_level(logging.INFO, logger="asgi_dbset")
    saved = set(lanes._TOLD)
    lanes._TOLD.clear()

    def lines() -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.name == "asgi_dbset"
            and "stay on the request's own connection" in r.getMessage()
        ]

    try:
        yield lines
    finally:
        lanes._TOLD.clear()
        lanes._TOLD.update(saved)


@pytest.mark.parametrize(
    ("middleware", "named"),
    [
        (
            "watching_middleware",
            "an execute wrapper is on it alone (middleware_hook in ",
        ),
        (
            "cursor_wrapping_middleware",
            "its cursor() is replaced on the connection object "
            "(cursor_wrapping_middleware.<locals>.wrapped.<locals>.cursor in ",
        ),
        ("capturing_middleware", "its queries are captured"),
    ],
)
async def test_a_watched_connection_is_named_in_the_log_once(
    recording_only: list[str],
    told: Callable[[], list[logging.LogRecord]],
    middleware: str,
    named: str,
) -> None:
    await serve(4, "/gathered/")
    unwatched = told()
    for _ in range(2):
        await serve(4, "/gathered/", [f"{__name__}.{middleware}"])

    # Nothing to say while nothing watches; then one INFO line for the two
    # watched requests, which names the alias and what watches it.
    assert unwatched == []
    (record,) = told()
    assert record.levelno == logging.INFO
    line = record.getMessage()
    assert "'default'" in line
    assert named in line
    assert "pinned_calls" in line


def count_queries(path: str) -> tuple[int, list[int]]:
    """The queries CaptureQueriesContext (what assertNumQueries uses) counts
    around one request of Django's sync test client."""
    with override_settings(ROOT_URLCONF=__name__):
        with CaptureQueriesContext(connection) as captured:
            response = Client().get(path)
    assert response.status_code == 200, response.content
    return len(captured), response.json()["counts"]


def test_capture_queries_context_counts_every_query() -> None:
    stock = count_queries("/gathered/")
    library = count_queries("/gathered-4/")

    assert stock == (4, [0, 0, 0, 0])
    # (Before: 1, the gathered queries that ran on extra lanes uncounted.)
    assert library == stock


@pytest.mark.parametrize("view", ["/gathered/", "/one-by-one/"])
@pytest.mark.parametrize("parallelism", [1, 4])
async def test_connection_queries_under_debug_lists_every_query(
    view: str, parallelism: int
) -> None:
    middleware = [f"{__name__}.debug_queries_middleware"]
    DEBUG_QUERIES.clear()
    LANES_USED.clear()
    with override_settings(DEBUG=True):
        stock = await serve(None, view, middleware)
        library = await serve(parallelism, view, middleware)

    if view == "/gathered/" and parallelism == 4:
        assert LANES_USED[-1] > 1  # (DEBUG alone keeps nothing on lane 0)
    # (Before: 1 of the 4 gathered queries; the others were in the extra
    # lanes' threads' lists.)
    assert (library, DEBUG_QUERIES[1]) == (stock, DEBUG_QUERIES[0]) == ([0] * 4, 4)


def set_up_connection(
    sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any
) -> None:
    # A receiver that sets each new connection up with a query of its own.
    with connection.cursor() as cursor:
        cursor.execute("SELECT 'set up'")


#: len(connection.queries) of the receiver's queries, as a sync middleware read it.
SET_UP_QUERIES: list[int] = []


def set_up_queries_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    def middleware(request: HttpRequest) -> Any:
        response = get_response(request)
        SET_UP_QUERIES.append(
            sum(1 for query in connection.queries if "set up" in query["sql"])
        )
        return response

    return middleware


async def test_connection_queries_under_debug_list_a_receivers_query_once() -> None:
    middleware = [f"{__name__}.set_up_queries_middleware"]
    SET_UP_QUERIES.clear()
    LANES_USED.clear()
    connection_created.connect(set_up_connection)
    try:
        with override_settings(DEBUG=True):
            stock = await serve(None, "/gathered/", middleware)
            library = await serve(4, "/gathered/", middleware)
    finally:
        connection_created.disconnect(set_up_connection)

    assert LANES_USED[-1] > 1
    # Stock opens one connection for the request. (Before: the query each
    # extra lane's lease sent was handed to the request's list too: [1, 4].)
    assert (library, SET_UP_QUERIES) == (stock, [1, 1])


async def test_connection_created_receivers_see_the_requests_context() -> None:
    seen: list[str] = []

    def receiver(sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any) -> None:
        seen.append(TENANT.get())

    middleware = [f"{__name__}.tenant_middleware"]
    LANES_USED.clear()
    connection_created.connect(receiver)
    try:
        await serve(None, "/gathered/", middleware)
        stock = list(seen)
        seen.clear()
        await serve(4, "/gathered/", middleware)
    finally:
        connection_created.disconnect(receiver)

    assert stock == ["acme"]
    assert LANES_USED[-1] > 1
    # A connection per lane, each set up in the request's context. (Before:
    # the extra lanes' receivers ran in the worker's empty one: "unset".)
    assert len(seen) >= LANES_USED[-1]
    assert set(seen) == {"acme"}


def install_hook_each_time(
    sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any
) -> None:
    # No check for one already there: stock Django serves each ASGI request
    # on a thread of its own, whose connection object is new.
    connection.execute_wrappers.append(application_hook)


async def test_a_receiver_that_appends_on_each_connection_sees_each_query_once() -> (
    None
):
    SEEN.clear()
    RECORDING.append(True)
    connection_created.connect(install_hook_each_time)
    try:
        stock = []
        for _ in range(3):
            await serve(None, "/gathered/")
            stock.append(len(SEEN))
            SEEN.clear()
        library = []
        for _ in range(3):
            await serve(4, "/gathered/")
            library.append(len(SEEN))
            SEEN.clear()
    finally:
        connection_created.disconnect(install_hook_each_time)
        RECORDING.clear()

    assert stock == [4, 4, 4]
    # (Before: the lane threads' connection objects kept the hook of each
    # lease, and saw each query once more per lease: [4, 7, 10].)
    assert library == stock


def install_a_closure(
    sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any
) -> None:
    # A hook made afresh for each connection (a closure over it, as a tracer
    # that names the connection in its spans writes).
    def each_query(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if RECORDING and "pg_sleep" in sql:
            SEEN.append(connection.alias)
        return execute(sql, params, many, context)

    connection.execute_wrappers.append(each_query)


class Tracer:
    """A callable hook object, unhashable (a dataclass with eq=True)."""

    __hash__ = None  # type: ignore[assignment]

    def __call__(
        self,
        execute: Callable[..., Any],
        sql: str,
        params: Any,
        many: bool,
        context: Any,
    ) -> Any:
        if RECORDING and "pg_sleep" in sql:
            SEEN.append(context["connection"].alias)
        return execute(sql, params, many, context)


def install_a_tracer(
    sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any
) -> None:
    connection.execute_wrappers.append(Tracer())


@pytest.mark.parametrize("receiver", [install_a_closure, install_a_tracer])
async def test_a_hook_made_for_each_connection_keeps_calls_in_parallel(
    receiver: Callable[..., None],
) -> None:
    SEEN.clear()
    RECORDING.append(True)
    LANES_USED.clear()
    connection_created.connect(receiver)
    try:
        stock = await serve(None, "/warmed-then-gathered/")
        stock_seen = list(SEEN)
        SEEN.clear()
        library = []
        for _ in range(3):
            library.append(await serve(4, "/warmed-then-gathered/"))
            assert SEEN == stock_seen
            SEEN.clear()
    finally:
        connection_created.disconnect(receiver)
        RECORDING.clear()

    assert stock_seen == ["default"] * 5
    assert library == [stock] * 3
    # The hook is on every connection, as its receiver installed it: the
    # request's connection is not watched. (Before: each request's hook, a
    # new object, was never one of those remembered from a lease, and kept
    # every call of every request on lane 0: [1, 1, 1].)
    assert LANES_USED[0] == 0  # (stock: no set)
    assert min(LANES_USED[1:]) > 1


def watching_with_application_hook(
    get_response: Callable[..., Any],
) -> Callable[..., Any]:
    """A sync middleware installing the hook that a receiver also appends to
    each connection: on stock Django each query passes it twice."""

    def middleware(request: HttpRequest) -> Any:
        with connection.execute_wrapper(application_hook):
            return get_response(request)

    return middleware


async def test_a_hook_a_sync_middleware_adds_again_sees_every_query_again() -> None:
    SEEN.clear()
    RECORDING.append(True)
    LANES_USED.clear()
    connection_created.connect(install_hook_each_time)
    middleware = [f"{__name__}.watching_with_application_hook"]
    try:
        await serve(4, "/warmed-then-gathered/")  # (leases: the hook is known)
        SEEN.clear()
        stock = await serve(None, "/warmed-then-gathered/", middleware)
        stock_seen = list(SEEN)
        SEEN.clear()
        library = await serve(4, "/warmed-then-gathered/", middleware)
    finally:
        connection_created.disconnect(install_hook_each_time)
        RECORDING.clear()

    assert len(stock_seen) == 10
    # (Before: 7 - the gathered calls ran on extra lanes, whose connections
    # have the receiver's hook only.)
    assert (library, SEEN) == (stock, stock_seen)


def make_recorder(record: list[str]) -> Callable[..., Any]:
    """One factory's hooks: each a closure writing to its own record."""

    def each_query(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if RECORDING and "pg_sleep" in sql:
            record.append(context["connection"].alias)
        return execute(sql, params, many, context)

    return each_query


def install_a_recorder(
    sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any
) -> None:
    connection.execute_wrappers.append(make_recorder(SEEN))


def recording_middleware(get_response: Callable[..., Any]) -> Callable[..., Any]:
    """A sync middleware with a hook from the factory a receiver also uses
    (one APM's code), writing to a record of its own, added before the
    request's connection opens."""

    def middleware(request: HttpRequest) -> Any:
        with connection.execute_wrapper(make_recorder(MIDDLEWARE_SEEN)):
            return get_response(request)

    return middleware


async def test_a_middlewares_hook_of_a_receivers_kind_sees_every_query() -> None:
    SEEN.clear()
    MIDDLEWARE_SEEN.clear()
    RECORDING.append(True)
    connection_created.connect(install_a_recorder)
    middleware = [f"{__name__}.recording_middleware"]
    try:
        await serve(4, "/gathered/")  # (leases: the receiver's kind is known)
        SEEN.clear()
        stock = await serve(None, "/gathered/", middleware)
        stock_seen = (list(SEEN), list(MIDDLEWARE_SEEN))
        SEEN.clear()
        MIDDLEWARE_SEEN.clear()
        library = await serve(4, "/gathered/", middleware)
        library_seen = (list(SEEN), list(MIDDLEWARE_SEEN))
    finally:
        connection_created.disconnect(install_a_recorder)
        RECORDING.clear()
        MIDDLEWARE_SEEN.clear()

    assert stock_seen == (["default"] * 4, ["default"] * 4)
    # The middleware's hook is one more of its kind than a lease has once the
    # request's connection opens, but the connection is not open yet when
    # the gathered calls start.
    assert (library, library_seen) == (stock, stock_seen)


@override_settings(ROOT_URLCONF=__name__)
class AssertNumQueriesInATransactionTestCase(TransactionTestCase):
    def test_a_decorated_views_gathered_queries_are_counted(self) -> None:
        with self.assertNumQueries(4):
            stock = self.client.get("/gathered/").json()
        LANES_USED.clear()
        # (Before: "4 != 1 : 1 queries executed, 4 expected".)
        with self.assertNumQueries(4):
            library = self.client.get("/gathered-4/").json()
        assert library == stock
        assert LANES_USED == [1]  # kept on the test's connection, the counted one


@override_settings(ROOT_URLCONF=__name__)
class AssertNumQueriesInATestCase(TestCase):
    def test_a_decorated_views_gathered_queries_are_counted(self) -> None:
        with self.assertNumQueries(4):
            stock = self.client.get("/gathered/").json()
        with self.assertNumQueries(4):
            library = self.client.get("/gathered-4/").json()
        assert library == stock
