"""A connection set: the lanes one request (or block) may run ORM calls on.

One call, from Django's async ORM to a lane and back (all on the set's loop)::

    routing.sync_to_async(f)(...)    # a Django async ORM entry point
      -> ConnectionSet.call()        # as stock Django when the set need not route it
        -> Scheduler.run()           # queue, and the one decision: scheduler.plan()
          -> Lane.run()              # on the lane's thread and connection
        <- Scheduler._finish()       # decide again: the next call takes the lane

This module keeps the set's life cycle (open, the calls it routes, close) and
its public face (parallelism, statement timeout, figures, repr). Who owns
which rule:

- :mod:`.scheduler` - which call runs where, how many lanes (one decision);
- :mod:`.transactions` - lane 0's transactions, which decide where a call may run;
- :mod:`.lanes` - running a call on a lane's thread, leasing and returning;
- :mod:`.cancellation` - cancelling the queries of calls nobody waits for;
- :mod:`.records` - what the set ran, and its figures;
- :mod:`.budget` - how many extra lanes all sets of the process may hold.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import Token
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, router, transaction

from . import routing, stats
from .aio import finish_shielded
from .budget import budget
from .context import blocks_around, current_block, current_set
from .cursors import check_cursor
from .errors import CallNotRunError, SnapshotError
from .hop import run_as_stock, sync_thread_above, thread_sensitive_context
from .lanes import Lane, in_transaction, thread_wrappers, with_statement_timeout
from .records import CallRecord, Recorder
from .scheduler import Scheduler
from .snapshots import Snapshot
from .targets import Target, pinned, routed_target, seen_from_blocks, target_of
from .transactions import EVERY_ALIAS
from .validation import (
    MAX_LEASE_TIMEOUT,
    milliseconds,
    validate_lease_timeout,
    validate_parallelism,
    validate_statement_timeout,
)

logger = logging.getLogger("asgi_dbset")

__all__ = ["CallRecord", "ConnectionSet"]

# Marks "no call made yet" for the sync caller above (None is a caller: none).
_NO_CALLER = object()

_OUTLIVED = (
    "asgi_dbset: this call did not run: it was made inside an asgi_dbset.atomic() "
    "block that outlived its connection set (its request), and the block's "
    "transaction was rolled back when the set closed. Await (or cancel) the "
    "tasks that use a block before the view returns."
)


_INSIDE_A_BLOCK = (
    "asgi_dbset: a connection set opened inside an asgi_dbset.atomic() block "
    "of another set would run the ORM calls made in it on connections of its "
    "own, outside the block's transaction (stock Django runs them inside). "
    "Inside the block, write `async with db_parallelism(n):`, which changes "
    "the set in use, rather than open a connection_set() of its own; or open "
    "the set outside the block."
)

_INSIDE_A_SNAPSHOT = (
    "asgi_dbset: a connection set opened inside the consistent snapshot of "
    "another set (db_parallelism(..., snapshot=True) or "
    "connection_set(snapshot=True)) would not read that snapshot: its calls on "
    "lanes of its own would read the database live, and those on the "
    "request's connection, which the snapshot holds, would raise SnapshotError "
    "- which of the two, timing would decide. Inside the snapshot, write "
    "`async with db_parallelism(n):`, which changes the set in use (every call "
    "of it reads the snapshot), rather than open a connection_set() of its "
    "own; or open the set after the snapshot has ended."
)


def _lane0_key() -> object:
    """What decides lane 0's thread for calls made here, in the order
    hop.request_thread_executor reads it: the sync thread above, else the
    thread-sensitive context (None: asgiref's thread of the loop). Sets opened
    with the same key share that thread and its connections."""
    outer = sync_thread_above()
    return outer or thread_sensitive_context()


class BlockSettings:
    """What a block form (``db_parallelism``) open in a set restores at its
    exit: the parallelism and statement timeout it found at its entry."""

    __slots__ = ("parallelism", "statement_timeout")

    def __init__(self, parallelism: int, statement_timeout: float | None) -> None:
        self.parallelism = parallelism
        self.statement_timeout = statement_timeout


class ConnectionSet:
    """The lanes of one request or block; see the module docstring.

    Create it with explicit arguments and use it with ``async with``, which
    makes it the active set of the current context; or use
    :func:`asgi_dbset.connection_set`, which reads the defaults from settings.
    """

    # Slots: a request's set is made and dropped once per request.
    __slots__ = (
        "__weakref__",
        "_closed",
        "_lane0_key",
        "_loop",
        "_outer",
        "_reading",
        "_record_stock_calls",
        "_scheduler",
        "_snapshot_holders",
        "_statement_timeout",
        "_token",
        "_warned_fallback",
        "closed_at",
        "open_blocks",
        "opened_at",
        "outer_connections",
        "passes_through",
        "peak_parallelism",
        "recorder",
    )

    def __init__(
        self,
        *,
        parallelism: int = 1,
        lease_timeout: float = 0.1,
        statement_timeout: float | None = None,
        snapshot: bool = False,
        transaction_pooled: frozenset[str] = frozenset(),
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
        #: What the set's calls did (records, counts, waits).
        self.recorder = Recorder()
        self._scheduler = Scheduler(
            parallelism=parallelism,
            lease_timeout=lease_timeout,
            timeout_ms=None
            if statement_timeout is None
            else milliseconds(statement_timeout),
            recorder=self.recorder,
        )
        #: The highest parallelism the set had (a block form may lower it again).
        self.peak_parallelism = parallelism
        self._record_stock_calls = False
        self._statement_timeout = statement_timeout
        #: True when calls made now would run as plain stock Django, with no
        #: record kept: the router then hands them to asgiref untouched. Kept
        #: by _update_routing() whenever what it depends on changes (here its
        #: rule for a set that records nothing and has no cursor).
        self.passes_through = (
            parallelism == 1 and statement_timeout is None and not snapshot
        )
        if snapshot is not False:
            if snapshot is not True:
                raise TypeError(
                    f"snapshot must be True or False, not {type(snapshot).__name__} "
                    f"{snapshot!r}."
                )
            self._scheduler.snapshot = Snapshot()
        #: Who holds the snapshot (see begin_snapshot): a set made with one
        #: holds it for its whole life.
        self._snapshot_holders = int(snapshot)
        #: The block forms open in the set, in the order they were entered
        #: (kept by asgi_dbset.api.db_parallelism).
        self.open_blocks: list[BlockSettings] = []
        if transaction_pooled:
            self._scheduler.transaction_pooled = frozenset(transaction_pooled)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lane0_key: object = None
        self._token: Token[ConnectionSet | None] | None = None
        self._closed = False
        self._outer: object = _NO_CALLER
        #: Under ``async_to_sync``: by sync caller's executor, that thread's
        #: Django connections by alias, which the routers see when asked for
        #: the calls it awaits (:func:`.targets.seen_from_blocks`). Emptied
        #: when the set closes (it holds another thread's connections).
        self.outer_connections: dict[object, dict[str, Any]] = {}
        # The hops reading them, by executor, while they run.
        self._reading: dict[object, asyncio.Future[None]] = {}
        self.opened_at = 0.0
        self.closed_at = 0.0
        self._warned_fallback = False

    # -- introspection -------------------------------------------------------

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._loop else "new"
        return (
            f"<ConnectionSet {state} parallelism={self.parallelism} | "
            f"{self._scheduler!r}, {self.recorder.calls} run>"
        )

    @property
    def parallelism(self) -> int:
        return self._scheduler.parallelism

    @parallelism.setter
    def parallelism(self, value: int) -> None:
        validate_parallelism(value)
        self.peak_parallelism = max(self.peak_parallelism, value)
        self._scheduler.set_parallelism(value)
        self._update_routing()

    @property
    def lease_timeout(self) -> float:
        return self._scheduler.lease_timeout

    @property
    def lanes(self) -> tuple[Lane, ...]:
        """The lanes open now, lane 0 first."""
        return self._scheduler.lanes

    @property
    def statement_timeout(self) -> float | None:
        """Seconds of server time each query may take; None: the server's limit."""
        return self._statement_timeout

    @statement_timeout.setter
    def statement_timeout(self, value: float | None) -> None:
        self._statement_timeout = validate_statement_timeout(value)
        self._scheduler.timeout_ms = milliseconds(self._statement_timeout)
        self._update_routing()

    @property
    def snapshot(self) -> bool:
        """True while every call of the set reads one consistent snapshot of
        its database (see :mod:`.snapshots`)."""
        return self._scheduler.snapshot is not None

    def begin_snapshot(self) -> None:
        """Hold the snapshot: from now on every call reads one snapshot per
        database, taken by the first call of each (a snapshot already on is
        shared). It lasts until every holder has called :meth:`end_snapshot`
        (a set made with ``snapshot=True`` holds it until it closes)."""
        self._snapshot_holders += 1
        if self._scheduler.snapshot is None:
            self._scheduler.snapshot = Snapshot()
            self._update_routing()

    async def end_snapshot(self) -> None:
        """Let go of the snapshot held by :meth:`begin_snapshot`; the last
        holder's call ends it: its transactions end on every lane, even if
        the caller is cancelled meanwhile."""
        self._snapshot_holders = max(self._snapshot_holders - 1, 0)
        # A holder still in it (a concurrent block or view of the set, or the
        # set itself) reads on in the same snapshot.
        if self._snapshot_holders or self._scheduler.snapshot is None:
            return
        outer = sync_thread_above()
        try:
            await finish_shielded(self._scheduler.end_snapshot(outer))
        finally:
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
    def routes_calls(self) -> bool:
        """True when the set sends calls to lanes (more than one lane, a
        statement timeout, a snapshot, a transaction block or an open cursor);
        False when it runs them as stock Django, recorded or not."""
        return self._routes()

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
    def records(self) -> list[CallRecord]:
        """The calls the set ran (the first 512), in the order they were handed out."""
        return self.recorder.records

    @property
    def calls(self) -> int:
        return self.recorder.calls

    @property
    def wait_time(self) -> float:
        """Seconds the set's calls spent queued for a lane, in all."""
        return self.recorder.wait_time

    @property
    def lanes_used(self) -> int:
        """How many lanes ran at least one call."""
        return self.recorder.lanes_used()

    def figures(self) -> dict[str, Any]:
        """What the set did, in milliseconds: its wall time against the sum of
        its calls' times (their ratio is the parallel gain), and the time calls
        spent queued for a lane."""
        return self.recorder.figures(
            parallelism=self.peak_parallelism,
            opened_at=self.opened_at,
            closed_at=self.closed_at,
        )

    # -- life cycle ----------------------------------------------------------

    async def __aenter__(self) -> ConnectionSet:
        # (No hop here: the sync caller's thread may be busy with a call that
        # waits for this coroutine - stock's opening waits for nothing. The
        # first call that asks the routers reads its connections, where stock
        # queues that call on the same thread.)
        self.open()
        self._token = current_set.set(self)
        return self

    async def _ask_routers(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Target | None:
        """The call's target, with routers configured: asked on the loop's
        thread, seeing the transactions stock Django's routers would see there
        (the sync caller's, the blocks')."""
        if sync_thread_above() is not None:
            await self._show_caller()
        return routed_target(self, func, args, kwargs)

    async def _show_caller(self) -> None:
        """Under ``async_to_sync`` with routers: lane 0 is the sync caller's
        thread (a TestCase, a sync view's async helper), whose transaction
        stock Django's routers see when they are asked there. The set asks
        them on the loop's thread, so it shows them that thread's connections:
        read with one hop per sync caller, by the first call that asks the
        routers for it (a TestCase's; a sync view's ``async_to_sync`` helper
        using a set opened on the loop, the middleware's). Calls gathered
        meanwhile wait for that hop, and make none of their own."""
        outer = sync_thread_above()
        if outer is None or outer in self.outer_connections:
            return
        reading = self._reading.get(outer)
        if reading is not None:
            await asyncio.wait((reading,))  # (its caller's cancellation: not ours)
            if outer not in self.outer_connections:
                await self._show_caller()  # (that read was cancelled)
            return
        reading = self._reading[outer] = asyncio.get_running_loop().create_future()
        try:
            self.outer_connections[outer] = await run_as_stock(_thread_connections)
        finally:
            del self._reading[outer]
            reading.set_result(None)

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        if isinstance(exc_type, type) and not issubclass(exc_type, Exception):
            # The owner was cancelled (a request cancelled at server shutdown,
            # a timeout in front of the app): its gathers cancelled their
            # children, so nobody needs the calls still running; stop them on
            # the server rather than wait for them. Not when it raised: a
            # sibling of the call that raised in a plain asyncio.gather is not
            # cancelled, and on stock Django goes on with its next statements
            # (its writes land) - so its running call ends normally here too.
            self._scheduler.stop_running()
        elif exc_type is not None and await self._asked_lane0_in_transaction():
            # The owner raised, leaving the request's thread inside a
            # transaction that code the set does not see opened (sync code
            # that turned autocommit off, locked rows and raised): a call
            # still running on an extra lane may wait for its row locks, which
            # go only when the request's thread returns its connection - after
            # this close, which would wait for that call for ever. On stock
            # that call runs on the request's thread, inside the transaction,
            # which the request's end rolls back: stopped instead.
            self._scheduler.stop_running()
        await self._close_and_unbind()

    async def _close_and_unbind(self) -> None:
        """Close the set, and make it no longer the context's active set."""
        try:
            if not self._close_at_once():
                await self.aclose()
        finally:
            if self._token is not None:
                current_set.reset(self._token)
                self._token = None

    async def _asked_lane0_in_transaction(self) -> bool:
        """:meth:`_lane0_in_transaction`. Cancelled while asking, it stops the
        calls still running (as on a cancellation), closes the set, and
        raises the cancellation."""
        try:
            return await self._lane0_in_transaction()
        except BaseException:
            self._scheduler.stop_running()
            await self._close_and_unbind()
            raise

    async def _lane0_in_transaction(self) -> bool:
        """True when calls run on extra lanes and lane 0's thread, asked now,
        is inside a transaction of any alias."""
        scheduler = self._scheduler
        if self._loop is None or self._closed or not scheduler.running_on_extra_lanes():
            return False
        ran, inside = await scheduler.run(
            Target(DEFAULT_DB_ALIAS),
            _in_transaction_here,
            (),
            {},
            sync_thread_above(),
            pin=scheduler.lane0,
            untimed=True,
            unrecorded=True,  # (no call of the program's: in no figure)
        )
        return bool(ran and inside)

    def open(self) -> None:
        """Bind the set to the running loop. Leases nothing: lanes come on demand."""
        if self._loop is not None:
            raise RuntimeError(
                "This ConnectionSet was already opened; create a new one."
            )
        # A script may use sets without the app or the middleware installed.
        routing.ensure_installed()
        loop = asyncio.get_running_loop()
        key = _lane0_key()

        def shares_request_thread(other: ConnectionSet) -> bool:
            # (A set of a new request - its own thread - is apart.)
            return other._loop is loop and other._lane0_key == key

        for block in blocks_around(current_block.get()):
            # A block's transaction is on its set's lane; this set would run
            # the calls made inside it on lanes of its own, outside it (where
            # stock Django runs them inside): refused.
            if shares_request_thread(block.dbset):
                raise transaction.TransactionManagementError(_INSIDE_A_BLOCK)
        around = current_set.get()
        # The set in use here holds a snapshot that this set's calls would not
        # read (some on lanes of its own, live; those on the shared lane 0,
        # refused by Lane.run): refused at once. A snapshot ended (its block
        # left, its set closed: scheduler.snapshot is None) is apart.
        if (
            around is not None
            and around._scheduler.snapshot is not None
            and not around._closed
            and shares_request_thread(around)
        ):
            raise SnapshotError(_INSIDE_A_SNAPSHOT)
        self._loop = loop
        self._lane0_key = key
        self._scheduler.bind(self._loop)
        self.opened_at = time.perf_counter()
        stats.incr("sets_opened")  # (sets_open is opened - closed)

    def _close_at_once(self) -> bool:
        """Close with no task when there is nothing to give back (the common
        request); True if it did."""
        # (Another thread's connections: not kept past the set's life. No
        # call asks the routers on the loop once the set is closing.)
        self.outer_connections = {}
        if (
            self._closed
            or self._loop is None
            or self._scheduler.snapshot is not None
            or not self._scheduler.close_at_once()
        ):
            return False
        self._closed = True
        self.closed_at = time.perf_counter()
        stats.incr("sets_closed")
        if stats.closed_observer is not None:
            stats.closed_observer(self)
        return True

    async def aclose(self) -> None:
        """Return every extra lane; safe to call twice; shielded from cancellation.

        Calls still queued fall back to stock Django, except a transaction
        block's, which raise :class:`CallNotRunError`. Calls running on a lane
        finish first (abandoned ones were already cancelled on the server); a
        block still holding its lane is then rolled back on it.
        """
        if self._close_at_once():
            return
        if self._closed or self._loop is None:
            self._closed = True
            return
        self._closed = True
        try:
            await finish_shielded(self._close_lanes())
            logger.debug("asgi_dbset: closed %r", self)
        finally:
            self.closed_at = time.perf_counter()
            stats.incr("sets_closed")
            if stats.closed_observer is not None:
                stats.closed_observer(self)

    async def _close_lanes(self) -> None:
        if self._scheduler.snapshot is not None:
            # Its transactions end on their lanes before any connection goes
            # back (lane 0's too, which the set does not return).
            outer = sync_thread_above()
            await self._scheduler.end_snapshot(outer)
        await self._scheduler.close()

    def return_idle_lanes(self) -> None:
        """Return every extra lane that is idle now, and each of the others as
        soon as it is idle with no call queued; the set stays open, with
        lane 0, and leases again if more calls queue. The middleware calls it
        when the response is complete, so the connections are back in their
        pools before the client has the response (and can ask again)."""
        self._scheduler.return_idle_lanes()

    # -- the call path -------------------------------------------------------

    def _update_routing(self) -> None:
        # (A cursor whose generator is gone leaves its pin only when collected:
        # until the next update the set may route calls it could pass on.)
        self.passes_through = not (self._record_stock_calls or self._routes())

    def _routes(self) -> bool:
        """True when calls go to lanes: more than one lane, a statement timeout
        to set, a cursor pinned to a lane, a transaction block holding a lane
        of its own, or a snapshot."""
        return (
            self._scheduler.parallelism > 1
            or self._statement_timeout is not None
            or self._scheduler.has_cursors()
            or self._scheduler.blocks > 0
            or self._scheduler.snapshot is not None
        )

    def _steps_aside(self) -> bool:
        """True when an ORM call runs exactly as stock Django runs it, with
        none of the set's bookkeeping: no set of the process could lease a
        lane (the requests in flight need every pooled connection:
        ``budget.saturated()``), only the parallelism makes the set route
        calls, and it holds nothing a call could have to queue behind or
        report to - no lane but lane 0, no call queued or handed out, no
        transaction block. Under saturation the set would run the call on
        lane 0 anyway; stepping aside is what keeps a decorated view's cost
        per request at stock's there. (A caller that gives up still has its
        query cancelled on the server: :meth:`Scheduler.run_aside`.)"""
        scheduler = self._scheduler
        return (
            scheduler.only_lane0_idle()
            and self._statement_timeout is None
            and scheduler.snapshot is None
            and not scheduler.blocks
            and not scheduler.has_cursors()
            and current_block.get() is None
            and budget.saturated()
        )

    def _behind_own_caller(self, outer: object) -> bool:
        """True when a call comes from sync code under an ``async_to_sync``
        (*outer*) other than the caller of the calls lane 0 still has: an
        async signal receiver of a save in ``sync_to_async`` code, say.

        Lane 0's thread for this call is *outer*'s, blocked in async_to_sync
        until the call returns; lane 0's jobs went to another caller's thread,
        which may be that very thread, queued behind the code that waits for
        this call. Waiting for them, or for their reports, could then wait
        forever. Stock Django runs the call on its caller's own thread at once
        (inside the transaction that thread holds): so does the set."""
        return (
            outer is not None
            and outer is not self._outer
            and self._scheduler.lane0.jobs > 0
        )

    async def call(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        where: Target | None = None,
    ) -> Any:
        """Run one ORM call on a lane of this set, or as stock Django when the
        set cannot take it (closed, another loop, parallelism 1, unknown call)
        or steps aside (a saturated process: :meth:`_steps_aside`).
        The router skips this when :attr:`passes_through` says so. *where*:
        the call's target when the caller knows it (``sync_to_lane``), else it
        is read off the ORM call."""
        target = None
        if self._closed and self._block_here():
            # Run as stock Django, it would commit on its own, outside the
            # block: a block never ends half committed.
            raise CallNotRunError(_OUTLIVED)
        if self._routes():
            if self._closed or asyncio.get_running_loop() is not self._loop:
                self._fall_back("the set has ended or belongs to another event loop")
            elif where is None and self._steps_aside():
                stats.incr("saturated_calls")
                return await self._run_aside(func, args, kwargs)
            elif where is not None:
                target = where
            elif not router.routers:
                # (No routers: one attribute read; nothing to pin.)
                target = target_of(func, args, kwargs)
            else:
                target = await self._ask_routers(func, args, kwargs)
                if target is not None:
                    # Django asks the routers no second time, on the lane.
                    func, kwargs = pinned(func, kwargs, target)
        if target is None:
            if self._record_stock_calls and not self._closed:
                return await self._run_stock_recorded(func, args, kwargs)
            return await run_as_stock(func, *args, **kwargs)

        pin, target = self._block_lane(target)
        if pin is None and target.lane0:
            # Its databases are known only as it runs: outside a block, the
            # request's own connections of each, as on stock Django.
            pin = self._scheduler.lane0
        outer = sync_thread_above()
        # A sync caller blocked until this call returns never waits for lane
        # 0's calls of another caller (a call that must run on an extra lane
        # waits for none of them).
        behind = self._behind_own_caller(outer)
        if behind and self._scheduler.on_lane0(pin, target.cursor):
            return await self._run_aside(func, args, kwargs, timed_for=target)
        # Under async_to_sync, lane 0 is the sync caller's thread: a new caller
        # is another thread, whose transactions lane 0 has not reported.
        if outer is not self._outer:
            if self._outer is not _NO_CALLER:
                self._scheduler.lane0_changed()
            self._outer = outer
        cursor = target.cursor
        if cursor is not None:
            self._scheduler.pin_opened_cursor(cursor)
            self.passes_through = False
        ran, result = await self._scheduler.run(
            target, func, args, kwargs, outer, pin=pin
        )
        if ran:
            return result
        if pin is not None:
            raise CallNotRunError(_OUTLIVED)  # (its block's; see above)
        if cursor is not None:
            check_cursor(cursor)
        self._fall_back("the set ended while the call waited for a lane")
        return await run_as_stock(func, *args, **kwargs)

    def _block_lane(self, target: Target) -> tuple[Lane | None, Target]:
        """Inside a transaction block of this set and the call's alias: the
        block's lane (a call for any alias: the lane of the set's blocks, and
        the target of the connection that lane holds)."""
        block = current_block.get()
        if block is None:
            return None, target
        if target.scope == EVERY_ALIAS:
            try:
                pin = block.lane_for_any_alias(self, orm_call=target.lane0)
            except transaction.TransactionManagementError:
                # Blocks of several databases on different lanes: a prefetch
                # whose routers name one of them now runs inside its block, as
                # on stock Django. (Asked again on that lane's thread, an
                # answer naming another block's database is refused there.)
                # Asked on the loop's thread too: the routers see the blocks'
                # transactions there, as everywhere the set asks them.
                routed = None
                if target.routed is not None:
                    with seen_from_blocks(self):
                        routed = target.routed()
                pin = block.lane_for(self, routed) if routed is not None else None
                if routed is None or pin is None:
                    raise
                return pin, Target(routed, scope=EVERY_ALIAS)
            if pin is not None and pin.alias not in (None, target.alias):
                # The call runs with the connection that lane holds.
                target = Target(pin.alias, scope=EVERY_ALIAS)
            return pin, target
        pin = block.lane_for(self, target.alias)
        if target.also is None:
            return pin, target
        # A call that writes a second database (a many-to-many create whose
        # links live elsewhere) is inside the block of either one, as on stock
        # Django - which it can be only while they hold the same lane.
        also = block.lane_for(self, target.also)
        if also is None or also is pin:
            return pin, target
        if pin is not None:
            raise transaction.TransactionManagementError(
                f"asgi_dbset: this call writes databases {target.alias!r} and "
                f"{target.also!r}, whose asgi_dbset.atomic() blocks run on "
                "different connections: one call cannot run inside both. Make "
                "the call outside the inner block, or write each database in "
                "its own call."
            )
        return also, Target(target.also)

    # -- transaction blocks (asgi_dbset.atomic) ------------------------------

    async def open_block(
        self, alias: str, func: Callable[..., Any], args: tuple[Any, ...]
    ) -> tuple[Lane, Any]:
        """Run *func* (a block's BEGIN) on the lane a new transaction block of
        *alias* will hold, and return that lane and its result: lane 0 when
        the set runs calls as stock Django (or this caller as stock:
        :meth:`_behind_own_caller`), when a sync caller waits above (under
        ``async_to_sync``), or lane 0 is inside a transaction (of any alias);
        else an extra lane of the block's own, if one can be had."""
        scheduler = self._scheduler
        outer = sync_thread_above()
        if not self._routes() or self._behind_own_caller(outer):
            result = await run_as_stock(func, *args)
            scheduler.lane0_blocks += 1  # (until close_block)
            return scheduler.lane0, result
        if outer is not self._outer:
            if self._outer is not _NO_CALLER:
                scheduler.lane0_changed()
            self._outer = outer
        on_lane0 = by_last_report = False
        if outer is not None:
            # A sync caller above (async code under async_to_sync): asgiref
            # runs thread-sensitive sync code in the block (sync_to_async) on
            # that caller's thread - lane 0 - before it asks any context, so
            # the block is there too, and that code inside its transaction,
            # as on stock Django's one thread.
            on_lane0 = True
        elif self._in_block_on_extra_lane():
            # Lane 0's thread is never asked from inside a block on an extra
            # lane: it may run sync code (sync_to_async beside the block) that
            # waits for the block's row locks, and the block would wait behind
            # it for ever - nor waited for: a call of the set handed to it
            # meanwhile has not reported yet. What the set knows decides: lane
            # 0's last report, and the set's own blocks on lane 0, which that
            # may not show yet (a report is of a call's start, before its BEGIN).
            on_lane0 = (
                scheduler.lane0_blocks > 0
                or not scheduler.lane0.reports.likely_clear(alias)
            )
            by_last_report = not on_lane0
        else:
            # Lane 0 reports first (for a call that reads nothing): whether its
            # thread is inside a transaction - code the set does not see may
            # have opened one - decides where the block may run.
            await scheduler.run(
                Target(alias), _nothing, (), {}, outer, pin=scheduler.lane0
            )
        lane, result = await scheduler.open_block(
            alias, func, args, outer, on_lane0=on_lane0, by_last_report=by_last_report
        )
        if lane is scheduler.lane0:
            scheduler.lane0_blocks += 1  # (until close_block)
        self._update_routing()
        return lane, result

    def _in_block_on_extra_lane(self) -> bool:
        """True inside a transaction block of this set that holds an extra
        lane (of any alias)."""
        lane0 = self._scheduler.lane0
        return any(
            block.dbset is self and block.lane is not lane0
            for block in blocks_around(current_block.get())
        )

    async def run_on_lane(
        self,
        lane: Lane,
        alias: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        *,
        untimed: bool = False,
    ) -> Any:
        """Run *func* on *lane* (a transaction block's), after the calls
        already handed to it (without the statement timeout, *untimed*);
        :class:`CallNotRunError` once the set has closed (the block outlived
        it, and was rolled back)."""
        outer = sync_thread_above()
        if lane is self._scheduler.lane0 and (
            not self._routes() or self._behind_own_caller(outer)
        ):
            return await run_as_stock(func, *args)
        if self._closed:
            # The set returned the block's lane (rolled back), or stopped
            # running lane 0's calls: nothing reaches the block's transaction.
            raise CallNotRunError(_OUTLIVED)
        ran, result = await self._scheduler.run(
            Target(alias), func, args, {}, outer, pin=lane, untimed=untimed
        )
        if not ran:
            raise CallNotRunError(_OUTLIVED)
        return result

    def _block_here(self) -> bool:
        """True inside a transaction block of this set (of any alias)."""
        return any(block.dbset is self for block in blocks_around(current_block.get()))

    def cancel_abandoned(self, lane: Lane, alias: str) -> None:
        """A block of *alias* on *lane* is left on an exception: cancel the
        queries run there for callers that gave up."""
        self._scheduler.cancel_abandoned(lane, alias)

    def close_block(self, lane: Lane) -> None:
        """A block that held *lane* has ended."""
        if lane is self._scheduler.lane0:
            self._scheduler.lane0_blocks -= 1
        self._scheduler.close_block(lane)
        self._update_routing()

    async def _run_stock_recorded(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        run: Callable[..., Awaitable[Any]] = run_as_stock,
    ) -> Any:
        # Stock Django, timed for figures and timelines: lane 0, no scheduling.
        # The query's time starts when the request's thread starts the call,
        # not when it was made (it may queue behind the calls before it).
        target = (
            await self._ask_routers(func, args, kwargs)
            if router.routers
            else target_of(func, args, kwargs)
        )
        alias = target.alias if target is not None else ""
        record = self.recorder.begin(0, alias, func, time.perf_counter())
        if target is not None:
            # The routers were asked for the record's alias: Django asks them
            # no second time, as stock Django asks them once per call.
            func, kwargs = pinned(func, kwargs, target)
        started = ended = 0.0

        def timed() -> Any:
            nonlocal started, ended
            started = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                ended = time.perf_counter()

        timed.__name__ = getattr(func, "__name__", "?")
        try:
            return await run(timed)
        finally:
            self.recorder.end(record, started, ended)

    async def _run_aside(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timed_for: Target | None = None,
    ) -> Any:
        # As stock Django, on the caller's thread (recorded if the set records
        # stock calls); its query is still cancelled if its caller gives up.
        # With *timed_for* (the call's target), under the set's statement
        # timeout too, as on a lane (a set that steps aside has none).
        run: Callable[..., Awaitable[Any]] = self._scheduler.run_aside
        timeout_ms = self._scheduler.timeout_ms
        if timed_for is not None and timeout_ms is not None:
            alias = timed_for.alias
            # (As Lane.run: behind a pooler, a call of any alias runs untimed.)
            local = alias in self._scheduler.transaction_pooled
            if not (local and timed_for.scope is not None):
                run = functools.partial(
                    _run_timed, self._scheduler.run_aside, alias, timeout_ms, local
                )
        if self._record_stock_calls:
            return await self._run_stock_recorded(func, args, kwargs, run=run)
        return await run(func, *args, **kwargs)

    def _fall_back(self, why: str) -> None:
        stats.incr("fallbacks")
        if not self._warned_fallback:
            self._warned_fallback = True
            logger.warning(
                "asgi_dbset: an ORM call ran as stock Django because %s "
                "(a task that outlived its request?)",
                why,
            )


async def _run_timed(
    run: Callable[..., Awaitable[Any]],
    alias: str,
    timeout_ms: int,
    local: bool,
    func: Callable[..., Any],
    /,
    *args: Any,
    **kwargs: Any,
) -> Any:
    return await run(
        with_statement_timeout(func, alias, timeout_ms, local), *args, **kwargs
    )


def _in_transaction_here() -> bool:
    """On lane 0's thread: is any of its connections inside a transaction?"""
    return bool(in_transaction(thread_wrappers(DEFAULT_DB_ALIAS)[1]))


def _nothing() -> None:
    """A call that runs no query: lane 0 reports its transactions before it."""


def _thread_connections() -> dict[str, Any]:
    """This thread's Django connection of every alias (none is opened)."""
    return {wrapper.alias: wrapper for wrapper in connections.all()}
