"""The pool_leak_check fixture blames a test for connections it leaves checked out,
and only for those."""

from __future__ import annotations

import threading

import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.db.backends.postgresql.base import DatabaseWrapper

from tests.conftest import pool_leaks, uses_database
from tests.testapp.models import Author

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_connection_taken_from_the_pool_is_reported() -> None:
    assert not Author.objects.exists()
    pool = DatabaseWrapper._connection_pools["default"]
    assert pool_leaks() == {}

    leaked = pool.getconn()
    try:
        problems = pool_leaks(timeout=0.1)
    finally:
        pool.putconn(leaked)

    assert list(problems) == ["default"]
    assert "checked out of the pool" in problems["default"]
    assert "'pool_size'" in problems["default"]
    assert pool_leaks() == {}


def test_a_connection_held_by_another_thread_is_reported() -> None:
    opened = threading.Event()
    release = threading.Event()

    def worker() -> None:
        try:
            Author.objects.exists()
            opened.set()
            release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert opened.wait(10)
        problems = pool_leaks(timeout=0.1)
    finally:
        release.set()
        thread.join(10)

    assert list(problems) == ["default"]
    assert pool_leaks() == {}


async def test_connections_of_asgirefs_shared_thread_are_not_blamed() -> None:
    # Outside a request, thread-sensitive ORM calls run on asgiref's process-wide
    # thread, and Django leaves the connection it opened there checked out.
    assert await Author.objects.acount() == 0

    def has_connection() -> bool:
        return connections["default"].connection is not None

    assert await sync_to_async(has_connection)()
    assert pool_leaks() == {}
    assert not await sync_to_async(has_connection)()


def test_the_check_applies_to_database_tests_only(
    request: pytest.FixtureRequest,
) -> None:
    assert "pool_leak_check" in request.fixturenames
    assert uses_database(request)
