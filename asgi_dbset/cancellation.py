"""Cancelling the queries of calls nobody waits for any more.

A :class:`Job` is one ORM call on a lane's thread. Its caller may give up
(a client disconnect, ``asyncio.timeout``, a failing ``TaskGroup`` sibling)
while the call runs, or the set may close on an error: then the query the job
is running is cancelled on the server, and the job sends no other.

A query that runs inside a transaction (the request's own, or a block's) is
the exception: a cancel would abort the whole transaction, and the program's
next statements in it would fail where stock Django's would not (its
``sync_to_async`` cannot interrupt the thread: the abandoned query finishes
and the transaction goes on). So when its caller gives up, such a query runs
on to its end and the job may send its next queries in that transaction, as
on stock; it is cancelled only when the transaction is ended anyway - the set
closing on an error (:meth:`Job.stop`) or a block left on an exception
(:meth:`Job.stop_abandoned`). A stopped job may still roll back to a
savepoint (Django's ``atomic`` recovering from the cancelled query), never
cancelled itself.

Rules:

- A cancel is a network round trip (``cancel_safe``), sent from a helper
  thread. No lock is held across it: the event loop only ever takes a job's
  lock to flip its state, never to wait for a cancel.
- A cancel only ever reaches the query of its own job: the job registers each
  query it sends (:meth:`Job.guard`), a cancel is sent only while one is
  registered, and a query whose cancel is on its way is not unregistered
  until that cancel has been sent - so its connection cannot move on to
  another query meanwhile.
- One cancel loop per job at a time (:meth:`Job.claim_cancel`), however many
  reasons to cancel it come up; a loop that ends with nothing to cancel while
  the job may still send queries lets a later reason start another. The loop
  sends again, with growing pauses, while the same query still runs: a cancel
  that reaches the server before the query does is ignored by it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from . import snapshots, stats
from .errors import QueryRefusedError

logger = logging.getLogger("asgi_dbset")

# Seconds to wait for a cancelled query to end before cancelling it again.
RETRY_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
# The longest one cancel request may take (cancel_safe's own timeout).
CANCEL_TIMEOUT = 5.0
_IDLE = psycopg.pq.TransactionStatus.IDLE


class Job:
    """One ORM call on a lane's thread.

    Its state moves PENDING -> RUNNING -> DONE on the thread, or PENDING ->
    SKIPPED on the loop when its caller gives up before the thread starts it.
    ``_lock`` makes those moves exclusive, so exactly one side frees the lane:
    the caller when the job never ran or has ended, the thread when it ends a
    job its caller abandoned.
    """

    __slots__ = (
        "_cancel_claimed",
        "_ended",
        "_in_transaction",
        "_lock",
        "_query_alias",
        "_query_conn",
        "_sending",
        "abandoned",
        "ended",
        "generation",
        "started",
        "state",
        "stopped",
    )

    PENDING, RUNNING, DONE, SKIPPED = range(4)

    def __init__(self, generation: int = -1) -> None:
        self._lock = threading.Lock()
        self.state = Job.PENDING
        #: The caller gave up while the job ran: the thread frees the lane.
        self.abandoned = False
        #: The set closed on an error: no new query (the caller still waits).
        self.stopped = False
        #: Lane 0's report this job posts (lane 0 only; see .transactions).
        self.generation = generation
        #: perf_counter() when its thread started it (0.0 until then).
        self.started = 0.0
        #: perf_counter() when its thread ended it (0.0 until then).
        self.ended = 0.0
        self._cancel_claimed = False
        # The psycopg connection running this job's query now, if any.
        self._query_conn: psycopg.Connection[Any] | None = None
        # Its alias, and whether it runs inside a transaction.
        self._query_alias = ""
        self._in_transaction = False
        # Set once the cancel being sent for that query has been sent.
        self._sending: threading.Event | None = None
        # Called on the thread when the job ends (see when_ended).
        self._ended: Callable[[], object] | None = None

    def __repr__(self) -> str:
        state = ("pending", "running", "done", "skipped")[self.state]
        flags = " abandoned" * self.abandoned + " stopped" * self.stopped
        return f"<Job {state}{flags}>"

    # -- on the lane's thread ------------------------------------------------

    def begin(self, started: float) -> bool:
        """The thread starts the job; False if its caller gave up already."""
        with self._lock:
            if self.state == Job.SKIPPED:
                return False
            self.state = Job.RUNNING
            self.started = started
            return True

    def end(self) -> bool:
        """The thread is done with the job; True if its caller had abandoned
        it (then the thread tells the loop to free the lane)."""
        # (Taken here, on the thread, so that a call's end never comes after
        # the start of the next call its thread runs, however late the loop
        # learns of it: query times on one lane never overlap.)
        finished = time.perf_counter()
        with self._lock:
            self.state = Job.DONE
            self.ended = finished
            ended, self._ended = self._ended, None
            abandoned = self.abandoned
        if ended is not None:
            try:
                ended()
            except RuntimeError:  # the loop has closed: nobody waits
                pass
        return abandoned

    def guard(
        self,
        execute: Callable[..., Any],
        sql: Any,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        """A Django execute wrapper around every query the job sends, on any
        of its thread's connections."""
        wrapper = context["connection"]
        conn = wrapper.connection
        # Inside a transaction (a set's snapshot is not one: it recovers from a
        # cancel by itself) a cancel would abort the transaction: see above.
        # (Without autocommit, psycopg begins one with this very query.)
        in_transaction = (
            not conn.autocommit or conn.pgconn.transaction_status != _IDLE
        ) and getattr(wrapper, snapshots.MARK, None) is None
        with self._lock:
            if self.stopped or (self.abandoned and not in_transaction):
                if isinstance(sql, str) and sql.startswith("ROLLBACK TO SAVEPOINT "):
                    # Django's atomic recovering from a cancelled query: it ends
                    # work, starts none. Not registered, so no cancel reaches it.
                    registered = False
                else:
                    raise QueryRefusedError(
                        "asgi_dbset: query not sent: the caller of this ORM call "
                        "was cancelled, or its connection set closed on an error."
                    )
            else:
                registered = True
                self._query_conn = conn
                self._query_alias = wrapper.alias
                self._in_transaction = in_transaction
        if not registered:
            return execute(sql, params, many, context)
        try:
            return execute(sql, params, many, context)
        finally:
            with self._lock:
                self._query_conn = None
                sending = self._sending
            if sending is not None:
                # A cancel aimed at this query is on its way: let it land
                # before this connection can run anything else.
                sending.wait(CANCEL_TIMEOUT + 1)

    # -- on the loop ---------------------------------------------------------

    def give_up(self) -> bool:
        """The caller was cancelled: True if the job is running (it is
        abandoned: its thread frees the lane when it ends), False if the lane
        is free now (the job never started, or has ended)."""
        with self._lock:
            if self.state == Job.PENDING:
                self.state = Job.SKIPPED
                return False
            if self.state == Job.RUNNING:
                self.abandoned = True
                return True
            return False

    def stop(self) -> bool:
        """Refuse the job's next queries; True if it is running."""
        with self._lock:
            if self.state != Job.RUNNING:
                return False
            self.stopped = True
            return True

    def stop_abandoned(self, alias: str) -> bool:
        """A block of *alias* on the job's lane is left on an exception: if
        the job's caller has given up, refuse its next queries (it runs in
        the transaction being rolled back), and True (cancel it) if it runs a
        query of that alias now. A query on another database's connection is
        outside that transaction: the job goes on."""
        with self._lock:
            if self.state != Job.RUNNING or not self.abandoned:
                return False
            if self._query_conn is not None and self._query_alias != alias:
                return False
            self.stopped = True
            return self._query_conn is not None

    def claim_cancel(self) -> bool:
        """True unless a cancel loop of the job runs: the caller starts one."""
        with self._lock:
            claimed, self._cancel_claimed = self._cancel_claimed, True
            return not claimed

    def when_ended(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future of *loop*, done once the job has ended."""
        ended: asyncio.Future[None] = loop.create_future()

        def resolve() -> None:
            if not ended.done():
                ended.set_result(None)

        with self._lock:
            if self.state in (Job.PENDING, Job.RUNNING):
                self._ended = lambda: loop.call_soon_threadsafe(resolve)
                return ended
        resolve()
        return ended

    # -- on a helper thread --------------------------------------------------

    def cancel_in_flight(self, timeout: float = CANCEL_TIMEOUT) -> bool:
        """Ask the server to cancel the job's running query; False if none runs.

        Blocks this (helper) thread for the round trip; the job's lock is not
        held meanwhile.
        """
        with self._lock:
            conn = self._query_conn
            if (
                conn is None
                or conn.closed
                or (self._in_transaction and not self.stopped)
            ):
                # No query to cancel, or its caller gave up on one inside a
                # transaction that goes on: it runs to its end, as on stock.
                # The loop ends; a later stop (the set's, or a block's exit)
                # may start another, since this job may yet send queries.
                if not self.stopped:
                    self._cancel_claimed = False
                return False
            sending = self._sending = threading.Event()
        try:
            conn.cancel_safe(timeout=timeout)
        except Exception:  # the query may have ended or the connection died
            logger.debug("asgi_dbset: cancel failed", exc_info=True)
            return False
        finally:
            with self._lock:
                self._sending = None
            sending.set()
        stats.incr("cancels")
        return True


def send_cancel(job: Job) -> asyncio.Future[bool]:
    """Start one cancel of *job*'s running query, on a helper thread, now.

    Started here rather than at a task's first step: at server shutdown the
    loop may stop before a new task ever runs, but it waits for the default
    executor's threads.
    """
    return asyncio.get_running_loop().run_in_executor(None, job.cancel_in_flight)


async def cancel_until_ended(job: Job, first: asyncio.Future[bool]) -> None:
    """*job*'s one cancel loop: await the *first* cancel, then cancel again,
    with growing pauses, while the same query is still in flight (bounded).

    An abandoned or stopped job starts no other query (:meth:`Job.guard`), so
    every cancel after the first can only reach that query.
    """
    ended = job.when_ended(asyncio.get_running_loop())
    try:
        sent = await first
        for wait in RETRY_WAITS:
            if not sent:
                return  # nothing to cancel (Job.cancel_in_flight)
            try:
                await asyncio.wait_for(asyncio.shield(ended), wait)
                return
            except TimeoutError:
                pass
            sent = await send_cancel(job)
    finally:
        if not ended.done():
            ended.cancel()
