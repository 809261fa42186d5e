"""Lane 0's transactions: which aliases its connections are inside one for.

Lane 0 is the request's own thread. Code the set never sees runs there too -
``await sync_to_async(transaction.set_autocommit)(False)``, or an ``atomic``
entered through ``sync_to_async`` - and stock Django runs every later call of
the request inside what that code opened. So an extra lane may only run a
call while lane 0's connections are outside any transaction *as of the call
before it on lane 0's thread*, and only lane 0's thread can tell. (Any: a call
for one database may touch another - see :func:`_inside`.)

Protocol (a *generation* is one call handed to lane 0; they are numbered in
the order they are handed out, which is the order lane 0's thread runs them):

- loop, :meth:`TransactionReports.next_generation`: a call is handed to
  lane 0; it will report as the returned generation.
- lane 0's thread, :meth:`~TransactionReports.post`: first thing in that
  call, which aliases its connections hold a transaction for.
- loop, :meth:`~TransactionReports.verdict`: before a call for an alias is
  handed to an extra lane while lane 0 runs a call. ``CLEAR``: the report of
  lane 0's latest call is in and lane 0 is outside every transaction.
  ``LANE0``: it is inside one (the call runs on lane 0, after it). ``CREDIT``:
  that report is still to come, and lane 0 was last seen outside every
  transaction; the call may be handed out, and the extra lane's
  thread waits for the report itself (:meth:`~TransactionReports.wait_clear`)
  and gives the call back unrun unless it clears it. ``REPORT``: the report is
  still to come and lane 0 was last seen inside one (or lane 0's thread just
  changed): the call waits on the loop, which asks to be told
  (:meth:`~TransactionReports.want`).
- loop, :meth:`~TransactionReports.withdraw`: the call handed to lane 0 will
  not run (its caller gave up before it started), so it never reports.
- loop, :meth:`~TransactionReports.forget`: the sync caller above changed
  (another ``async_to_sync``): lane 0 is another thread now.

An extra lane only ever runs a call while lane 0 runs one (when lane 0 is
idle, it takes the call itself), so the report of lane 0's latest call is the
state that call leaves too: the library's own calls never leave a
transaction opened or closed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

#: Verdicts of :meth:`TransactionReports.verdict`.
CLEAR: Final = "clear"
CREDIT: Final = "credit"
REPORT: Final = "report"
LANE0: Final = "lane0"

# Reports kept for threads that wait for one (they are posted in order, and a
# waiter waits for one of the last few).
_KEEP = 32

_NOT_POSTED: Final = object()

#: The alias of a call that may touch any database (``sync_to_lane``): it is
#: clear only while lane 0 is outside a transaction of every alias.
EVERY_ALIAS: Final = "*"


def _inside(aliases: frozenset[str], alias: str) -> bool:
    """Must a call for *alias* stay on lane 0, behind its transactions
    (*aliases*)? Yes while lane 0 is inside a transaction of any alias: a
    call for one database may touch another - a signal receiver writing
    elsewhere, a router - and on stock Django those queries run inside the
    transaction lane 0 holds there."""
    return bool(aliases)


class TransactionReports:
    """Lane 0's reports; see the module docstring for who calls what, where."""

    __slots__ = (
        "_cond",
        "_latest",
        "_lock",
        "_notify",
        "_posted",
        "_stale",
        "_waiting",
        "_wanted",
        "due",
        "last",
        "request_wrappers",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Made (on this lock) by the first thread that waits for a report.
        self._cond: threading.Condition | None = None
        # generation -> aliases in a transaction; None: withdrawn. Written under
        # the lock by threads, read by the loop with plain dict reads.
        self._posted: dict[int, frozenset[str] | None] = {}
        self._latest = -1  # the highest generation posted or withdrawn
        #: The aliases of the latest report posted; None before the first.
        self.last: frozenset[str] | None = None
        self._waiting = 0  # threads in wait_clear()
        self._wanted = -1  # the generation the loop asked to be told of
        # What tells the loop, held only while it waits: no lasting reference
        # from the reports back to the set (which would make every request's
        # set cyclic garbage).
        self._notify: Callable[[int], None] | None = None
        #: The generation of the latest call handed to lane 0 (loop only).
        self.due = -1
        self._stale = False
        #: Lane 0's thread's Django connections, as its latest call found
        #: them (written by that thread): where the extra lanes hand the
        #: queries they logged under DEBUG (see lanes.hand_over_queries).
        self.request_wrappers: list[BaseDatabaseWrapper] = []

    def __repr__(self) -> str:
        last = "none" if self.last is None else sorted(self.last)
        return f"<TransactionReports due={self.due} latest={self._latest} last={last}>"

    # -- on the loop ---------------------------------------------------------

    def next_generation(self) -> int:
        """A call is handed to lane 0: the generation it reports as."""
        self.due += 1
        self._stale = False
        return self.due

    def forget(self) -> None:
        """Lane 0's thread changed: nothing is known until its next call reports."""
        self._stale = True

    def likely_clear(self, alias: str) -> bool:
        """True unless lane 0 was last seen inside a transaction (of any
        alias, not only *alias*: see :func:`_inside`; before any report:
        True). Leases and credit go by it."""
        last = self.last
        return last is None or not _inside(last, alias)

    def verdict(self, alias: str) -> str:
        """May a call for *alias* go to an extra lane while lane 0 runs its
        latest call? One of CLEAR, CREDIT, REPORT, LANE0."""
        if self._stale:
            return REPORT
        aliases = self._posted.get(self.due, _NOT_POSTED)
        if aliases is _NOT_POSTED:
            return CREDIT if self.likely_clear(alias) else REPORT
        if aliases is None or _inside(aliases, alias):  # type: ignore[arg-type]
            return LANE0
        return CLEAR

    def want(self, notify: Callable[[int], None]) -> bool:
        """Ask to be told (``notify(generation)``, on lane 0's thread) when the
        report of the latest call comes; False if it has come already."""
        with self._lock:
            if not self._stale and self.due in self._posted:
                return False
            # (Stale: the next call handed to lane 0 reports, with a higher
            # generation, which tells the loop too.)
            self._wanted, self._notify = self.due, notify
            return True

    def withdraw(self, generation: int) -> None:
        """The call of *generation* will not run (its caller gave up before it
        started; asgiref may drop it from the thread's queue unseen). Threads
        waiting for its report stop waiting; a report already posted stands."""
        with self._lock:
            if generation not in self._posted:
                self._posted[generation] = None
                self._latest = max(self._latest, generation)
                if self._cond is not None:
                    self._cond.notify_all()

    def close(self) -> None:
        """The set is closing: tell the loop nothing any more."""
        if self._notify is None:
            return  # (most sets never asked)
        with self._lock:
            self._notify, self._wanted = None, -1

    # -- on lane 0's thread --------------------------------------------------

    def post(self, generation: int, aliases: frozenset[str]) -> bool:
        """Publish the report of call *generation*. Returns True if anyone -
        the loop, or an extra lane's thread - waits for it."""
        with self._lock:
            self._posted[generation] = aliases
            if generation >= self._latest:
                self._latest = generation
                self.last = aliases
                if len(self._posted) > _KEEP:
                    for old in [g for g in self._posted if g <= generation - _KEEP]:
                        del self._posted[old]
            notify = None
            if 0 <= self._wanted <= generation:
                notify, self._notify, self._wanted = self._notify, None, -1
            waiting = self._waiting > 0
            if waiting and self._cond is not None:
                self._cond.notify_all()
        if notify is not None:
            notify(generation)
        return waiting or notify is not None

    # -- on an extra lane's thread -------------------------------------------

    def wait_clear(self, generation: int, alias: str, timeout: float) -> bool:
        """True once call *generation* on lane 0 has reported its connections
        outside every transaction (which clears *alias*: see :func:`_inside`);
        False if it reports otherwise, will not report, or after *timeout*
        seconds."""
        with self._lock:
            self._wait_posted(generation, timeout)
            aliases = self._posted.get(generation)
            return aliases is not None and not _inside(aliases, alias)

    def wait_reported(self, generation: int, timeout: float) -> None:
        """Return once call *generation* on lane 0 has reported (or will not),
        or after *timeout* seconds: an extra lane's lease waits for it, so no
        connection is taken for calls that wait for lane 0 to start its own."""
        if generation in self._posted:  # (a dict read: atomic under the GIL)
            return
        with self._lock:
            self._wait_posted(generation, timeout)

    def _wait_posted(self, generation: int, timeout: float) -> None:
        # (The caller holds the lock.)
        if self._cond is None:
            self._cond = threading.Condition(self._lock)
        self._waiting += 1
        try:
            self._cond.wait_for(
                lambda: (
                    generation in self._posted or self._latest - generation >= _KEEP
                ),
                timeout,
            )
        finally:
            self._waiting -= 1
