"""``DBSetMiddleware``: a connection set for each HTTP request.

Pure ASGI. For an ``http`` scope it opens a set (``DEFAULT_PARALLELISM``),
runs the app inside it - until the response is complete, streaming bodies
included - and closes it on every path: success, exception, client disconnect,
cancellation. It also gives the request its thread-sensitive context, the one
Django's handler would open (it finds ours and opens none), so apps that have
none (Starlette, FastAPI) get one connection per request, returned at the end;
Django's is returned by Django, or by the middleware when an exception leaves
Django's handler (a streaming body that raised: it sends no request_finished).

``lifespan`` goes to the app; if the app does not handle it (Django's handler
rejects it), the middleware answers it. Either way it opens the pools at
startup and closes them at shutdown. Other scopes (``websocket``...) pass
through without a set: no connection is held for the life of a socket.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys

from asgiref.sync import SyncToAsync, ThreadSensitiveContext
from asgiref.sync import sync_to_async as stock_sync_to_async
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.db import close_old_connections, connections

from . import stats
from .aio import finish_shielded
from .api import set_from_settings
from .budget import pool_options
from .conf import conf
from .dbset import ConnectionSet
from .history import remember
from .hop import release
from .types import ASGIApp, Message, Receive, Scope, Send
from .workers import workers

logger = logging.getLogger("asgi_dbset")

# The longest the lifespan shutdown waits for the connection sets still open:
# those of requests the server cancelled when its graceful shutdown timed out.
# Each stops its queries on the database as it closes, from threads that the
# server's exit would cut short (uvicorn exits right after the shutdown).
CLOSING_SETS_WAIT = 5.0


class DBSetMiddleware:
    """Wrap an ASGI app: ``application = DBSetMiddleware(get_asgi_application())``."""

    def __init__(self, app: ASGIApp) -> None:
        _check_asgi_app(app)
        self.app = app
        # Django's handler returns the request thread's connections itself
        # (request_finished); other apps need the middleware to.
        self._returns_connections = not isinstance(app, ASGIHandler)
        from .apps import prepare, warn_at_startup

        # Fails here, at startup, on bad settings - not at request time.
        prepare()
        warn_at_startup()

    def __repr__(self) -> str:
        return f"DBSetMiddleware({self.app!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # The request's own path, in this one frame: every await of the app
        # resumes each coroutine frame around it.
        values = conf.snapshot()
        history, server_timing = int(values["HISTORY"]), bool(values["SERVER_TIMING"])
        # The request's thread-sensitive context (its lane 0) is opened here,
        # outside the set, and Django's handler finds it and opens none of its
        # own (asgiref: the outer context wins). Its exit waits for the
        # request's thread to be idle (asgiref < 3.12 blocks the loop while it
        # does), so it must come after the set has stopped that thread's query:
        # on a cancelled request (server shutdown) Django's handler unwinds at
        # once, leaving its view running, and only the set can cancel the
        # queries on the server.
        dbset: ConnectionSet | None = None
        failed = False
        request_thread = ThreadSensitiveContext()
        try:
            async with request_thread:
                try:
                    async with set_from_settings(values) as opened:
                        dbset = opened
                        scope["asgi_dbset"] = dbset
                        if server_timing or history > 0:
                            dbset.record_stock_calls = True
                        send = _returning_lanes_when_complete(send, dbset)
                        if server_timing:
                            send = _with_server_timing(send, dbset)
                        try:
                            await self.app(scope, receive, send)
                        except BaseException:
                            # (Cancelled too: the server's shutdown, a timeout
                            # in front of the app - no request_finished then.)
                            failed = True
                            raise
                        finally:
                            if self._returns_connections and not failed:
                                # While the set is open (the lifespan shutdown
                                # waits for open sets).
                                await _return_connections(request_thread)
                finally:
                    if failed:
                        # Django's handler returns them with request_finished,
                        # which it does not send when an exception leaves it
                        # (a streaming body that raised, a cancelled request):
                        # the request's thread would keep its pooled
                        # connection for good. After the set has closed:
                        # behind the calls still running there, which a
                        # cancelled set has stopped on the server.
                        await _return_connections(request_thread)
        finally:
            # Calls made in the request's context from now on come from tasks
            # that outlive it: see release(). (The context has exited.)
            release(request_thread, exited=True)
            # (Failed and cancelled requests too: a timeline that showed only
            # the requests that succeeded would hide the slow ones that failed.)
            if history > 0 and dbset is not None:
                remember(scope.get("path", ""), dbset, history)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        app_received = False

        async def app_receive() -> Message:
            nonlocal app_received
            app_received = True
            message = await receive()
            if message["type"] == "lifespan.startup":
                await open_pools()
            return message

        async def app_send(message: Message) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                await close_pools()
            await send(message)

        try:
            await self.app(scope, app_receive, app_send)
        except Exception:
            if app_received:
                raise
            logger.debug("asgi_dbset: the app does not handle lifespan; answering it")
        else:
            if app_received:
                return
        await _serve_lifespan(receive, send)


async def _return_connections(request_thread: ThreadSensitiveContext) -> None:
    """Return the connections of the request's thread, as Django's
    request_finished does, if the app used that thread."""
    if request_thread in SyncToAsync.context_to_thread_executor:
        # Before the return is queued: the ORM calls queued on the thread
        # until now run before it (their connection goes back with it); those
        # made later, by tasks the app started and did not await (the sibling
        # of a failed gather), would open one there that nobody returns.
        release(request_thread)
        await finish_shielded(stock_sync_to_async(close_old_connections)())


def _check_asgi_app(app: object) -> None:
    """Refuse, at startup, an app that every request would fail to call: the
    lifespan lets a failing app through (as one that does not handle it)."""
    if callable(app):
        try:
            # Its own parameters, not those of a function it wraps
            # (functools.wraps sets __wrapped__ on a wrapper of any signature).
            signature = inspect.signature(app, follow_wrapped=False)
        except (TypeError, ValueError):
            # A callable whose signature cannot be read (``__call__`` an
            # instance slot, as in Sentry's ASGI middleware): Python calls it
            # all the same, so it is let through.
            return
        try:
            signature.bind(object(), object(), object())
        except TypeError:
            pass
        else:
            return
    name = getattr(app, "__qualname__", None) or repr(app)
    raise TypeError(
        f"DBSetMiddleware wraps an ASGI application, called with (scope, receive, "
        f"send); {name} cannot be. Write DBSetMiddleware(get_asgi_application()) "
        f"- with the parentheses - or wrap your Starlette/FastAPI app object."
    )


def _returning_lanes_when_complete(send: Send, dbset: ConnectionSet) -> Send:
    """Return the set's idle extra lanes as the response's last body message
    goes out: the view is done with them, and they are back in the pool before
    the client has the response and can send its next request (a lane busy
    then goes back once idle). The set stays open (on lane 0) for whatever
    the app still does."""

    async def send_returning_lanes(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            dbset.return_idle_lanes()
        await send(message)

    return send_returning_lanes


def _with_server_timing(send: Send, dbset: ConnectionSet) -> Send:
    """Add the set's figures, as they stand when the response starts, as a
    ``Server-Timing`` header."""

    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            figures = dbset.figures()
            value = (
                f'dbset;dur={figures["wall_ms"]:.1f};desc="lanes={figures["lanes_used"]} '
                f'calls={figures["calls"]}", dbquery;dur={figures["query_ms"]:.1f}, '
                f"dbwait;dur={figures['wait_ms']:.1f}"
            )
            headers = [*message.get("headers", []), (b"server-timing", value.encode())]
            message = {**message, "headers": headers}
        await send(message)

    return send_with_header


async def _serve_lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await open_pools()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await close_pools()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _pooled_aliases() -> list[str]:
    return [alias for alias in settings.DATABASES if pool_options(alias) is not None]


async def open_pools() -> None:
    """Open every alias's pool (filling to ``min_size`` in the background)."""

    def open_all() -> None:
        for alias in _pooled_aliases():
            connections[alias].pool.open(wait=False)  # type: ignore[attr-defined]
        otel = sys.modules.get("asgi_dbset.opentelemetry")
        if otel is not None and otel.instrumented():
            otel.time_pools()  # (the pools exist now: time them from the start)

    await asyncio.to_thread(open_all)


async def close_pools() -> None:
    """Close every alias's pool and stop idle lane workers, once the sets still
    open have closed (or after ``CLOSING_SETS_WAIT``)."""
    await wait_for_sets_to_close(CLOSING_SETS_WAIT)

    def close_all() -> None:
        for alias in _pooled_aliases():
            connections[alias].close_pool()  # type: ignore[attr-defined]
        workers.shutdown()

    await asyncio.to_thread(close_all)


async def wait_for_sets_to_close(timeout: float) -> bool:
    """Wait until no connection set is open in the process; False, with a
    warning, if some still are after *timeout* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (still_open := stats.sets_open()) > 0:
        if loop.time() >= deadline:
            logger.warning(
                "asgi_dbset: %d connection set(s) still open at shutdown after "
                "%.1f s; their queries may outlive the process",
                still_open,
                timeout,
            )
            return False
        await asyncio.sleep(0.01)
    return True
