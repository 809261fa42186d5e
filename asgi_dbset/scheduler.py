"""The scheduler of a connection set: which call runs on which lane, and how
many lanes the set holds.

All of it is one decision, :func:`plan`, taken over the set's plain state
after every change of that state - a call is made, a call ends, a lease
succeeds or fails, lane 0 reports, the parallelism changes - and applied by
:meth:`Scheduler._assign`, which also does the I/O the plan asks for (leases,
returns), outside any lock. No caller has to remember which part of the
decision to run.

Rules the plan keeps:

- **First come, first served.** Calls are considered in the order they were
  made (a call whose lease was refused keeps its place); each goes to the
  first lane that may run it. A call that cannot run yet never keeps a later
  call off a lane the later call may use.
- **Lane 0 runs anything.** When it is idle, the first call takes it.
- **Extra lanes follow lane 0's transactions.** A call goes to an idle extra
  lane of its alias only while lane 0 runs a call, and only as lane 0's report
  of that call allows (see :mod:`.transactions`): while lane 0 is inside a
  transaction (of any alias), the call waits for lane 0, and so sees the
  transaction's rows.
- **An aiterator() stays on its lane.** Every chunk runs on the lane that
  opened its cursor.
- **Behind lane 0.** A call that can only wait for a busy lane 0 (the set has
  no other lane and cannot lease one, and nothing queues before it) is queued
  on lane 0's thread right away, behind the call running there, as stock
  Django queues it: the thread goes from one query to the next without a
  round trip through the loop while it holds the request's connection.
- **At most ``parallelism`` lanes.** The set leases extra lanes only for calls
  left waiting, within the budget, never while requests wait for the pool,
  and never while lane 0 was last seen inside a transaction. When the parallelism
  is lowered, lanes beyond it take no new call and are returned as soon as
  they are idle.
- **No hold and wait.** A lease waits for the pool at most ``lease_timeout``,
  on its lane's own thread; the set's calls keep running meanwhile.
- **No idle leases.** A lease started while lane 0 runs a call first waits,
  on its lane's thread, for that call's report (which the calls it is leased
  for wait for anyway): while lane 0's thread is busy with code the set does
  not see, no connection sits out of the pool for them. And the budget lends
  only what the process's open sets leave over (see :mod:`.budget`).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import inspect
import itertools
import logging
import threading
import time
import types
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from django.db import DEFAULT_DB_ALIAS

from . import stats
from .budget import budget, pool_is_contended
from .cancellation import Job, cancel_until_ended, send_cancel
from .cursors import orphan
from .errors import CallNotRunError
from .hop import run_as_stock
from .lanes import (
    Lane,
    NotRunError,
    PooledLane,
    RequestLane,
    guarded,
    leave_thread_snapshots,
)
from .records import Recorder, Unrecorded
from .snapshots import Snapshot
from .targets import Target
from .transactions import CLEAR, CREDIT, REPORT
from .workers import workers

logger = logging.getLogger("asgi_dbset")

if TYPE_CHECKING:
    GeneratorT: TypeAlias = types.GeneratorType[Any, None, None]

# Lane 0's passed turns and waiting calls before the first (most sets never
# have one): replaced, never changed.
_NO_GENERATIONS: set[int] = set()
_NO_TURNS: dict[int, asyncio.Future[None]] = {}

# The sets holding extra lanes now, per alias of a lane, told (on their
# loops) when a request finds that alias's pool empty: see on_pool_pressure.
_holders: dict[str, weakref.WeakSet[Scheduler]] = {}
_holders_lock = threading.Lock()  # (request threads read them; loops change them)

# A set's cursor pins before its first (most sets never have one).
_NO_CURSORS: Mapping[Any, Lane] = types.MappingProxyType({})


#: (See Call.unrecorded.)
_UNRECORDED = Unrecorded()


@dataclass(slots=True, eq=False)
class Call:
    """One ORM call, from the moment it is made until a lane takes it."""

    seq: int
    target: Target
    queued: float
    #: The lane it is handed to; None while it waits.
    lane: Lane | None = None
    #: For lane 0: the generation of the report it posts (see .transactions).
    generation: int = -1
    #: For an extra lane on credit: the generation of lane 0's report its
    #: lane's thread waits for before running it.
    clearance: int | None = None
    #: The set closed while it waited: it runs as stock Django.
    dropped: bool = False
    #: The lane it must run on (its transaction block's), if any.
    pin: Lane | None = None
    #: A transaction block's first call: its lane is the block's from now on.
    reserve: bool = False
    #: A block's first call that must not wait for lane 0's next report: it
    #: goes by the last one (lane 0 was last seen outside a transaction).
    by_last_report: bool = False
    #: Its pinned lane died before it ran: it fails.
    lost: bool = False
    #: Runs without the set's statement timeout (sync code of a block's).
    untimed: bool = False
    #: The set's own question, no ORM call of the program's: in no record,
    #: figure or counter (see ConnectionSet._lane0_in_transaction).
    unrecorded: bool = False
    #: Made only when the call has to wait (most calls are handed out at once).
    future: asyncio.Future[None] | None = None


class Plan:
    """What :func:`plan` decided; applied in this order."""

    __slots__ = ("hand_outs", "leases", "returns", "want_report")

    def __init__(self) -> None:
        #: Lanes to return: broken ones, and those beyond the parallelism.
        self.returns: list[Lane] = []
        #: (call, lane, how): how is CLEAR, CREDIT, "lane0", "behind", "pinned"
        #: (to its cursor's or its transaction block's lane), "reserve" (a
        #: transaction block's own lane from now on) or "lost" (its pinned
        #: lane is broken: the call fails, see Scheduler._hand).
        self.hand_outs: list[tuple[Call, Lane, str]] = []
        #: Calls wait for lane 0's report on the loop: ask to be told.
        self.want_report = False
        #: One alias per extra lane to lease.
        self.leases: list[str] = []


def plan(
    queue: Sequence[Call],
    lanes: Sequence[Lane],
    *,
    parallelism: int,
    verdict: Callable[[str], str],
    likely_clear: Callable[[str], bool],
    pinned_to: Callable[[Call], Lane | None],
    may_lease: Callable[[str], bool],
    pinning: Callable[[Lane], bool],
) -> Plan:
    """The scheduler's one decision, over plain state; see the module docstring.

    *queue* holds the waiting calls in the order they were made; *lanes* the
    set's lanes, lane 0 first. *verdict* and *likely_clear* read lane 0's
    reports (:class:`~.transactions.TransactionReports`); *pinned_to* is the
    lane a call's cursor is open on, if any; *may_lease* says whether the
    budget and the pool would allow an extra lane of an alias now; *pinning*
    whether a lane holds an open cursor.
    """
    decided = Plan()
    lane0 = lanes[0]
    extra = lanes[1:]

    # Lanes that take no new call: broken ones, and those beyond parallelism
    # (highest index first, idle ones first; a lane holding an open cursor
    # stays for it).
    closed: set[Lane] = set()
    if extra:
        closed.update(lane for lane in extra if lane.broken)
        excess = len(lanes) - len(closed) - parallelism
        if excess > 0:
            # (A lane holding an open cursor takes no other call, but stays
            # for its cursor's chunks.)
            candidates = [
                lane
                for lane in reversed(extra)
                if not lane.broken and not lane.reserved
            ]
            candidates.sort(
                key=lambda lane: (pinning(lane), lane.jobs > 0 or not lane.leased)
            )
            closed.update(candidates[:excess])
        decided.returns = [
            lane
            for lane in extra
            if lane in closed
            and not lane.jobs
            and (lane.leased or lane.broken)
            and (lane.broken or not pinning(lane))
        ]

    # Hand calls out, first come first served.
    taken: set[Lane] = set()
    lane0_free = not lane0.jobs
    lane0_handed = False  # a call handed to lane 0 in this plan reports first
    waiting: list[Call] = []
    # Lanes still free in this plan, and lanes that may still be leased: once
    # both are none, every call left can only wait (so a long queue costs no
    # scan at every event).
    free = int(lane0_free)
    if extra:
        free += sum(
            1
            for lane in extra
            if not lane.jobs
            and not lane.broken
            and (lane not in closed or pinning(lane))  # (that one: for its cursor)
        )
    room = parallelism - len(lanes)
    for index, call in enumerate(queue):
        if not free and room <= 0 and waiting:
            waiting.extend(queue[index:])
            break
        alias = call.target.alias
        # (What lane 0's transactions are checked for: the alias, or every one.)
        scope = call.target.scope or alias
        # An open cursor's chunks run on the lane that opened it, inside a
        # transaction block too (the cursor is that lane's connection's, which
        # only that lane's thread may use); other calls of a block on its lane.
        pinned = None if call.target.cursor is None else pinned_to(call)
        if pinned is None:
            pinned = call.pin
        if pinned is None and call.reserve:
            # A transaction block's first call: on an extra lane of its own
            # when lane 0 is known outside every transaction (the
            # block's transaction is then the lane's alone), else on lane 0.
            # (A call made by_last_report never waits for lane 0's pending
            # report: lane 0 may be busy for as long as the block is open.)
            if parallelism > 1 and (call.by_last_report or verdict(scope) == CLEAR):
                # (Never a lane that must stay as it is: the block would end
                # its snapshot export or run its cursor's chunks.)
                lane = _idle_extra_lane(
                    extra, alias, taken, closed.union(filter(pinning, extra))
                )
                if lane is not None:
                    decided.hand_outs.append((call, lane, "reserve"))
                    taken.add(lane)
                    free -= 1
                    continue
                if len(lanes) < parallelism and may_lease(alias):
                    waiting.append(call)  # a lease comes for it
                    continue
            pinned = lane0
        if pinned is not None:
            if pinned.broken:
                decided.hand_outs.append((call, pinned, "lost"))
            elif pinned is lane0 and lane0_free:
                decided.hand_outs.append((call, lane0, "pinned"))
                lane0_free, lane0_handed = False, True
                free -= 1
            elif pinned is not lane0 and not pinned.jobs and pinned not in taken:
                decided.hand_outs.append((call, pinned, "pinned"))
                taken.add(pinned)
                free -= 1
            elif pinned is lane0 and not waiting and len(lanes) == 1:
                decided.hand_outs.append((call, lane0, "behind"))
                lane0_handed = True
            else:
                waiting.append(call)
            continue
        if lane0_free:
            decided.hand_outs.append((call, lane0, "lane0"))
            lane0_free, lane0_handed = False, True
            free -= 1
            continue
        # Lane 0 runs a call: an extra lane may take this one if lane 0's
        # report of that call allows (a call handed to lane 0 just now has
        # not reported yet).
        if extra:
            if lane0_handed:
                how = CREDIT if likely_clear(scope) else REPORT
            else:
                how = verdict(scope)
            if how in (CLEAR, CREDIT):
                lane = _idle_extra_lane(extra, alias, taken, closed)
                if lane is not None:
                    decided.hand_outs.append((call, lane, how))
                    taken.add(lane)
                    free -= 1
                    continue
            elif how == REPORT:
                decided.want_report = True
        elif not waiting and not (
            parallelism > 1 and may_lease(alias) and likely_clear(scope)
        ):
            # No other lane, none to be had now, nothing queued before it.
            decided.hand_outs.append((call, lane0, "behind"))
            lane0_handed = True
            continue
        waiting.append(call)

    # Lease extra lanes for the calls left, within the parallelism.
    if room > 0 and waiting:
        demand: Counter[str] = Counter()
        blocks: Counter[str] = Counter()  # (transaction blocks' first calls)
        for call in waiting:
            if (
                call.pin is None
                and pinned_to(call) is None
                # (A call for every alias stays on lane 0 while it is inside
                # any transaction: no lease for it then.)
                and (call.target.scope is None or likely_clear(call.target.scope))
            ):
                demand[call.target.alias] += 1
                if call.reserve:
                    blocks[call.target.alias] += 1
        for lane in extra:
            # Idle lanes (leasing, or waiting for lane 0's report) serve first
            # - a block, only if the lane need not stay as it is.
            if (
                lane not in closed
                and not lane.jobs
                and not lane.reserved
                and lane not in taken
            ):
                demand[lane.alias or ""] -= 1
                if not pinning(lane):
                    blocks[lane.alias or ""] -= 1
        # (The union keeps each alias's larger positive count.)
        for alias, wanted in (demand | blocks).items():
            if room <= 0:
                continue
            if not likely_clear(alias) or not may_lease(alias):
                continue  # (its calls stay on lane 0, or no connection now)
            n = min(wanted, room)
            decided.leases.extend([alias] * n)
            room -= n
    return decided


def _idle_extra_lane(
    extra: Sequence[Lane], alias: str, taken: set[Lane], closed: set[Lane]
) -> Lane | None:
    """The first extra lane of *alias* free for any call: idle, not held by a
    transaction block, not taken in this plan, not going back."""
    for lane in extra:
        if (
            lane.alias == alias
            and not lane.jobs
            and not lane.reserved
            and lane not in taken
            and lane not in closed
        ):
            return lane
    return None


class Scheduler:
    """Runs a set's calls on its lanes; owned by a :class:`~.dbset.ConnectionSet`,
    used on its event loop only."""

    __slots__ = (
        "__weakref__",
        "_background",
        "_closed",
        "_cursors",
        "_holder",
        "_lane0",
        "_lane0_next",
        "_lane0_passed",
        "_lane0_turns",
        "_lanes",
        "_loop",
        "_queue",
        "_return_when_idle",
        "_running",
        "_seq",
        "blocks",
        "lane0_blocks",
        "lease_timeout",
        "parallelism",
        "recorder",
        "snapshot",
        "timeout_ms",
        "transaction_pooled",
    )

    def __init__(
        self,
        *,
        parallelism: int,
        lease_timeout: float,
        timeout_ms: int | None,
        recorder: Recorder,
    ) -> None:
        self.parallelism = parallelism
        self.lease_timeout = lease_timeout
        #: The statement timeout lanes set for each call (milliseconds).
        self.timeout_ms = timeout_ms
        self.recorder = recorder
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Told of pool pressure (see on_pool_pressure) since its first lease.
        self._holder = False
        self._lane0 = RequestLane()
        self._lanes: list[Lane] = [self._lane0]
        # Lane 0's calls go to its thread in the order of their generations:
        # the next generation to go, those that will not, the calls waiting.
        self._lane0_next = 0
        self._lane0_passed: set[int] = _NO_GENERATIONS  # (made on first use)
        self._lane0_turns: dict[int, asyncio.Future[None]] = _NO_TURNS
        self._queue: list[Call] = []
        self._seq = itertools.count()
        # The lane each open aiterator() cursor runs on; made on the first pin.
        self._cursors: Mapping[GeneratorT, Lane] = _NO_CURSORS
        # Jobs started and not ended, and their lanes (for stop_running()).
        self._running: dict[Job, Lane] = {}
        self._background: set[asyncio.Future[Any]] = set()
        # Extra lanes return_idle_lanes() found busy or leasing: each goes back
        # once idle (a tuple: empty, and falsy, in every other set).
        self._return_when_idle: tuple[Lane, ...] = ()
        #: Transaction blocks holding an extra lane of their own now.
        self.blocks = 0
        #: Transaction blocks open on lane 0 (kept by the set): lane 0 is
        #: inside a transaction while any is, whatever its reports say yet.
        self.lane0_blocks = 0
        #: The snapshot every call runs in, when one is on (see .snapshots).
        self.snapshot: Snapshot | None = None
        #: Aliases behind a transaction pooler: statement timeouts per call's
        #: transaction, never per session.
        self.transaction_pooled: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        busy = sum(lane.busy for lane in self._lanes)
        leasing = sum(not lane.leased and not lane.broken for lane in self._lanes[1:])
        return (
            f"lanes: {busy} busy, {len(self._lanes) - busy} idle, {leasing} leasing"
            f" | calls: {len(self._queue)} queued"
        )

    @property
    def lanes(self) -> tuple[Lane, ...]:
        return tuple(self._lanes)

    @property
    def lane0(self) -> RequestLane:
        return self._lane0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    # -- the decision --------------------------------------------------------

    def _assign(self) -> None:
        """Take the decision (:func:`plan`) and carry it out; called after
        every change of the set's state."""
        if self._closed:
            return
        if self._return_when_idle and not self._queue:
            self._return_late_lanes()
        lanes = self._lanes
        if not self._queue and (
            len(lanes) == 1
            or (
                len(lanes) <= self.parallelism
                and not any(lane.broken for lane in lanes)
            )
        ):
            return  # nothing waits, nothing to give back: nothing to decide
        reports = self._lane0.reports
        while True:
            decided = plan(
                self._queue,
                self._lanes,
                parallelism=self.parallelism,
                verdict=reports.verdict,
                likely_clear=reports.likely_clear,
                pinned_to=self._pinned_to,
                may_lease=self._may_lease,
                pinning=self._pinning,
            )
            for lane in decided.returns:
                self._return_lane(lane)
            for call, lane, how in decided.hand_outs:
                self._hand(call, lane, how)
            handed = len(decided.hand_outs)
            if handed == len(self._queue):
                self._queue = []
            elif handed and all(
                decided.hand_outs[i][0] is self._queue[i] for i in range(handed)
            ):
                del self._queue[:handed]  # (the usual case: the first calls)
            elif handed:
                self._queue = [
                    call for call in self._queue if call.lane is None and not call.lost
                ]
            if decided.want_report and not reports.want(self._report_posted):
                continue  # it came meanwhile: decide again with it
            if not decided.leases or not self._lease(decided.leases):
                return
            # (New lanes, leasing: decide again, so the calls left take them.)

    def _hand(self, call: Call, lane: Lane, how: str) -> None:
        if how == "lost":  # its block's lane died: the call cannot run anywhere
            call.lost = True
            if call.future is not None and not call.future.done():
                call.future.set_result(None)
            return
        reports = self._lane0.reports
        if lane is self._lane0:
            call.generation = reports.next_generation()
            if how == "behind" and not call.unrecorded:
                stats.incr("lane0_queued_calls")
            last = reports.last
            if last and call.target.alias in last and not call.unrecorded:
                # (Kept on lane 0 by its transaction, or by a watcher: lanes.watched.)
                stats.incr("pinned_calls")
        elif how == CREDIT:
            call.clearance = reports.due
        cursor = call.target.cursor
        if how == "pinned" and not call.unrecorded:
            stats.incr("pinned_calls")
        elif how == "reserve":
            lane.reserved = True
        if cursor is not None and self._cursors.get(cursor) is None:
            self._pin(cursor, lane)  # its first chunk: every later one runs here
        lane.jobs += 1
        call.lane = lane
        if call.future is not None and not call.future.done():
            call.future.set_result(None)

    def _may_lease(self, alias: str) -> bool:
        # The budget is 0 for an alias without a pool (calls stay serial, as
        # the checks said). Requests waiting for their own connections (or a
        # lease just refused): an extra lane would queue ahead of them.
        return (
            budget.may_acquire(alias)
            and time.monotonic() >= budget.retry_at(alias)
            and not pool_is_contended(alias)
        )

    def _report_posted(self, generation: int) -> None:
        # On lane 0's thread, when it posts a report the loop asked for.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._assign)

    def on_lane0(self, pin: Lane | None, cursor: GeneratorT | None) -> bool:
        """True unless a call pinned to *pin* with *cursor* must run on an
        extra lane (its transaction block's, or its cursor's)."""
        if cursor is not None:
            # (A chunk runs on its cursor's lane, inside a block too: plan().)
            pin = self._cursors.get(cursor, pin)
        return pin is None or pin is self._lane0

    def lane0_changed(self) -> None:
        """The sync caller above changed: lane 0 is another thread now, which
        may be inside a transaction; nothing is known until it reports."""
        self._lane0.reports.forget()
        if self._queue:
            self._assign()

    def set_parallelism(self, value: int) -> None:
        self.parallelism = value
        if self._loop is not None:
            self._assign()  # grow for the calls queued, or shrink

    # -- the call path -------------------------------------------------------

    async def run(
        self,
        target: Target,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outer: object,
        *,
        pin: Lane | None = None,
        untimed: bool = False,
        unrecorded: bool = False,
    ) -> tuple[bool, Any]:
        """Run one call on a lane (on *pin*, if given; without the statement
        timeout, *untimed*; counted nowhere, *unrecorded*): ``(True, result)``;
        or ``(False, None)`` when the set closed before a lane took it, or had
        closed when it was made (the caller runs it as stock, or refuses it)."""
        call = Call(
            next(self._seq),
            target,
            time.perf_counter(),
            pin=pin,
            untimed=untimed,
            unrecorded=unrecorded,
        )
        return await self._serve(call, func, args, kwargs, outer)

    async def run_aside(
        self, func: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> Any:
        """Run one call as stock Django runs it (:func:`~.hop.run_as_stock`:
        the request's thread, no lane, no record, no report), keeping only
        what every call of a set has: a caller that gives up while it runs
        has its query cancelled on the server, and so does a set that closes
        on an error (see ``ConnectionSet._steps_aside``)."""
        job = Job()
        self._running[job] = self._lane0  # (the request's thread: lane 0's)
        try:
            return await run_as_stock(guarded(job, func, args, kwargs))
        except asyncio.CancelledError:
            if job.give_up():
                # It runs on; its query is cancelled, unless inside a
                # transaction (Job.cancel_in_flight).
                self._cancel(job)
            raise
        finally:
            self._running.pop(job, None)

    async def open_block(
        self,
        alias: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        outer: object,
        *,
        on_lane0: bool = False,
        by_last_report: bool = False,
    ) -> tuple[Lane, Any]:
        """Run a transaction block's first call (its BEGIN) on the lane the
        block holds from then on - an extra lane of its own when lane 0 is
        outside every transaction, else lane 0 (always, *on_lane0*;
        never while an extra lane can be had, *by_last_report*) - and return
        that lane with the call's result. The caller ends the block with
        :meth:`close_block`."""
        call = Call(
            next(self._seq),
            Target(alias),
            time.perf_counter(),
            pin=self._lane0 if on_lane0 else None,
            reserve=True,
            by_last_report=by_last_report,
        )
        try:
            ran, result = await self._serve(call, func, args, {}, outer)
        except Exception:
            # The BEGIN failed on its lane (a durable block inside another,
            # say): no block holds the lane, which serves every call again.
            # (A caller that gives up instead waits for the BEGIN and leaves
            # the block itself: blocks.AsyncAtomic.__aenter__.)
            if call.lane is not None and call.lane.reserved:
                call.lane.reserved = False
                self._assign()
                self._when_idle()
            raise
        if not ran or call.lane is None:
            raise CallNotRunError(
                "asgi_dbset: the transaction block did not start: its connection "
                "set has ended. Enter asgi_dbset.atomic() inside the request."
            )
        if call.lane.reserved:
            self.blocks += 1
        return call.lane, result

    def close_block(self, lane: Lane) -> None:
        """A transaction block that held *lane* has ended: the lane serves
        every call again."""
        if lane.reserved:
            lane.reserved = False
            self.blocks -= 1
            self._assign()
            # (Its last call ended while the block still held it: the set
            # may be idle already, and this lane goes back with the others.)
            self._when_idle()

    async def end_snapshot(self, outer: object) -> None:
        """End the snapshot: every lane that may be in it leaves it on its own
        thread, after the calls already handed to it."""
        if self.snapshot is None:
            return
        self.snapshot.ended = True
        self.snapshot = None
        lanes = [
            lane
            for lane in self._lanes
            if lane is self._lane0 or (lane.leased and not lane.broken)
        ]
        results = await asyncio.gather(
            *(self._leave_snapshot(lane, outer) for lane in lanes),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("asgi_dbset: error ending a snapshot", exc_info=result)

    async def _leave_snapshot(self, lane: Lane, outer: object) -> None:
        # (A task: it starts a loop turn after end_snapshot() chose its lane.)
        if lane is not self._lane0 and lane not in self._lanes:
            # Returned meanwhile (idle: under pool pressure, at the last body),
            # its connection left the snapshot as it went back, and its
            # worker is no lane's now: a call there would open a connection
            # nobody returns.
            return
        await self.run(
            Target(lane.alias or DEFAULT_DB_ALIAS),
            leave_thread_snapshots,
            (),
            {},
            outer,
            pin=lane,
        )

    async def _serve(
        self,
        call: Call,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outer: object,
    ) -> tuple[bool, Any]:
        if self._closed:
            # Made after the set closed (by a task that outlived its request):
            # no lane will take it - _assign() decides nothing any more - so
            # it is dropped now, never left waiting for ever.
            call.dropped = True
            return False, None
        self._queue.append(call)
        self._assign()
        while True:
            if call.lane is None and not call.dropped and not call.lost:
                if not call.unrecorded:
                    stats.incr("waits")
                assert self._loop is not None
                call.future = self._loop.create_future()
                try:
                    await call.future
                except asyncio.CancelledError:
                    self._drop(call)
                    raise
            if call.lost:
                what = (
                    "its transaction block (the block's transaction is gone with "
                    "it; leave the block and try again)"
                    if call.pin is not None and call.pin.broken
                    else "its aiterator()'s cursor (the iteration cannot go on; "
                    "start it again)"
                )
                raise CallNotRunError(
                    "asgi_dbset: this ORM call did not run: the connection of "
                    f"{what} was lost."
                )
            lane = call.lane
            if lane is None:
                return False, None
            try:
                return True, await self._run_on(lane, call, func, args, kwargs, outer)
            except NotRunError as exc:
                if self._closed:
                    # Its request is over (a task that outlived it): running it
                    # as stock Django now would open a connection on a thread
                    # nobody returns it from.
                    raise CallNotRunError(
                        "asgi_dbset: this ORM call did not run: it could not have "
                        "an extra connection and its connection set (its request) "
                        f"has ended ({exc}). Await every query inside the request."
                    ) from exc
                # It did not run: it queues again, in its place.
                if call.reserve and lane.reserved:
                    lane.reserved = False  # (a lane whose lease was refused)
                call.lane, call.clearance, call.future = None, None, None
                bisect.insort(self._queue, call, key=lambda c: c.seq)
                self._assign()

    def _drop(self, call: Call) -> None:
        """The caller gave up while its call waited for a lane."""
        lane = call.lane
        if lane is None:
            if call in self._queue:
                self._queue.remove(call)
            return
        # Handed a lane just as it gave up: the lane is free again.
        self._unpin_unopened(call)
        if lane is self._lane0:
            self._lane0.reports.withdraw(call.generation)
            self._lane0_turn_passed(call.generation)
        self._finish(lane, None)

    async def _lane0_turn(self, generation: int) -> None:
        """Wait until every call handed to lane 0 before this one has gone to
        its thread. Lane 0's thread runs calls in the order they reach it, and
        its reports are numbered in the order calls are handed to it: a call
        handed out later (queued behind lane 0 by its own task, at once) must
        not reach the thread first, or a report would stand for the wrong call."""
        while generation != self._lane0_next:
            if self._lane0_turns is _NO_TURNS:
                self._lane0_turns = {}
            turn = self._lane0_turns[generation] = self._loop_future()
            try:
                await turn
            except asyncio.CancelledError:
                self._lane0_turns.pop(generation, None)
                raise
        self._lane0_next += 1
        self._lane0_skip_passed()

    def _lane0_turn_passed(self, generation: int) -> None:
        """A call handed to lane 0 will not go to its thread: its turn passes."""
        if generation == self._lane0_next:
            self._lane0_next += 1
            self._lane0_skip_passed()
        elif generation > self._lane0_next:
            if self._lane0_passed is _NO_GENERATIONS:
                self._lane0_passed = set()
            self._lane0_passed.add(generation)

    def _lane0_skip_passed(self) -> None:
        while self._lane0_next in self._lane0_passed:
            self._lane0_passed.discard(self._lane0_next)
            self._lane0_next += 1
        turn = self._lane0_turns.pop(self._lane0_next, None)
        if turn is not None and not turn.done():
            turn.set_result(None)

    def _loop_future(self) -> asyncio.Future[None]:
        assert self._loop is not None
        return self._loop.create_future()

    async def _run_on(
        self,
        lane: Lane,
        call: Call,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        outer: object,
    ) -> Any:
        if lane is self._lane0:
            try:
                if call.generation == self._lane0_next and not self._lane0_turns:
                    self._lane0_next += 1  # its turn (the usual case)
                    if self._lane0_passed:
                        self._lane0_skip_passed()
                else:
                    await self._lane0_turn(call.generation)
            except asyncio.CancelledError:
                self._lane0.reports.withdraw(call.generation)
                self._lane0_turn_passed(call.generation)
                self._unpin_unopened(call)
                self._finish(lane, None)
                raise
        job = Job(call.generation)
        alias = call.target.alias
        timeout_ms = None if call.untimed else self.timeout_ms
        if call.reserve and lane is self._lane0:
            # A block's BEGIN on lane 0 runs untimed (it sends no query, or a
            # SAVEPOINT): a timeout set now would be set for the session
            # before the transaction begins and reset inside it, and a
            # rollback outside the set's calls (the pool's, of a block that
            # outlived its set) would leave it on the request's connection.
            # The block's calls set and reset it inside the transaction,
            # which keeps or undoes both.
            timeout_ms = None
        # (The set's own question is in no figure: the program made no call.)
        recorder = _UNRECORDED if call.unrecorded else self.recorder
        record = recorder.begin(lane.index, alias, func, call.queued)
        lane.calls += 1
        self._running[job] = lane
        try:
            # (No await before lane.run() hands the call to its thread: the
            # next call's turn above comes after this one's.)
            result = await lane.run(
                job,
                func,
                args,
                kwargs,
                alias,
                self._abandoned_end,
                timeout_ms,
                clearance=call.clearance,
                outer=outer,
                # (A transaction block's lane is never in the snapshot: its
                # block may write.)
                snapshot=None if lane.reserved else self.snapshot,
                local_timeout=alias in self.transaction_pooled,
                scope=call.target.scope,
                cursor_call=call.target.cursor is not None,
                untimed=self.transaction_pooled,
            )
        except NotRunError:
            recorder.forget(record)
            lane.calls -= 1
            self._unpin_unopened(call)
            # (No decision here: the call queues again first, in its place.)
            lane.jobs -= 1
            self._running.pop(job, None)
            raise
        except asyncio.CancelledError:
            recorder.end(record, job.started, job.ended)
            if job.give_up():
                # It runs on: its thread frees the lane when it ends, and the
                # query it runs is cancelled on the server meanwhile - unless
                # inside a transaction, which a cancel would abort: that one
                # ends as on stock (Job.cancel_in_flight).
                self._cancel(job)
            else:
                if job.state == Job.SKIPPED:
                    self._unpin_unopened(call)
                    if lane is self._lane0:
                        self._lane0.reports.withdraw(job.generation)  # no report
                self._finish(lane, job)
            raise
        except BaseException:
            recorder.end(record, job.started, job.ended)
            if lane is self._lane0:
                # (If it failed before its report, none will come; a report
                # already posted stands.)
                self._lane0.reports.withdraw(job.generation)
            self._unpin_closed(call)
            self._finish(lane, job)
            raise
        recorder.end(record, job.started, job.ended)
        self._unpin_closed(call)
        self._finish(lane, job)
        return result

    def _finish(self, lane: Lane, job: Job | None) -> None:
        """A job handed to *lane* is over: decide again."""
        lane.jobs -= 1
        if job is not None:
            self._running.pop(job, None)
        self._assign()
        self._when_idle()

    def _when_idle(self) -> None:
        """After a call ends or a lease is done: once no call waits and no
        extra lane runs one, the idle extra lanes go back to their pools if
        requests are waiting for a connection of theirs now (later, such a
        request tells the set itself: :func:`on_pool_pressure`). An idle lane
        holds a pooled connection that a request's own connection may need -
        while the app waits for another service, awaits its queries one at a
        time (lane 0 runs those) or streams a body that pauses - which stock
        Django would not hold. Calls made later lease again."""
        lanes = self._lanes
        if (
            len(lanes) == 1
            or self._queue
            or self._closed
            or any(lane.jobs for lane in lanes[1:])
        ):
            return
        if any(
            pool_is_contended(alias)
            for alias in {lane.alias or "" for lane in lanes[1:]}
        ):
            self.return_idle_extra_lanes()

    def return_idle_extra_lanes(self) -> None:
        """Return the extra lanes idle now, unless calls wait (they may take
        them) or a snapshot holds them (its lanes keep its transactions until
        the response: see return_idle_lanes)."""
        if self._closed or self._queue or self.snapshot is not None:
            return
        for lane in self._lanes[1:]:
            if self._returnable(lane):
                self._return_lane(lane)

    def _abandoned_end(self, lane: Lane, job: Job) -> None:
        # On the loop, told by the lane's thread: an abandoned job has ended.
        self._finish(lane, job)

    # -- cancellation --------------------------------------------------------

    def _cancel(self, job: Job) -> None:
        """Start *job*'s one cancel loop (if none runs yet)."""
        if job.claim_cancel():
            self._spawn(cancel_until_ended(job, send_cancel(job)))

    def cancel_abandoned(self, lane: Lane, alias: str) -> None:
        """A transaction block of *alias* on *lane* is left on an exception:
        the queries its lane still runs for callers that gave up are cancelled
        on the server (the rollback undoes them anyway), so that the rollback
        need not wait for them."""
        for job, on in list(self._running.items()):
            if on is lane and job.stop_abandoned(alias):
                self._cancel(job)

    def running_on_extra_lanes(self) -> bool:
        """True while a call runs on a lane other than lane 0."""
        return any(on is not self._lane0 for on in self._running.values())

    def stop_running(self) -> None:
        """The set closes on a cancellation: nobody needs the calls still
        running; their queries are cancelled on the server and they send no
        other."""
        for job in list(self._running):
            if job.stop():
                self._cancel(job)

    # -- leasing and returning -----------------------------------------------

    def _lease(self, aliases: list[str]) -> bool:
        """Add a leasing lane per alias the budget allows; True if any was."""
        added = False
        # (A block's first call made by_last_report never waits for lane 0's
        # report: nor does a lease it may take.)
        prompt = {call.target.alias for call in self._queue if call.by_last_report}
        for alias in aliases:
            if not budget.try_acquire(alias):
                continue
            try:
                worker = workers.acquire()
            except BaseException:
                budget.release(alias)
                raise
            lane = PooledLane(self._free_index(), alias, worker, self._lane0.reports)
            self._lanes.append(lane)
            with _holders_lock:
                _holders.setdefault(alias, weakref.WeakSet()).add(self)
            self._holder = True
            stats.incr("lanes_open")
            # (While lane 0 runs a call, the lane's calls wait for its report:
            # so does the lease.)
            lease = lane.start_lease(
                self.lease_timeout,
                self._lane0.reports.due
                if self._lane0.jobs and alias not in prompt
                else None,
            )
            lease.add_done_callback(functools.partial(self._lease_done, lane))
            added = True
        return added

    def _free_index(self) -> int:
        """The lowest lane number no lane of the set has now: a lane returned
        while the set was idle and leased again keeps its number (and the
        records count it once), so the numbers stay within the parallelism."""
        taken = {lane.index for lane in self._lanes}
        index = 1
        while index in taken:
            index += 1
        return index

    def _lease_done(self, lane: PooledLane, lease: asyncio.Future[None]) -> None:
        exc = BaseException("cancelled") if lease.cancelled() else lease.exception()
        if exc is None:
            lane.leased = True
            stats.incr("lanes_leased")
            logger.debug("asgi_dbset: leased lane %d on %r", lane.index, lane.alias)
        else:
            lane.broken = True
            # Every set of the process backs off as long as the lease waited: a
            # busy pool is not polled by each request in turn.
            backoff = max(self.lease_timeout, 0.01)
            budget.back_off(lane.alias or "", backoff)
            stats.incr("lease_failures")
            logger.debug("asgi_dbset: no extra lane for %r: %s", lane.alias, exc)
            if self._loop is not None:
                # Decide again when the back-off ends: calls still queued
                # then may have a lane (nothing else would wake them).
                self._loop.call_later(backoff, self._assign)
        self._assign()
        self._when_idle()  # (leased for calls another lane took meanwhile)

    def _return_lane(self, lane: Lane) -> None:
        """Give an idle extra lane's connection back to its pool, its worker to
        the workers and its place to the budget: here if that takes no query,
        else on its worker. (Every lane returned while the set is open goes
        this way; close() returns the others on their workers.)"""
        assert isinstance(lane, PooledLane)
        self._lanes.remove(lane)
        cursors = self._cursors_on(lane)
        for gen in cursors:
            # Its cursor goes with the connection: resuming it fails loudly.
            orphan(gen)
            self._unpin(gen)
        if not cursors and lane.return_here():
            _lane_returned(lane)
        else:
            self._spawn(_return_on_worker(lane, cursors))

    def return_idle_lanes(self) -> None:
        """Return every idle extra lane now; the set keeps lane 0 and leases
        again if calls queue."""
        if self._closed or len(self._lanes) == 1:
            return
        # The lanes that are not idle yet (a call running, a lease under way,
        # a block or a cursor holding them) go back as soon as they are, not
        # when the set closes: the app may go on after its response.
        self._return_when_idle = tuple(self._lanes[1:])
        self._return_late_lanes()

    def _returnable(self, lane: Lane) -> bool:
        """True if *lane* (an extra lane) may go back now: no call on it, its
        lease done, nothing that must stay on its connection."""
        return (
            not lane.busy
            and (lane.leased or lane.broken)
            and not self._pinning(lane)
            # A transaction block's lane stays until the block ends, idle
            # between its calls or not: its connection is inside the
            # block's transaction (the app may send its response before
            # it leaves the block).
            and (lane.broken or not lane.reserved)
        )

    def _return_late_lanes(self) -> None:
        """Return the lanes marked by return_idle_lanes() that are idle now
        (called with no call queued, or at the last body: no later call of
        the set needs them before it leases again); keep the others marked."""
        late: list[Lane] = []
        for lane in self._return_when_idle:
            if lane not in self._lanes:
                continue  # (gone back already: broken, or beyond the parallelism)
            if self._returnable(lane):
                self._return_lane(lane)
            else:
                late.append(lane)
        self._return_when_idle = tuple(late)

    def only_lane0_idle(self) -> bool:
        """True when the set has no lane but lane 0, nothing queued and
        nothing handed to lane 0: no call of the set runs or waits."""
        return len(self._lanes) == 1 and not self._queue and not self._lane0.jobs

    def holds_lanes(self) -> bool:
        """True while closing has something to give back or wait for."""
        return (
            len(self._lanes) > 1
            or bool(self._queue)
            or bool(self._background)
            or (self._cursors is not _NO_CURSORS and bool(self._cursors))
        )

    async def close(self) -> None:
        """Return every extra lane (after the call running on it) and wait for
        the set's background work; calls still queued run as stock Django."""
        self._closed = True
        self._lane0.reports.close()
        if self._holder:
            _forget(self)
        for call in self._queue:
            call.dropped = True
            if call.future is not None and not call.future.done():
                call.future.set_result(None)
        self._queue = []
        # Cursors go with their lanes: mark them before any waiting chunk of
        # theirs wakes up, so it fails loudly instead of running elsewhere.
        for gen, pinned in list(self._cursors.items()):
            if isinstance(pinned, PooledLane):
                orphan(gen)
        # Wait on tasks that are not done. A done task leaves the set through
        # its done-callback, which only runs when the loop gets control, and
        # gather() of done tasks completes without yielding (Python 3.12): a
        # loop on "while self._background" could spin forever.
        while pending := [task for task in self._background if not task.done()]:
            await asyncio.wait(pending)
        extra = [lane for lane in self._lanes if isinstance(lane, PooledLane)]
        self._lanes = [self._lane0]
        results = await asyncio.gather(
            # (A block still holding its lane - its task outlived the request -
            # is rolled back as its connection goes back: never half committed.)
            *(_return_on_worker(lane, self._cursors_on(lane)) for lane in extra),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("asgi_dbset: error returning a lane", exc_info=result)

    def close_at_once(self) -> bool:
        """Close with no task when there is nothing to give back (the common
        request); True if it did."""
        if self.holds_lanes():
            return False
        self._closed = True
        if self._holder:
            _forget(self)
        if self._lane0.reports.due >= 0:
            self._lane0.reports.close()  # (a wake-up asked for earlier, if any)
        return True

    # -- cursors -------------------------------------------------------------

    def has_cursors(self) -> bool:
        # The identity test spares the common set WeakKeyDictionary.__len__
        # (Python code).
        return self._cursors is not _NO_CURSORS and bool(self._cursors)

    def pin_opened_cursor(self, cursor: GeneratorT) -> None:
        """An aiterator() opened before the set routed it, so as stock Django
        runs it - on the request's own thread and connection - stays there."""
        if cursor not in self._cursors and (
            inspect.getgeneratorstate(cursor) != inspect.GEN_CREATED
        ):
            self._pin(cursor, self._lane0)

    def _unpin_unopened(self, call: Call) -> None:
        """A first chunk that did not run leaves no pin: its cursor never opened."""
        cursor = call.target.cursor
        if cursor is not None and inspect.getgeneratorstate(cursor) == (
            inspect.GEN_CREATED
        ):
            self._unpin(cursor)

    def _unpin_closed(self, call: Call) -> None:
        """A chunk that ended its cursor (the last one, or one that raised)
        leaves no pin: its lane is free for every call, and may go back as
        this call ends (_when_idle) rather than when the generator is freed."""
        cursor = call.target.cursor
        if cursor is not None and inspect.getgeneratorstate(cursor) == (
            inspect.GEN_CLOSED
        ):
            self._unpin(cursor)

    def _pinned_to(self, call: Call) -> Lane | None:
        cursor = call.target.cursor
        return None if cursor is None else self._cursors.get(cursor)

    def _pinning(self, lane: Lane) -> bool:
        """True while *lane* must stay in the set as it is: it holds an open
        cursor, or the export of the snapshot on now (which other lanes can
        import only while the exporting transaction is open)."""
        return (self.snapshot is not None and lane.exported is self.snapshot) or any(
            pinned is lane for pinned in self._cursors.values()
        )

    def _pin(self, cursor: GeneratorT, lane: Lane) -> None:
        if not isinstance(self._cursors, weakref.WeakKeyDictionary):
            self._cursors = weakref.WeakKeyDictionary()
        self._cursors[cursor] = lane

    def _unpin(self, cursor: GeneratorT) -> None:
        if isinstance(self._cursors, weakref.WeakKeyDictionary):
            self._cursors.pop(cursor, None)

    def _cursors_on(self, lane: Lane) -> list[GeneratorT]:
        return [gen for gen, pinned in list(self._cursors.items()) if pinned is lane]

    # -- background tasks ----------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning(
                "asgi_dbset: a background task of a connection set failed",
                exc_info=task.exception(),
            )


async def _return_on_worker(lane: PooledLane, cursors: list[GeneratorT]) -> None:
    try:
        await lane.return_on_worker(cursors)
    finally:
        _lane_returned(lane)


def _lane_returned(lane: PooledLane) -> None:
    """Count a lane whose connections went back, out of the budget."""
    budget.release(lane.alias or "")
    stats.incr("lanes_open", -1)


def on_pool_pressure(alias: str) -> None:
    """On a request's thread, when its ``getconn()`` finds *alias*'s pool
    with no connection to hand out while sets hold extra lanes of it: each
    such set returns its idle ones, on its loop, so the request waits for a
    lane's connection rather than for the end of another request."""
    with _holders_lock:
        holders = _holders.get(alias)
        if not holders:
            return
        schedulers = list(holders)
    for scheduler in schedulers:
        loop = scheduler._loop
        if loop is None or scheduler._closed:
            continue
        try:
            loop.call_soon_threadsafe(scheduler.return_idle_extra_lanes)
        except RuntimeError:  # (its loop has closed)
            pass


def _forget(scheduler: Scheduler) -> None:
    """*scheduler* has closed: nothing to tell it any more."""
    with _holders_lock:
        for holders in _holders.values():
            holders.discard(scheduler)
