"""Lanes: the places a connection set runs an ORM call, one call at a time each.

- :class:`RequestLane` (lane 0) is the request's own thread and connection,
  reached through ``sync_to_async(thread_sensitive=True)`` exactly as stock
  Django reaches it. The set never opens or returns its connection.
- :class:`PooledLane` (lanes 1..n) pairs a borrowed :class:`~.workers.Worker`
  thread with a connection leased from the alias's psycopg pool. Everything a
  pooled lane does with its connection - lease, queries, release - runs on its
  worker thread, in order, so the connection is never returned while a query
  runs on it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any

import psycopg
from django.db import OperationalError, connections
from django.db.backends.base.base import BaseDatabaseWrapper

from . import stats
from .context import current_set
from .hop import hop, request_thread_executor
from .workers import Worker, workers

logger = logging.getLogger("asgi_dbset")

_thread = threading.local()

# The longest a lane's thread waits for a cancel of an earlier job to land
# before it starts the next one (the cancel's retries end well before).
_GATE_WAIT = 10.0
# The longest a pooled lane's thread waits for lane 0's report before it gives
# the call back to the set (lane 0 reports when it starts its call; this only
# bounds a thread that lane 0's own work keeps waiting).
_CLEARANCE_WAIT = 10.0


class NotRunError(Exception):
    """A call handed to a pooled lane did not run there; the set queues it again."""


class LeaseRefusedError(NotRunError):
    """A call reached a pooled lane whose lease had failed; it did not run."""


class NotClearedError(NotRunError):
    """A call handed to a pooled lane before lane 0's transaction report was
    not cleared by it (lane 0 is inside a transaction of that alias, or the
    report did not come); it did not run."""


class ReportBoard:
    """Lane 0's transaction reports: posted by its thread, read where needed.

    Before each call, lane 0's thread posts here which aliases its connections
    hold a transaction for (see ``RequestLane._before``). Two kinds of reader:

    - The set, on the loop, reads the board when it needs to know
      (:meth:`report_for`), and asks to be woken (:meth:`want`) only when calls
      wait for the report: a request whose calls never wait costs no trip
      through the loop.
    - A pooled lane's thread that was handed a call before the report (see
      ``ConnectionSet._report_on_its_way``) waits for it here
      (:meth:`wait_clear`), and runs the call only if the report clears it.
    """

    __slots__ = ("_cond", "_latest", "_lock", "_notify", "_waiting", "_wanted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Made (on this lock) by the first thread that waits: most sets never
        # hand a call out before lane 0's report.
        self._cond: threading.Condition | None = None
        # (generation, aliases in a transaction); aliases None: no report will
        # come for that generation (see withdraw). Replaced whole, never mutated.
        self._latest: tuple[int, frozenset[str] | None] = (-1, None)
        self._waiting = 0  # pooled lanes' threads in wait_clear()
        self._wanted = -1  # the generation whose report the loop waits for
        # What tells the loop, held only while it waits: no lasting reference
        # from lane 0 back to its set (a cycle would leave every request's set
        # to the cyclic garbage collector).
        self._notify: Callable[[int], None] | None = None

    def post(
        self, generation: int, aliases: frozenset[str]
    ) -> tuple[Callable[[int], None] | None, bool]:
        """On lane 0's thread: publish a report. Returns (what to call with the
        generation to tell the loop, if it asked to be told; threads of pooled
        lanes wait for it)."""
        with self._lock:
            self._latest = (generation, aliases)
            notify = None
            if 0 <= self._wanted <= generation:
                notify, self._notify, self._wanted = self._notify, None, -1
            if self._waiting and self._cond is not None:
                self._cond.notify_all()
            return notify, self._waiting > 0

    def report_for(self, generation: int) -> frozenset[str] | None:
        """On the loop: the report of this generation, if posted (a plain
        read: the pair is replaced whole)."""
        posted, aliases = self._latest
        return aliases if posted == generation else None

    def want(
        self, generation: int, notify: Callable[[int], None]
    ) -> frozenset[str] | None:
        """On the loop: the report of this generation if it is posted already;
        else None, and lane 0's thread calls *notify* when it posts it."""
        with self._lock:
            posted, aliases = self._latest
            if posted == generation and aliases is not None:
                return aliases
            self._wanted, self._notify = generation, notify
            return None

    def withdraw(self, generation: int) -> None:
        """On the loop: the call that was to report this generation will not
        run (its caller gave up before it started; asgiref may drop it from the
        thread's queue unseen). Threads waiting for that report stop waiting;
        a report already posted for it stands."""
        with self._lock:
            if self._latest[0] < generation:
                self._latest = (generation, None)
                if self._cond is not None:
                    self._cond.notify_all()

    def wait_clear(self, generation: int, alias: str, timeout: float) -> bool:
        """On a pooled lane's thread: True once lane 0 has reported, for this
        generation, that *alias* is outside a transaction; False if it reports
        otherwise, if a newer generation is reported, or after *timeout*."""
        with self._lock:
            if self._cond is None:
                self._cond = threading.Condition(self._lock)
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: self._latest[0] >= generation, timeout)
            finally:
                self._waiting -= 1
            posted, aliases = self._latest
            return posted == generation and aliases is not None and alias not in aliases


_NO_ALIASES: frozenset[str] = frozenset()


def _thread_connections(wrapper: BaseDatabaseWrapper) -> list[BaseDatabaseWrapper]:
    """The Django connections this thread has made, *wrapper* (its call's)
    among them. With one database that is *wrapper* alone, known without
    ``connections.all()``, which reads asgiref's ``Local`` twice per alias."""
    if len(connections.settings) == 1:
        return [wrapper]
    return list(connections.all(initialized_only=True))


class Job:
    """One ORM call on a lane; its state moves PENDING -> RUNNING -> DONE, or
    PENDING -> SKIPPED when its caller gave up before a thread picked it up.

    ``lock`` makes these exclusive, so exactly one side frees the lane (the
    caller when the job never ran or has finished, the thread when it ends a
    job its caller abandoned), and so a server-side cancel only ever reaches
    the query of this job: :meth:`guard` marks each query in flight under the
    lock, refuses new queries once the job is abandoned, and
    :meth:`cancel_in_flight` holds the lock while it cancels, so the
    connection cannot move on to another query meanwhile.
    """

    __slots__ = ("abandoned", "lock", "query_conn", "started", "state", "stopped")

    PENDING, RUNNING, DONE, SKIPPED = range(4)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = Job.PENDING
        self.abandoned = False
        # The set is closing on an error: send no new query (its caller still
        # waits, and frees the lane itself, unlike an abandoned job's).
        self.stopped = False
        # The psycopg connection running this job's query now, if any.
        self.query_conn: psycopg.Connection[Any] | None = None
        #: perf_counter() when its thread started it (0.0 until then).
        self.started = 0.0

    def guard(
        self,
        execute: Callable[..., Any],
        sql: Any,
        params: Any,
        many: bool,
        context: dict[str, Any],
    ) -> Any:
        """A Django execute wrapper around every query of the job."""
        with self.lock:
            if self.abandoned or self.stopped:
                raise OperationalError(
                    "asgi_dbset: query not sent: the caller of this ORM call was "
                    "cancelled, or its connection set closed on an error."
                )
            self.query_conn = context["connection"].connection
        try:
            return execute(sql, params, many, context)
        finally:
            with self.lock:
                self.query_conn = None

    def give_up(self) -> bool:
        """The caller was cancelled: True if the job is still running (its lane
        stays busy until it ends, and its thread frees it), False if the lane
        is free now (the job never started, or has ended)."""
        with self.lock:
            if self.state == Job.PENDING:
                self.state = Job.SKIPPED
                return False
            if self.state == Job.RUNNING:
                self.abandoned = True
                return True
            return False

    def stop(self) -> bool:
        """Refuse the job's next queries; True if it is running (then its
        current query, if any, is worth cancelling)."""
        with self.lock:
            if self.state != Job.RUNNING:
                return False
            self.stopped = True
            return True

    def cancel_in_flight(self, timeout: float = 5.0) -> bool:
        """Ask the server to cancel the job's running query; False if none runs."""
        with self.lock:
            conn = self.query_conn
            if conn is None or conn.closed:
                return False
            try:
                conn.cancel_safe(timeout=timeout)
            except Exception:  # the query may have ended or the connection died
                logger.debug("asgi_dbset: cancel failed", exc_info=True)
                return False
        stats.incr("cancels")
        return True


class Lane:
    """Common state; the owning :class:`~.dbset.ConnectionSet` mutates it on
    its event loop only."""

    __slots__ = (
        "_cancels",
        "_gate",
        "abandoned_done",
        "alias",
        "busy",
        "calls",
        "index",
        "job",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        #: The alias whose connection this lane holds; None for lane 0 (any alias).
        self.alias: str | None = None
        self.busy = False
        self.calls = 0
        self.job: Job | None = None
        # Set on the loop when an abandoned job of this lane has ended.
        self.abandoned_done: asyncio.Event | None = None
        # Open (None, or set) unless a server-side cancel for an abandoned job
        # of this lane may be in flight: the lane's thread starts no job while
        # it is closed, so a late cancel cannot hit the next job's query. Made
        # on the first cancel: most lanes never need one.
        self._gate: threading.Event | None = None
        self._cancels = 0

    @property
    def quarantined(self) -> bool:
        """True while a cancel is in flight: no call may be handed to the lane."""
        return self._cancels > 0

    def cancel_started(self) -> None:
        """On the loop: a cancel for an abandoned job of this lane is sent."""
        self._cancels += 1
        if self._gate is None:
            self._gate = threading.Event()  # made closed
        else:
            self._gate.clear()

    def cancel_ended(self) -> bool:
        """On the loop: that cancel has landed; True if none is left in flight."""
        self._cancels -= 1
        if self._cancels:
            return False
        assert self._gate is not None
        self._gate.set()
        return True

    def __repr__(self) -> str:
        state = "busy" if self.busy else "idle"
        return (
            f"<{type(self).__name__} {self.index} {self.alias or '*'} {state} "
            f"calls={self.calls}>"
        )

    def _executor(self, outer: object) -> Executor | None:
        """The executor of the lane's thread; None when asgiref must make it."""
        raise NotImplementedError

    def _before(
        self,
        wrapper: BaseDatabaseWrapper,
        timeout_ms: int | None,
        clearance: int | None,
    ) -> None:
        """Runs on the lane's thread before each call, with the thread's Django
        connection of the call's alias; ``clearance`` is the generation of lane
        0's report the call must wait for, if any."""

    def _after(self, wrapper: BaseDatabaseWrapper, timeout_ms: int | None) -> None:
        """Runs on the lane's thread after each call."""

    async def run(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        alias: str,
        on_abandoned_done: Callable[[Lane], None],
        timeout_ms: int | None = None,
        *,
        job: Job | None = None,
        clearance: int | None = None,
        outer: object = None,
    ) -> Any:
        """Run ``func(*args, **kwargs)`` on this lane's thread.

        Returns when the call has finished. If the caller is cancelled while
        the call runs, the call is marked abandoned and ``on_abandoned_done``
        is called on the loop once its thread is done with it. A *job* given
        by the caller is one queued behind the lane's current call (lane 0
        only): it is not the lane's ``job``. With a *clearance* (a pooled
        lane only), the thread first waits for lane 0's report of that
        generation, and raises :class:`NotClearedError` unless it clears the
        call's alias. *outer* is the caller's ``AsyncToSync.executors.current``
        (lane 0 runs on that thread when there is one).
        """
        loop = asyncio.get_running_loop()
        if job is None:
            job = self.job = Job()
        # The call runs in a private copy of the caller's context, never copied
        # back: code on a lane does not see the set (an async_to_sync inside it
        # runs its ORM calls on this very thread, as stock Django does), and
        # nothing set on the lane leaks into the caller, even on cancellation.
        context = contextvars.copy_context()
        context.run(current_set.set, None)

        def call() -> Any:
            gate = self._gate
            if gate is not None and not gate.is_set():
                gate.wait(_GATE_WAIT)
            with job.lock:
                if job.state == Job.SKIPPED:
                    return None
                job.state = Job.RUNNING
                job.started = time.perf_counter()
            wrapper = None
            try:
                # (Looked up once: each lookup is an asgiref Local's.)
                wrapper = connections[alias]
                self._before(wrapper, timeout_ms, clearance)
                # Django's execute_wrapper(), without its generator: every query
                # of the call passes job.guard, and only those queries.
                wrapper.execute_wrappers.append(job.guard)
                try:
                    return func(*args, **kwargs)
                finally:
                    wrapper.execute_wrappers.pop()
            finally:
                try:
                    if wrapper is not None:
                        self._after(wrapper, timeout_ms)
                finally:
                    with job.lock:
                        job.state = Job.DONE
                        abandoned = job.abandoned
                    if abandoned:
                        loop.call_soon_threadsafe(on_abandoned_done, self)

        return await hop(loop, self._executor(outer), context, call)


class RequestLane(Lane):
    """Lane 0: the request's own thread-sensitive thread and its connections."""

    __slots__ = ("_reported", "board", "generation")

    def __init__(self) -> None:
        super().__init__(0)
        #: Where pooled lanes' threads read the reports (see ReportBoard).
        self.board = ReportBoard()
        # Bumped by the set (on its loop) when an earlier report may be stale.
        self.generation = 0
        self._reported: tuple[int, frozenset[str]] | None = None

    def _executor(self, outer: object) -> Executor | None:
        return request_thread_executor(outer)

    def _before(
        self,
        wrapper: BaseDatabaseWrapper,
        timeout_ms: int | None,
        clearance: int | None,
    ) -> None:
        # The set may only use other connections while this one is outside a
        # transaction: tell it which aliases are inside one whenever it changes.
        # The generation is read first: a report that raced a newer one is dropped.
        generation = self.generation
        in_transaction = _NO_ALIASES
        for w in _thread_connections(wrapper):
            if w.in_atomic_block or (w.connection is not None and not w.autocommit):
                in_transaction = in_transaction | {w.alias}
        if (generation, in_transaction) != self._reported:
            self._reported = (generation, in_transaction)
            notify, waiting = self.board.post(generation, in_transaction)
            if notify is not None:
                notify(generation)
            if notify is not None or waiting:
                # Other lanes wait for this report: let them have the GIL now,
                # not after this thread has built its own query - theirs are
                # what the request waits for.
                time.sleep(0)
        if timeout_ms is not None:
            set_statement_timeout(wrapper, timeout_ms)

    def _after(self, wrapper: BaseDatabaseWrapper, timeout_ms: int | None) -> None:
        # The request's own connection outlives the set (Django returns it to
        # the pool itself): never leave the set's timeout on it. (Only a call
        # with a timeout sets one, and each such call resets it here.)
        if timeout_ms is not None:
            reset_statement_timeout(wrapper)


def _bounded_getconn(pool: Any) -> None:
    """Make ``pool.getconn()`` wait at most the lane's lease timeout when it is
    called from a lane thread; other threads keep the pool's own timeout.

    Django opens a pooled connection with ``pool.getconn()`` and no timeout,
    so this is the one place where a lane can bound its wait without copying
    Django's connect logic.
    """
    if getattr(pool.getconn, "_asgi_dbset_bounded", False):
        return
    original = pool.getconn

    def getconn(timeout: float | None = None) -> Any:
        if timeout is None:
            timeout = getattr(_thread, "lease_timeout", None)
        return original(timeout)

    getconn._asgi_dbset_bounded = True  # type: ignore[attr-defined]
    pool.getconn = getconn


class PooledLane(Lane):
    """A worker thread with a connection leased from ``alias``'s pool.

    The lease is queued on the worker the moment the lane is made
    (:meth:`start_lease`), and calls may be handed to the lane at once: the
    worker runs them after the lease, in order, so a call never waits for a
    round trip through the event loop between the lease and its query. A call
    queued behind a failed lease runs nothing and raises :class:`LeaseRefusedError`
    (the set queues it again for another lane).
    """

    __slots__ = ("_refused", "_wrappers", "board", "broken", "leased", "worker")

    def __init__(
        self, index: int, alias: str, worker: Worker, board: ReportBoard
    ) -> None:
        super().__init__(index)
        self.alias = alias
        self.worker = worker
        # Lane 0's reports, for calls handed to this lane with a clearance.
        self.board = board
        self.broken = False
        #: Set on the loop once the lease has succeeded.
        self.leased = False
        # Written by the lease and read by the calls after it, all on the
        # worker thread, in that order.
        self._refused: BaseException | None = None
        # The worker thread's Django connections, as its last job left them
        # (read by release_here() only while the worker has nothing to run).
        self._wrappers: list[BaseDatabaseWrapper] = []

    def __repr__(self) -> str:
        state = "busy" if self.busy else "idle"
        lease = "leased" if self.leased else "broken" if self.broken else "leasing"
        return (
            f"<PooledLane {self.index} {self.alias} {state} {lease} "
            f"calls={self.calls} on {self.worker.name}>"
        )

    def _executor(self, outer: object) -> Executor | None:
        return self.worker

    def _before(
        self,
        wrapper: BaseDatabaseWrapper,
        timeout_ms: int | None,
        clearance: int | None,
    ) -> None:
        if self._refused is not None:
            # Never let Django open the connection itself: it would wait the
            # pool's own timeout, not the lease's.
            raise LeaseRefusedError(str(self._refused))
        alias = wrapper.alias
        if clearance is not None and not self.board.wait_clear(
            clearance, alias, _CLEARANCE_WAIT
        ):
            raise NotClearedError(
                f"lane 0 did not report {alias!r} outside a transaction"
            )
        if timeout_ms is None:
            reset_statement_timeout(wrapper)
        else:
            set_statement_timeout(wrapper, timeout_ms)

    def _after(self, wrapper: BaseDatabaseWrapper, timeout_ms: int | None) -> None:
        self._wrappers = _thread_connections(wrapper)
        conn = wrapper.connection
        if conn is None or conn.closed or conn.broken:
            # Never hand a dead connection to another call: the set retires
            # this lane and returns (the pool discards) its connection.
            self.broken = True

    def release_here(self) -> bool:
        """Return the lane's connections to their pools from the calling
        thread, with no round trip to the worker, and give the worker back.

        Only for a lane whose worker has nothing queued or running (its lease
        and calls are over, as the set sees them), so no thread touches these
        connections meanwhile. Declines (False, nothing done) when returning
        one would take a query - a statement timeout to reset, a transaction
        for the pool to roll back - or when the connection is dead: then
        :meth:`close` does it on the worker.
        """
        for wrapper in self._wrappers:
            conn = wrapper.connection
            if conn is None:
                continue
            if getattr(wrapper, _TIMEOUT_ATTR, None) is not None:
                return False
            if conn.closed or conn.broken:
                return False
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                return False
        _return_all(self._wrappers, _put_back)
        self._wrappers = []
        workers.release(self.worker)
        return True

    def start_lease(self, lease_timeout: float) -> asyncio.Future[None]:
        """Queue the lease on the worker thread and return at once; the future
        fails if no connection was had within ``lease_timeout`` seconds."""
        alias = self.alias
        assert alias is not None

        def lease() -> None:
            wrapper = connections[alias]
            self._wrappers = [wrapper]
            _bounded_getconn(wrapper.pool)  # type: ignore[attr-defined]
            # Bound only this lease: a connection to another alias that a call
            # opens later on this thread waits as stock Django would.
            _thread.lease_timeout = lease_timeout
            try:
                wrapper.ensure_connection()
            except BaseException as exc:
                self._refused = exc
                raise
            finally:
                _thread.lease_timeout = None

        return asyncio.get_running_loop().run_in_executor(self.worker, lease)

    async def close(self) -> None:
        """Return every connection of the worker thread to its pool, after the
        calls already queued on it, and give the worker back."""
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.worker, release_thread_connections
            )
        finally:
            self._wrappers = []
            workers.release(self.worker)


_TIMEOUT_ATTR = "_asgi_dbset_statement_timeout"


def set_statement_timeout(wrapper: BaseDatabaseWrapper, timeout_ms: int) -> None:
    """Bound each query of *wrapper*'s connection to ``timeout_ms`` of server time."""
    wrapper.ensure_connection()
    conn = wrapper.connection
    if getattr(wrapper, _TIMEOUT_ATTR, None) == (conn, timeout_ms):
        return
    conn.execute(
        "SELECT set_config('statement_timeout', %s, false)", [f"{timeout_ms}ms"]
    )
    setattr(wrapper, _TIMEOUT_ATTR, (conn, timeout_ms))


def reset_statement_timeout(wrapper: BaseDatabaseWrapper) -> None:
    """Undo :func:`set_statement_timeout`, if it was applied to this connection."""
    applied = getattr(wrapper, _TIMEOUT_ATTR, None)
    if applied is None:
        return
    delattr(wrapper, _TIMEOUT_ATTR)
    conn = wrapper.connection
    if conn is None or conn is not applied[0] or conn.closed or conn.broken:
        return
    try:
        conn.execute("RESET statement_timeout")
    except psycopg.Error:
        # Only inside a failed transaction, whose rollback undoes the SET too.
        logger.debug("asgi_dbset: could not reset statement_timeout", exc_info=True)


def release_thread_connections() -> None:
    """Return the calling thread's Django connections to their pools.

    Runs on the thread that owns them. A connection left inside a transaction
    is rolled back by the pool; one that is broken is discarded by it. Every
    wrapper is left clean for the thread's next lane.
    """
    _return_all(connections.all(initialized_only=True), _return_connection)


def _return_all(
    wrappers: Sequence[BaseDatabaseWrapper],
    return_one: Callable[[BaseDatabaseWrapper], None],
) -> None:
    """Return each wrapper's connection; leave every wrapper clean, even if
    returning one of them fails."""
    for wrapper in wrappers:
        try:
            return_one(wrapper)
        except Exception:
            logger.warning(
                "asgi_dbset: error returning a connection of database %r",
                wrapper.alias,
                exc_info=True,
            )
        finally:
            _clear(wrapper)


def _put_back(wrapper: BaseDatabaseWrapper) -> None:
    # What Django's close() does for a pooled connection; its close() itself
    # refuses to run on an event loop's thread (async_unsafe).
    conn = wrapper.connection
    if conn is not None:
        conn._pool.putconn(conn)


def _clear(wrapper: BaseDatabaseWrapper) -> None:
    """Leave *wrapper* without a connection and clean for the thread's next lane."""
    wrapper.connection = None
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.run_on_commit = []


def _return_connection(wrapper: BaseDatabaseWrapper) -> None:
    conn = wrapper.connection
    if conn is None:
        return
    reset_statement_timeout(wrapper)
    if conn.broken or conn.closed:
        stats.incr("connections_discarded")
        logger.warning(
            "asgi_dbset: discarding a broken connection of database %r", wrapper.alias
        )
    elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        stats.incr("rollbacks")
        logger.warning(
            "asgi_dbset: a connection of database %r was returned inside a "
            "transaction; it is rolled back",
            wrapper.alias,
        )
    wrapper.close()
