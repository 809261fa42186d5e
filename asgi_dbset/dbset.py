"""A connection set: the lanes one request (or block) may run ORM calls on.

Data path of one call, all on the set's event loop::

    routing.sync_to_async(f)(...)   # a Django async ORM entry point
      -> ConnectionSet.call()       # stock Django when the set is inactive
        -> _acquire()               # an idle lane that may run it, else queue
           (_maybe_grow() adds a lane whose lease is queued on its thread)
        -> Lane.run()               # on the lane's thread and connection
        -> _free()                  # hand the lane to the first queued call

Rules the scheduler keeps:

- A lane runs one call at a time; queued calls are served first come, first
  served, each by the first lane that may run it.
- At most ``parallelism`` lanes, lane 0 included. Extra lanes are leased only
  from the budget and with a wait of at most ``lease_timeout``; a request never
  waits for another connection while holding one - its calls queue instead.
  No lease is tried while requests wait for the pool (their own connections
  come first), nor by any set for ``lease_timeout`` after one was refused.
- Extra lanes run a call only once lane 0 has reported that its connection
  for that alias is outside a transaction; inside one, every call of that
  alias runs on lane 0 and so sees the transaction's rows. Leases start before
  that report (so they overlap it) unless lane 0 has already been seen inside
  one. While lane 0 runs a call that is about to report, calls may already be
  handed to extra lanes: their threads wait for the report themselves (on
  lane 0's ReportBoard) and give the call back, unrun, if it does not clear
  them.
- A call may be handed to a lane whose lease is still under way: the lane's
  thread runs it after the lease; if the lease failed (or lane 0's report did
  not clear it), the call is queued again, first in line.
- Every chunk of one ``aiterator()`` runs on the lane that opened its cursor.
- A call that can only wait for a busy lane 0 (the set has no other lane and
  cannot lease one now, and nothing queues before it) is queued on lane 0's
  thread right away, behind the call running there, as stock Django queues
  it: the thread goes from one query to the next without a round trip
  through the loop while it holds the request's connection.
- A caller that gives up has its running query cancelled on the server; a
  set closing on an error stops all of its running calls the same way.
- Closing returns every extra lane's connection from its own thread after the
  calls already on it, shielded from cancellation.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import types
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping
from contextvars import Token
from dataclasses import dataclass
from typing import Any

from asgiref.sync import AsyncToSync
from django.db import OperationalError

from . import routing, stats
from .aio import finish_shielded
from .budget import budget, pool_is_contended
from .context import current_set
from .cursors import check_cursor, orphan
from .hop import run_as_stock
from .lanes import Job, Lane, NotClearedError, NotRunError, PooledLane, RequestLane
from .targets import Target, target_of
from .workers import workers

logger = logging.getLogger("asgi_dbset")

# The most calls a set keeps a record of (for introspection and timelines).
_MAX_RECORDS = 512

# A set's cursor pins before its first (most sets never have one).
_NO_CURSORS: Mapping[Any, Any] = types.MappingProxyType({})

# Seconds to wait for an abandoned query to end before cancelling it again.
_CANCEL_RETRY_WAITS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)


def validate_parallelism(value: object, *, what: str = "parallelism") -> int:
    """Return *value* if it is a usable parallelism, else raise with a fix."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{what} must be a whole number of connections such as 1, 2 or 4, "
            f"not {type(value).__name__} {value!r}."
        )
    if value < 1:
        raise ValueError(
            f"{what} must be at least 1 (1 runs the calls one at a time, as stock "
            f"Django does), not {value!r}."
        )
    return value


# PostgreSQL's statement_timeout is an int of milliseconds.
MAX_STATEMENT_TIMEOUT = 2_147_483.647
# A lease is a short, bounded wait: never longer than this.
MAX_LEASE_TIMEOUT = 60.0


def validate_statement_timeout(
    value: object, *, what: str = "statement_timeout"
) -> float | None:
    """Return *value* if it is None or a usable number of seconds, else raise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{what} must be a number of seconds such as 2.5, or None for the "
            f"server's own limit, not {type(value).__name__} {value!r}."
        )
    if not 0 < value <= MAX_STATEMENT_TIMEOUT:  # also refuses NaN
        raise ValueError(
            f"{what} must be more than 0 and at most {MAX_STATEMENT_TIMEOUT} seconds "
            f"(PostgreSQL's limit), or None for no limit; not {value!r}."
        )
    return float(value)


def validate_lease_timeout(value: object, *, what: str = "lease_timeout") -> float:
    """Return *value* if it is a usable lease wait in seconds, else raise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{what} must be a number of seconds such as 0.1, not "
            f"{type(value).__name__} {value!r}."
        )
    if not 0 <= value <= MAX_LEASE_TIMEOUT:  # also refuses NaN
        raise ValueError(
            f"{what} must be 0 or more seconds and at most {MAX_LEASE_TIMEOUT} "
            f"(an extra connection is only worth a short wait), not {value!r}."
        )
    return float(value)


@dataclass(slots=True)
class CallRecord:
    """One call a set ran: which lane, which alias, when (perf_counter seconds)."""

    lane: int
    alias: str
    name: str
    queued: float
    started: float
    ended: float = 0.0


@dataclass(slots=True)
class _Waiter:
    target: Target
    future: asyncio.Future[Lane | None]


class ConnectionSet:
    """The lanes of one request or block; see the module docstring.

    Create it with explicit arguments and use it with ``async with``, which
    makes it the active set of the current context; or use
    :func:`asgi_dbset.connection_set`, which reads the defaults from settings.
    """

    # Slots: a request's set is made and dropped once per request.
    __slots__ = (
        "__weakref__",
        "_background",
        "_behind_lane0",
        "_closed",
        "_cursors",
        "_in_transaction",
        "_lane0",
        "_lanes",
        "_loop",
        "_next_index",
        "_outer",
        "_parallelism",
        "_record_stock_calls",
        "_report_due",
        "_seen_transaction",
        "_statement_timeout",
        "_timeout_ms",
        "_token",
        "_waiters",
        "_warned_fallback",
        "calls",
        "closed_at",
        "lease_timeout",
        "opened_at",
        "passes_through",
        "peak_parallelism",
        "records",
        "wait_time",
    )

    def __init__(
        self,
        *,
        parallelism: int = 1,
        lease_timeout: float = 0.1,
        statement_timeout: float | None = None,
    ) -> None:
        # (The validators are called only for what is not plainly valid: the
        # middleware makes a set per request from settings checked at startup.)
        if type(parallelism) is not int or parallelism < 1:
            validate_parallelism(parallelism)
        if statement_timeout is not None:
            statement_timeout = validate_statement_timeout(statement_timeout)
        if not (
            type(lease_timeout) is float and 0 <= lease_timeout <= MAX_LEASE_TIMEOUT
        ):
            lease_timeout = validate_lease_timeout(lease_timeout)
        self._parallelism = parallelism
        #: The highest parallelism the set had (a block form may lower it again).
        self.peak_parallelism = parallelism
        self._record_stock_calls = False
        self._statement_timeout = statement_timeout
        # What lanes set as the statement timeout of each call (milliseconds).
        self._timeout_ms = _milliseconds(statement_timeout)
        #: True when calls made now would run as plain stock Django, with no
        #: record kept: the router then hands them to asgiref untouched. Kept
        #: by _update_routing() whenever what it depends on changes (here its
        #: rule for a set that records nothing and has no cursor).
        self.passes_through = parallelism == 1 and statement_timeout is None
        self.lease_timeout = lease_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._token: Token[ConnectionSet | None] | None = None
        self._closed = False
        self._lane0 = RequestLane()
        self._lanes: list[Lane] = [self._lane0]
        self._waiters: deque[_Waiter] = deque()
        # Aliases whose lane-0 connection is inside a transaction; None until
        # lane 0 has reported (no extra lane is used before that).
        self._in_transaction: frozenset[str] | None = None
        # Lane 0 was seen inside a transaction: no more leases before a report.
        self._seen_transaction = False
        # The generation of lane 0's report its current call will make.
        self._report_due = -1
        self._outer: object = None
        # The lane each open aiterator() cursor runs on; made on the first pin.
        self._cursors: Mapping[Any, Lane] = _NO_CURSORS
        self._background: set[asyncio.Future[Any]] = set()
        # Jobs queued on lane 0's thread behind its current call.
        self._behind_lane0: set[Job] = set()
        self._next_index = 1
        self.records: list[CallRecord] = []
        self.calls = 0
        self.wait_time = 0.0
        self.opened_at = 0.0
        self.closed_at = 0.0
        self._warned_fallback = False

    # -- introspection -------------------------------------------------------

    def __repr__(self) -> str:
        busy = sum(lane.busy for lane in self._lanes)
        leasing = sum(
            isinstance(lane, PooledLane) and not lane.leased and not lane.broken
            for lane in self._lanes
        )
        state = "closed" if self._closed else "open" if self._loop else "new"
        return (
            f"<ConnectionSet {state} parallelism={self._parallelism} | "
            f"lanes: {busy} busy, {len(self._lanes) - busy} idle, "
            f"{leasing} leasing | "
            f"calls: {len(self._waiters)} queued, {self.calls} run>"
        )

    @property
    def parallelism(self) -> int:
        return self._parallelism

    @parallelism.setter
    def parallelism(self, value: int) -> None:
        self._parallelism = validate_parallelism(value)
        self.peak_parallelism = max(self.peak_parallelism, value)
        self._update_routing()
        if self._waiters and self._loop is not None and not self._closed:
            self._dispatch()  # a higher parallelism may lease for them now

    @property
    def lanes(self) -> tuple[Lane, ...]:
        """The lanes open now, lane 0 first."""
        return tuple(self._lanes)

    @property
    def statement_timeout(self) -> float | None:
        """Seconds of server time each query may take; None: the server's limit."""
        return self._statement_timeout

    @statement_timeout.setter
    def statement_timeout(self, value: float | None) -> None:
        self._statement_timeout = validate_statement_timeout(value)
        self._timeout_ms = _milliseconds(self._statement_timeout)
        self._update_routing()

    @property
    def record_stock_calls(self) -> bool:
        """Record calls that run as stock Django too (for figures and timelines;
        the middleware turns it on with SERVER_TIMING or HISTORY)."""
        return self._record_stock_calls

    @record_stock_calls.setter
    def record_stock_calls(self, value: bool) -> None:
        self._record_stock_calls = value
        self._update_routing()

    @property
    def closed(self) -> bool:
        return self._closed

    def serves_here(self) -> bool:
        """True if calls made here would run on this set: it is open and
        bound to the running event loop."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return not self._closed and loop is self._loop

    @property
    def lanes_used(self) -> int:
        """How many lanes ran at least one call."""
        return len({record.lane for record in self.records})

    def figures(self) -> dict[str, Any]:
        """What the set did, in milliseconds: its wall time against the sum of
        its calls' times (their ratio is the parallel gain), and the time calls
        spent queued for a lane."""
        end = self.closed_at or time.perf_counter()
        wall = (end - self.opened_at) * 1000 if self.opened_at else 0.0
        query = sum(max(r.ended - r.started, 0.0) for r in self.records) * 1000
        per_lane = Counter(r.lane for r in self.records)
        return {
            "parallelism": self.peak_parallelism,
            "lanes_used": len(per_lane),
            "calls": self.calls,
            "calls_per_lane": dict(sorted(per_lane.items())),
            "wait_ms": round(self.wait_time * 1000, 3),
            "query_ms": round(query, 3),
            "wall_ms": round(wall, 3),
            "gain": round(query / wall, 3) if wall else 0.0,
        }

    # -- life cycle ----------------------------------------------------------

    async def __aenter__(self) -> ConnectionSet:
        self.open()
        self._token = current_set.set(self)
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        if exc_type is not None:
            # The owner failed or was cancelled (a request cancelled at server
            # shutdown): nobody needs the calls still running; stop them on
            # the server rather than wait for them.
            self._stop_running()
        try:
            if not self._close_if_idle():
                await self.aclose()
        finally:
            if self._token is not None:
                current_set.reset(self._token)
                self._token = None

    def open(self) -> None:
        """Bind the set to the running loop. Leases nothing: lanes come on demand."""
        if self._loop is not None:
            raise RuntimeError(
                "This ConnectionSet was already opened; create a new one."
            )
        # A script may use sets without the app or the middleware installed.
        routing.ensure_installed()
        self._loop = asyncio.get_running_loop()
        self.opened_at = time.perf_counter()
        stats.incr("sets_opened")  # (sets_open is opened - closed)

    def _holds_lanes(self) -> bool:
        """True while closing has something to give back or wait for."""
        return (
            len(self._lanes) > 1
            or bool(self._waiters)
            or bool(self._background)
            or self._has_cursors()
        )

    def _close_if_idle(self) -> bool:
        """Close at once, with no task, when there is nothing to give back (the
        common request); True if it did."""
        if self._closed or self._loop is None or self._holds_lanes():
            return False
        self._closed = True
        self.closed_at = time.perf_counter()
        stats.incr("sets_closed")
        return True

    async def aclose(self) -> None:
        """Return every extra lane; safe to call twice; shielded from cancellation.

        Calls still queued fall back to stock Django. Calls running on a lane
        finish first (abandoned ones were already cancelled on the server).
        """
        if self._close_if_idle():
            return
        if self._closed or self._loop is None:
            self._closed = True
            return
        self._closed = True
        try:
            await finish_shielded(self._release_all())
            logger.debug("asgi_dbset: closed %r", self)
        finally:
            self.closed_at = time.perf_counter()
            stats.incr("sets_closed")

    async def _release_all(self) -> None:
        # Cursors go with their lanes: mark them before any waiting chunk of
        # theirs wakes up, so it fails loudly instead of running elsewhere.
        for gen, pinned in list(self._cursors.items()):
            if isinstance(pinned, PooledLane):
                orphan(gen)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)
        # Wait on tasks that are not done. A done task leaves the set through
        # its done-callback, which only runs when the loop gets control, and
        # gather() of done tasks completes without yielding (Python 3.12): a
        # loop on "while self._background" could spin forever.
        while pending := [task for task in self._background if not task.done()]:
            await asyncio.wait(pending)
        extra = [lane for lane in self._lanes if isinstance(lane, PooledLane)]
        self._lanes = [self._lane0]
        rest = [lane for lane in extra if not self._give_back(lane)]
        results = await asyncio.gather(
            *(self._retire(lane, close_cursors=True) for lane in rest),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("asgi_dbset: error releasing a lane", exc_info=result)

    def release_idle_lanes(self) -> None:
        """Return every extra lane that is idle now; the set stays open, with
        lane 0, and leases again if more calls queue. The middleware calls it
        when the response is complete, so the connections are back in their
        pools before the client has the response (and can ask again)."""
        if self._closed:
            return
        for lane in list(self._lanes):
            if isinstance(lane, PooledLane) and self._give_back(lane):
                self._lanes.remove(lane)

    def _give_back(self, lane: PooledLane) -> bool:
        """Return an idle lane's connections right here, on the loop; False
        when it is busy or its worker must do it (see PooledLane.release_here)."""
        idle = not (lane.busy or lane.quarantined) and (lane.leased or lane.broken)
        if not idle or self._cursors_on(lane) or not lane.release_here():
            return False
        lane.busy = True  # never again
        _returned(lane)
        return True

    async def _retire(self, lane: PooledLane, *, close_cursors: bool = False) -> None:
        try:
            if close_cursors:
                cursors = self._cursors_on(lane)
                if cursors:
                    await asyncio.get_running_loop().run_in_executor(
                        lane.worker, _close_generators, cursors
                    )
            await lane.close()
        finally:
            _returned(lane)

    def _cursors_on(self, lane: Lane) -> list[types.GeneratorType[Any, None, None]]:
        return [gen for gen, pinned in list(self._cursors.items()) if pinned is lane]

    # -- the call path -------------------------------------------------------

    def _update_routing(self) -> None:
        # (A cursor whose generator is gone leaves its pin only when collected:
        # until the next update the set may route calls it could pass on.)
        self.passes_through = not (self._record_stock_calls or self._routes())

    def _routes(self) -> bool:
        """True when calls go to lanes: more than one lane, a statement timeout
        to set, or a cursor pinned to a lane."""
        return (
            self._parallelism > 1
            or self._statement_timeout is not None
            or self._has_cursors()
        )

    def _has_cursors(self) -> bool:
        # The identity test spares the common set WeakKeyDictionary.__len__
        # (Python code).
        return self._cursors is not _NO_CURSORS and bool(self._cursors)

    def _pin(self, cursor: types.GeneratorType[Any, None, None], lane: Lane) -> None:
        """Every later chunk of *cursor* runs on *lane*."""
        if not isinstance(self._cursors, weakref.WeakKeyDictionary):
            self._cursors = weakref.WeakKeyDictionary()
        self._cursors[cursor] = lane
        self.passes_through = False

    def _unpin(self, cursor: types.GeneratorType[Any, None, None]) -> None:
        if isinstance(self._cursors, weakref.WeakKeyDictionary):
            self._cursors.pop(cursor, None)
            self._update_routing()

    async def call(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Run one ORM call on a lane of this set, or as stock Django when the
        set cannot take it (closed, another loop, parallelism 1, unknown call).
        The router skips this when :meth:`passes_through` says so."""
        target = None
        if self._routes():
            if self._closed or asyncio.get_running_loop() is not self._loop:
                self._fall_back("the set has ended or belongs to another event loop")
            else:
                target = target_of(func, args, kwargs)
        if target is None:
            if self._record_stock_calls and not self._closed:
                return await self._run_stock_recorded(func, args, kwargs)
            return await run_as_stock(func, *args, **kwargs)

        outer = self._check_outer_thread()
        if self._in_transaction is None:
            self._read_report()
        cursor = target.cursor
        if (
            cursor is not None
            and cursor not in self._cursors
            and inspect.getgeneratorstate(cursor) != inspect.GEN_CREATED
        ):
            # Opened before this set routed it, so as stock Django runs it: on
            # the request's own thread and connection.
            self._pin(cursor, self._lane0)
        if self._best_queued_on_lane0(target):
            return await self._run_behind_lane0(target, func, args, kwargs, outer)
        queued = time.perf_counter()
        first = False
        while True:
            lane = await self._acquire(target, first=first)
            if lane is None:
                if cursor is not None:
                    check_cursor(cursor)
                self._fall_back("the set ended while the call waited for a lane")
                return await run_as_stock(func, *args, **kwargs)
            try:
                return await self._run(lane, target, func, args, kwargs, queued, outer)
            except NotRunError as exc:
                # The lane never had a connection, or lane 0's report kept the
                # call off it; it did not run: queue it again, ahead of the
                # calls that came after it.
                if self._closed:
                    # Its request is over (a task that outlived it): running
                    # it as stock Django now would open a connection on a
                    # thread nobody returns it from.
                    raise OperationalError(
                        "asgi_dbset: this ORM call did not run: it could not "
                        "have an extra connection and its connection set (its "
                        f"request) has ended ({exc}). Await every query inside "
                        "the request."
                    ) from exc
                first = True

    async def _run(
        self,
        lane: Lane,
        target: Target,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        queued: float,
        outer: object,
    ) -> Any:
        cursor = target.cursor
        generation = self._lane0.generation
        clearance = None
        if lane is self._lane0:
            self._report_due = generation  # its call reports first thing
        elif cursor is None or cursor not in self._cursors:
            if self._in_transaction is None and self._report_on_its_way():
                clearance = generation  # its thread waits for that report
            elif self._in_transaction is None or target.alias in self._in_transaction:
                # Handed out on credit, but the report that came since (or a
                # change of the sync caller above) keeps the call on lane 0.
                self._free(lane)
                raise NotClearedError("lane 0 may be inside a transaction")
        record = self._record(lane.index, target.alias, func, queued)
        lane.calls += 1
        stats.incr("calls")
        # The cursor this call opens, pinned to its lane from here on.
        pinned_here = cursor if cursor not in self._cursors else None
        if pinned_here is not None:
            self._pin(pinned_here, lane)
        elif cursor is not None or target.alias in (self._in_transaction or ()):
            stats.incr("pinned_calls")
        try:
            result = await lane.run(
                func,
                args,
                kwargs,
                target.alias,
                self._abandoned_done,
                self._timeout_ms,
                clearance=clearance,
                outer=outer,
            )
        except NotRunError:
            if pinned_here is not None and self._cursors.get(pinned_here) is lane:
                self._unpin(pinned_here)  # its cursor was never opened
            self._unrecord(record, lane)
            self._free(lane)
            raise
        except asyncio.CancelledError:
            job = lane.job
            assert job is not None
            if job.give_up():
                self._abandon(lane)
            else:
                if lane is self._lane0 and job.state == Job.SKIPPED:
                    self._lane0.board.withdraw(generation)  # it will not report
                self._free(lane)
            raise
        except BaseException:
            self._free(lane)
            raise
        finally:
            record.ended = time.perf_counter()
        self._free(lane)
        return result

    async def _run_behind_lane0(
        self,
        target: Target,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outer: object,
    ) -> Any:
        lane = self._lane0
        self._report_due = generation = lane.generation
        record = self._record(0, target.alias, func, time.perf_counter())
        lane.calls += 1
        stats.incr("calls")
        stats.incr("lane0_queued_calls")
        job = Job()
        # Made only if the caller abandons the running job: the thread calls
        # back (through the loop) only after that, once the job has ended.
        ended: asyncio.Event | None = None

        def abandoned_done(_lane: Lane) -> None:
            if ended is not None:
                ended.set()

        self._behind_lane0.add(job)
        try:
            return await lane.run(
                func,
                args,
                kwargs,
                target.alias,
                abandoned_done,
                self._timeout_ms,
                job=job,
                outer=outer,
            )
        except asyncio.CancelledError:
            if job.give_up():
                ended = asyncio.Event()
                self._cancel_abandoned(lane, job, ended)
            elif job.state == Job.SKIPPED:
                lane.board.withdraw(generation)  # it will not report
            raise
        finally:
            self._behind_lane0.discard(job)
            record.ended = time.perf_counter()
            if job.started > record.started:
                # It queued on the thread, not in the set: count that as waiting.
                self.wait_time += job.started - record.started
                record.started = job.started

    async def _run_stock_recorded(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        # Stock Django, timed for figures and timelines: lane 0, no scheduling.
        target = target_of(func, args, kwargs)
        alias = target.alias if target is not None else ""
        record = self._record(0, alias, func, time.perf_counter())
        try:
            return await run_as_stock(func, *args, **kwargs)
        finally:
            record.ended = time.perf_counter()

    def _record(
        self, lane: int, alias: str, func: Callable[..., Any], queued: float
    ) -> CallRecord:
        """Count a call that starts now; keep its record (up to _MAX_RECORDS)."""
        started = time.perf_counter()
        record = CallRecord(
            lane, alias, getattr(func, "__name__", "?"), queued, started
        )
        self.calls += 1
        self.wait_time += started - queued
        if len(self.records) < _MAX_RECORDS:
            self.records.append(record)
        return record

    def _unrecord(self, record: CallRecord, lane: Lane) -> None:
        """Forget a call that did not run after all (its lane's lease failed)."""
        self.calls -= 1
        lane.calls -= 1
        stats.incr("calls", -1)
        if record in self.records:
            self.records.remove(record)

    def _fall_back(self, why: str) -> None:
        stats.incr("fallbacks")
        if not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                "asgi_dbset: an ORM call ran as stock Django because %s "
                "(a task that outlived its request?)",
                why,
            )

    async def _acquire(self, target: Target, *, first: bool = False) -> Lane | None:
        # Every change of lane state ends in _dispatch(), so an idle lane that
        # this call may use is one no queued call may use: taking it is fair.
        lane = self._idle_lane_for(target)
        if lane is not None:
            lane.busy = True
            return lane
        assert self._loop is not None
        waiter = _Waiter(target, self._loop.create_future())
        if first:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        stats.incr("waits")
        if self._read_report(want=True):
            self._dispatch()
        elif self._maybe_grow():
            self._hand_out()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                lane = waiter.future.result()
                if lane is not None:
                    self._free(lane)  # handed a lane just as the caller gave up
            elif waiter in self._waiters:
                # (_dispatch or aclose may have dropped it already.)
                self._waiters.remove(waiter)
            raise

    def _best_queued_on_lane0(self, target: Target) -> bool:
        """True when the call can only wait for lane 0: it is busy, the set has
        no other lane and cannot lease one now, and no call queues before it."""
        if not self._lane0.busy or len(self._lanes) > 1 or self._waiters:
            return False
        cursor = target.cursor
        if cursor is not None and self._cursors.get(cursor, self._lane0) is not (
            self._lane0
        ):
            return False
        return not self._could_lease(target.alias)

    def _could_lease(self, alias: str) -> bool:
        """True if a lane for *alias* may be leased now, as far as this set,
        the budget and the pool can tell without trying."""
        if len(self._lanes) >= self._parallelism:
            return False
        if alias in (self._in_transaction or ()):
            return False  # its calls stay on lane 0
        if self._in_transaction is None and self._seen_transaction:
            return False  # likely inside one again: wait for lane 0's report
        # The budget is 0 for an alias without a pool (calls stay serial, as
        # the checks said). Requests waiting for their own connections (or a
        # lease just refused): an extra lane would queue ahead of them.
        return (
            budget.may_acquire(alias)
            and time.monotonic() >= budget.retry_at(alias)
            and not pool_is_contended(alias)
        )

    def _may_run(self, lane: Lane, target: Target) -> bool:
        if lane.busy or lane.quarantined:
            return False
        if target.cursor is not None:
            pinned = self._cursors.get(target.cursor)
            if pinned is not None:
                return pinned is lane
        if lane is self._lane0:
            return True
        if lane.alias != target.alias:
            return False
        if self._in_transaction is None:
            return self._report_on_its_way()
        return target.alias not in self._in_transaction

    def _report_on_its_way(self) -> bool:
        """True when lane 0 runs a call that reports for the current generation
        before it starts (so calls may be handed to extra lanes on credit: their
        threads wait for that report), and lane 0 was never seen inside a
        transaction (then it likely is again: calls wait on the loop)."""
        lane0 = self._lane0
        return (
            lane0.busy
            and self._report_due == lane0.generation
            and not self._seen_transaction
        )

    def _idle_lane_for(self, target: Target) -> Lane | None:
        for lane in self._lanes:
            if self._may_run(lane, target):
                return lane
        return None

    def _free(self, lane: Lane) -> None:
        """The lane's call is over: retire it if broken, else serve the queue."""
        lane.busy = False
        lane.job = None
        if isinstance(lane, PooledLane) and lane.broken and lane in self._lanes:
            self._lanes.remove(lane)
            lane.busy = True  # never again
            for gen in self._cursors_on(lane):
                orphan(gen)
                self._unpin(gen)
            self._spawn(self._retire(lane))
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand idle lanes to queued calls; lease more for the calls left."""
        self._read_report()
        self._hand_out()
        if self._maybe_grow():
            self._hand_out()

    def _hand_out(self) -> None:
        for waiter in list(self._waiters):
            if waiter.future.done():
                self._waiters.remove(waiter)
                continue
            lane = self._idle_lane_for(waiter.target)
            if lane is not None:
                lane.busy = True
                self._waiters.remove(waiter)
                waiter.future.set_result(lane)

    # -- abandoned calls -----------------------------------------------------

    def _abandon(self, lane: Lane) -> None:
        """A caller was cancelled while its call runs: cancel it on the server,
        and keep the lane out of use until both the cancel and the call end."""
        lane.abandoned_done = asyncio.Event()
        assert lane.job is not None
        self._cancel_abandoned(lane, lane.job, lane.abandoned_done)

    def _cancel_abandoned(self, lane: Lane, job: Job, ended: asyncio.Event) -> None:
        # No call is handed to the lane, and jobs already queued on its thread
        # (behind lane 0's call) wait, until the cancel has landed.
        lane.cancel_started()
        self._spawn(self._cancel(lane, job, _send_cancel(job), ended))

    async def _cancel(
        self, lane: Lane, job: Job, first: asyncio.Future[bool], ended: asyncio.Event
    ) -> None:
        # A cancel that reaches the server just before the query does is
        # ignored by it; an abandoned job starts no other query (Job.guard),
        # so sending again while that same query is in flight is safe.
        try:
            await _cancel_until_ended(job, first, ended)
        finally:
            if lane.cancel_ended() and not lane.busy:
                self._dispatch()

    def _stop_running(self) -> None:
        running = [lane.job for lane in self._lanes if lane.busy]
        for job in [*running, *self._behind_lane0]:
            if job is not None and job.stop():
                self._spawn(_cancel_until_ended(job, _send_cancel(job)))

    def _abandoned_done(self, lane: Lane) -> None:
        # Called on the loop by the lane's thread when an abandoned call ends.
        if lane.abandoned_done is not None:
            lane.abandoned_done.set()
            lane.abandoned_done = None
        self._free(lane)

    # -- growing -------------------------------------------------------------

    def _check_outer_thread(self) -> object:
        """Forget lane 0's transaction report when the sync caller above us
        changes: under ``async_to_sync``, lane 0 is that caller's thread, which
        may have entered a transaction since it last reported. Returns that
        caller's executor (``AsyncToSync.executors.current``), if any."""
        outer = getattr(AsyncToSync.executors, "current", None)
        if outer is not self._outer:
            self._outer = outer
            self._lane0.generation += 1
            self._in_transaction = None
            # Calls queued already wait for the new report too.
            if self._waiters and self._read_report(want=True):
                self._dispatch()
        return outer

    def _read_report(self, *, want: bool = False) -> bool:
        """Take lane 0's report for the current generation off its board, if it
        has come; True if it was taken just now. With *want* (calls wait for
        it), lane 0's thread wakes the loop when it posts a report not yet there
        (see _transactions_reported)."""
        if self._in_transaction is not None:
            return False
        board, generation = self._lane0.board, self._lane0.generation
        aliases = (
            board.want(generation, self._report_posted)
            if want
            else board.report_for(generation)
        )
        if aliases is None:
            return False
        self._in_transaction = aliases
        self._seen_transaction = self._seen_transaction or bool(aliases)
        return True

    def _report_posted(self, generation: int) -> None:
        """Runs on lane 0's thread when it posts a report the loop asked for."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._transactions_reported, generation)

    def _transactions_reported(self, generation: int) -> None:
        # The wake-up calls waited for. A call made meanwhile may have read the
        # report off the board already: the waiting calls are served all the same.
        if generation != self._lane0.generation or self._closed:
            return  # stale: the caller changed since, and a fresh report follows
        self._dispatch()  # (which reads the report off the board)

    def _maybe_grow(self) -> bool:
        """Add lanes for queued calls, within parallelism and budget; True if
        any was added. Each new lane's lease is queued on its thread at once."""
        if self._closed or not self._waiters:
            return False
        demand: Counter[str] = Counter()
        for waiter in self._waiters:
            cursor = waiter.target.cursor
            if cursor is None or cursor not in self._cursors:  # pinned: no new lane
                demand[waiter.target.alias] += 1
        for lane in self._lanes:
            # Idle lanes (leasing, or waiting for lane 0's report) serve first.
            if isinstance(lane, PooledLane) and not lane.busy and not lane.broken:
                demand[lane.alias or ""] -= 1
        added = False
        for alias, wanted in demand.items():
            if wanted <= 0 or not self._could_lease(alias):
                continue
            while wanted > 0 and len(self._lanes) < self._parallelism:
                if not budget.try_acquire(alias):
                    break
                self._add_lane(alias)
                wanted -= 1
                added = True
        return added

    def _add_lane(self, alias: str) -> None:
        # Budget taken by the caller; _retire gives it and the worker back.
        try:
            worker = workers.acquire()
        except BaseException:
            budget.release(alias)
            raise
        lane = PooledLane(self._next_index, alias, worker, self._lane0.board)
        self._next_index += 1
        self._lanes.append(lane)
        stats.incr("lanes_open")
        lease = lane.start_lease(self.lease_timeout)
        lease.add_done_callback(lambda future: self._lease_done(lane, future))

    def _lease_done(self, lane: PooledLane, lease: asyncio.Future[None]) -> None:
        exc = BaseException("cancelled") if lease.cancelled() else lease.exception()
        if exc is None:
            lane.leased = True
            stats.incr("lanes_leased")
            logger.debug("asgi_dbset: leased lane %d on %r", lane.index, lane.alias)
            return
        lane.broken = True
        # Every set of the process backs off as long as the lease waited: a
        # busy pool is not polled by each request in turn.
        budget.back_off(lane.alias or "", max(self.lease_timeout, 0.01))
        stats.incr("lease_failures")
        logger.debug("asgi_dbset: no extra lane for %r: %s", lane.alias, exc)
        if not lane.busy and lane in self._lanes:
            # (A busy lane is retired by _free when its call comes back refused;
            # a closed set has retired it already.)
            self._free(lane)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "asgi_dbset: a background task of %r failed",
                self,
                exc_info=task.exception(),
            )


def _milliseconds(timeout: float | None) -> int | None:
    """A statement timeout as PostgreSQL takes it (0 would mean none)."""
    return None if timeout is None else max(1, round(timeout * 1000))


def _returned(lane: PooledLane) -> None:
    """Count a lane whose connections went back out of the budget."""
    budget.release(lane.alias or "")
    stats.incr("lanes_open", -1)


def _send_cancel(job: Job) -> asyncio.Future[bool]:
    # Starts the cancel on a thread now, not at a task's first step: at server
    # shutdown the loop may stop before a new task ever runs, but it waits for
    # the default executor's threads.
    return asyncio.get_running_loop().run_in_executor(None, job.cancel_in_flight)


async def _cancel_until_ended(
    job: Job, first: asyncio.Future[bool], ended: asyncio.Event | None = None
) -> None:
    """Await the first cancel, then cancel again while the same query is still in
    flight (bounded): a cancel that reaches the server before the query does is
    ignored by it, and a stopped or abandoned job starts no other query
    (Job.guard), so another cancel can only hit that query. ``ended`` is set
    when the job ends, if the caller has such an event; else its state is read."""
    sent = await first
    for wait in _CANCEL_RETRY_WAITS:
        if not sent:
            return
        if ended is not None:
            try:
                await asyncio.wait_for(ended.wait(), wait)
                return
            except TimeoutError:
                pass
        else:
            await asyncio.sleep(wait)
            if job.state == Job.DONE:
                return
        sent = await _send_cancel(job)


def _close_generators(gens: list[types.GeneratorType[Any, None, None]]) -> None:
    # Runs on the lane's thread: closing the generator closes its cursor.
    for gen in gens:
        try:
            gen.close()
        except Exception:
            logger.debug("asgi_dbset: error closing an iterator", exc_info=True)
