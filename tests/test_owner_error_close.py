"""A set closing on its owner's exception while the request's thread is inside
a transaction that a call still running on an extra lane waits for: stock's
outcome, and no close that waits for ever."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connections, transaction
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_dbset import DBSetMiddleware, db_parallelism
from tests.asgi import request
from tests.conftest import _ReturnsInTransaction
from tests.helpers import checked_out, sleeping
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


class RefusedError(Exception):
    """Raised by the sync code after it has locked the row."""


def lock_and_refuse(pk: int) -> None:
    # Sync code the set does not see, on the request's thread: autocommit off,
    # a row locked, then an exception that leaves the transaction open (the
    # request's end closes that connection: Django's close_old_connections
    # drops one whose autocommit was not restored).
    transaction.set_autocommit(False)
    Author.objects.select_for_update().get(pk=pk)
    raise RefusedError


async def _refuses(pk: int) -> None:
    await asyncio.sleep(0.05)
    await sync_to_async(lock_and_refuse)(pk)


async def _renames(pk: int) -> None:
    await asyncio.sleep(0.1)  # (after the lock was asked for, on stock)
    await sleeping(0.8).filter(pk=pk).aupdate(name="renamed")


# The gathered coroutines that asyncio.gather leaves running when one raises.
SIBLINGS: list[asyncio.Task[Any]] = []


async def locked_then_refused(request: Request) -> JSONResponse:
    pk = int(request.query_params["pk"])
    plain = request.query_params.get("plain") == "1"
    renames = asyncio.ensure_future(_renames(pk))
    SIBLINGS.append(renames)
    async with contextlib.nullcontext() if plain else db_parallelism(3):
        # (The first read keeps the request's thread busy: the rename is
        # handed to an extra lane before the lock is taken.)
        await asyncio.gather(sleeping(0.5).acount(), renames, _refuses(pk))
    return JSONResponse({})


app = Starlette(routes=[Route("/locked-then-refused", locked_then_refused)])


async def _serve(wrapped: Any, query: str) -> tuple[str, bool, int, int, int]:
    """What the app raised, whether it ended, the rows renamed, the
    connections the pool rolled back as they came back, and those left out."""
    await sync_to_async(connections.close_all)()  # (the shared thread's)
    before = checked_out()
    author = await Author.objects.acreate(name="original")
    SIBLINGS.clear()
    returned = _ReturnsInTransaction()
    pool_logger = logging.getLogger("psycopg.pool")
    pool_logger.addHandler(returned)
    try:
        served = asyncio.ensure_future(
            request(wrapped, "/locked-then-refused", f"pk={author.pk}&{query}")
        )
        # (Far beyond the 1.5 s it takes: a close that waits for the rename,
        # which waits for the lock, never ends.)
        await asyncio.wait({served}, timeout=20)
        ended = served.done()
        if not ended:
            # (Before the fix: end the lock's transaction, so that the test
            # fails rather than waits with the close.)
            await sync_to_async(_end_idle_transactions)()
            await asyncio.wait({served}, timeout=20)
        raised = type(served.exception()).__name__ if ended else ""
        del served
        await asyncio.wait(SIBLINGS, timeout=20)
        SIBLINGS.clear()  # (nothing of the request stays alive after the test)
        # (Stock: the shared thread's connection, still inside the transaction.)
        await sync_to_async(connections.close_all)()
    finally:
        pool_logger.removeHandler(returned)
    renamed = await Author.objects.filter(name="renamed").acount()
    await Author.objects.all().adelete()
    await sync_to_async(connections.close_all)()  # (this test's own)
    return raised, ended, renamed, returned.count, checked_out() - before


def _end_idle_transactions() -> None:
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND state = 'idle in transaction'"
        )


@pytest.fixture
def no_connection_returned_in_a_transaction() -> None:
    """(conftest's check, overridden: on stock the request's connection goes
    back inside the transaction the code left open, and the test counts that.)"""


async def test_a_close_on_the_owners_exception_does_not_wait_for_the_requests_locks() -> (
    None
):
    stock = await _serve(app, "plain=1")
    lib = await _serve(DBSetMiddleware(app), "")
    # Stock: the rename runs on the request's one thread after the lock, inside
    # the transaction, which goes when the connection does: no row renamed.
    assert stock == ("RefusedError", True, 0, 1, 0)
    # (Before: the set's close waited for the rename, which waited for the
    # request thread's lock, which goes only after that close: never ended.)
    assert lib == stock
