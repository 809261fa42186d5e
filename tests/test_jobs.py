"""A lane's job and its cancellation (asgi_dbset.cancellation), in isolation.

The state machine needs no database. The cancel itself goes to PostgreSQL,
through a proxy that delays each direction by 0.2 s so that the round trip
of ``cancel_safe`` is long enough to observe.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import OperationalError
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from asgi_dbset import QueryRefusedError
from asgi_dbset.cancellation import Job
from bench.delayproxy import DelayProxy
from tests.helpers import active_sleeps


def test_a_job_its_caller_gives_up_before_it_starts_never_starts() -> None:
    job = Job()
    assert not job.give_up()  # the lane is free at once
    assert job.state == Job.SKIPPED
    assert not job.begin(1.0)
    assert job.started == 0.0


def test_a_job_abandoned_while_it_runs_is_ended_by_its_thread() -> None:
    job = Job()
    assert job.begin(1.0)
    assert job.give_up()  # running: its thread frees the lane
    assert job.abandoned
    assert job.end()  # ...and is told to, here
    assert not job.give_up()  # over


def test_a_finished_job_is_neither_abandoned_nor_stopped() -> None:
    job = Job()
    job.begin(1.0)
    assert not job.end()
    assert not job.give_up()
    assert not job.stop()


def test_one_cancel_loop_per_job() -> None:
    job = Job()
    job.begin(1.0)
    assert job.give_up()
    assert job.claim_cancel()
    assert job.stop()  # the set closes on an error too...
    assert not job.claim_cancel()  # ...but the job's cancel loop runs already


def wrapper_of(conn: psycopg.Connection[Any]) -> Any:
    """What Job.guard reads of a Django connection: its alias and psycopg's."""
    return type("Wrapper", (), {"alias": "default", "connection": conn})()


def test_an_abandoned_or_stopped_job_sends_no_query() -> None:
    sent: list[str] = []

    def execute(sql: str, params: Any, many: bool, context: Any) -> None:
        sent.append(sql)

    with psycopg.connect(settings.DATABASE_URL, autocommit=True) as conn:
        context = {"connection": wrapper_of(conn)}
        for give_up in (Job.give_up, Job.stop):
            job = Job()
            job.begin(1.0)
            job.guard(execute, "SELECT 1", None, False, context)
            give_up(job)
            with pytest.raises(QueryRefusedError) as refused:
                job.guard(execute, "SELECT 2", None, False, context)
            assert isinstance(refused.value, OperationalError)
    assert sent == ["SELECT 1", "SELECT 1"]


def test_an_abandoned_job_inside_a_transaction_goes_on_as_stock() -> None:
    # A cancel would abort the transaction (stock's thread cannot be
    # interrupted): the job's queries in it run, none is cancelled, until the
    # job is stopped - then it may only roll back to a savepoint.
    sent: list[str] = []
    cancelled: list[bool] = []
    job = Job()

    def execute(sql: str, params: Any, many: bool, context: Any) -> None:
        sent.append(sql)
        if sql == "SELECT 1":  # (while it is in flight)
            cancelled.append(job.cancel_in_flight())

    with psycopg.connect(settings.DATABASE_URL, autocommit=False) as conn:
        context = {"connection": wrapper_of(conn)}
        job.begin(1.0)
        assert job.give_up()
        assert job.claim_cancel()
        job.guard(execute, "SELECT 1", None, False, context)
        assert cancelled == [False]  # declined...
        assert job.claim_cancel()  # ...and a later reason may start a loop
        assert job.stop()
        with pytest.raises(QueryRefusedError):
            job.guard(execute, "SELECT 2", None, False, context)
        job.guard(execute, 'ROLLBACK TO SAVEPOINT "s1"', None, False, context)
    assert sent == ["SELECT 1", 'ROLLBACK TO SAVEPOINT "s1"']


def test_no_cancel_is_sent_without_a_query_in_flight() -> None:
    job = Job()
    job.begin(1.0)
    assert not job.cancel_in_flight()


@pytest.mark.django_db(transaction=True)
def test_the_callers_side_never_waits_for_a_cancel_in_flight() -> None:
    params = conninfo_to_dict(settings.DATABASE_URL)
    host = str(params.get("host") or "127.0.0.1")
    if host.startswith("/"):
        host = "127.0.0.1"
    port = int(params.get("port") or 5432)
    with DelayProxy((host, port), delay=0.2) as proxy:
        slow = make_conninfo(settings.DATABASE_URL, host="127.0.0.1", port=proxy.port)
        with psycopg.connect(slow, autocommit=True) as conn:
            job = Job()
            job.begin(time.perf_counter())
            context = {"connection": wrapper_of(conn)}
            ran = threading.Event()

            def execute(sql: str, params: Any, many: bool, context: Any) -> None:
                ran.set()
                try:
                    conn.execute(sql)
                except psycopg.errors.QueryCanceled:
                    pass

            query = threading.Thread(
                target=job.guard,
                args=(execute, "SELECT pg_sleep(30)", None, False, context),
            )
            query.start()
            ran.wait(30)
            dbname = str(params.get("dbname") or "postgres")
            for _ in range(300):  # until the query is on the server
                if active_sleeps(dbname):
                    break
                time.sleep(0.01)
            sent: list[bool] = []
            cancel = threading.Thread(
                target=lambda: sent.append(job.cancel_in_flight())
            )
            started = time.perf_counter()
            cancel.start()
            while cancel.is_alive() and job._sending is None:
                time.sleep(0.001)
            # The cancel's round trip takes 0.4 s here; the loop's side of the
            # job answers meanwhile.
            before = time.perf_counter()
            assert job.give_up()
            assert job.stop()
            answered = time.perf_counter() - before
            assert cancel.is_alive()
            cancel.join(30)
            query.join(30)
            took = time.perf_counter() - started
    assert sent == [True]
    assert answered < 0.05
    assert took > 0.3
